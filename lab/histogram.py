"""A mergeable log-linear latency histogram (HdrHistogram-equivalent), for the JSON streams.

What it is for: agents record connect and delivery latencies in microseconds, once per sample,
in O(1) and without allocating; each JSON line carries the samples of the last interval as
``{"unit": "us", "buckets": [[index, count], ...]}``; anyone (other processes, hosts, the
report) merges histograms by adding bucket counts and asks for percentiles.

Bucketing (fixed, so that indexes mean the same everywhere): values 0..255 have one bucket
each; above, every power of two [2^k, 2^(k+1)) is cut into 128 equal sub-buckets, so a
bucket's width is below 1/128 of its value (relative error < 0.8 %, like HdrHistogram with
2 significant digits). ``index = (s << 7) + (v >> s)`` with ``s = max(0, v.bit_length() - 8)``.
Values above ``MAX_VALUE`` (about 39 hours in us) are clamped to it.

Use: ``h = Histogram(); h.record(us)``; ``h.to_json()``; ``Histogram.from_json(d)``;
``h.merge(other)``; ``h.percentile(99.0)``; ``h.reset()`` after each interval.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

SUB_BITS = 7
SUB_COUNT = 1 << SUB_BITS  # sub-buckets per power of two
MAX_SHIFT = 40
N_BUCKETS = (MAX_SHIFT + 2) << SUB_BITS
MAX_VALUE = ((2 * SUB_COUNT) << MAX_SHIFT) - 1


class HistogramJSON(TypedDict):
    """Serialized form of a ``Histogram``: the unit and the non-empty buckets, sorted."""

    unit: str
    buckets: list[list[int]]


def bucket_index(value: int) -> int:
    """Bucket index of a non-negative integer value (negative values count as 0)."""
    if value < 2 * SUB_COUNT:
        return value if value > 0 else 0
    if value > MAX_VALUE:
        value = MAX_VALUE
    shift = value.bit_length() - (SUB_BITS + 1)
    return (shift << SUB_BITS) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Lowest and highest value (inclusive) that fall into bucket ``index``."""
    if index < 2 * SUB_COUNT:
        return index, index
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of values per log-linear bucket. ``unit`` names what the values measure."""

    __slots__ = ("counts", "total", "unit")

    def __init__(self, unit: str = "us") -> None:
        self.unit = unit
        self.counts: dict[int, int] = {}
        self.total = 0

    def record(self, value: float, count: int = 1) -> None:
        """Add ``count`` samples of ``value`` (in ``unit``; fractions are truncated)."""
        i = bucket_index(int(value))
        counts = self.counts
        counts[i] = counts.get(i, 0) + count
        self.total += count

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram (same unit); return self."""
        if other.unit != self.unit:
            raise ValueError(
                f"cannot merge a histogram in {other.unit!r} into one in {self.unit!r}"
            )
        counts = self.counts
        for i, c in other.counts.items():
            counts[i] = counts.get(i, 0) + c
        self.total += other.total
        return self

    def reset(self) -> None:
        """Forget every sample (start a new interval)."""
        self.counts = {}
        self.total = 0

    def percentile(self, q: float) -> float | None:
        """Value at percentile ``q`` (0..100): the highest value of the bucket that holds it,
        as HdrHistogram does (never under-reports). ``None`` when empty."""
        if self.total == 0:
            return None
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        rank = max(1, -(-self.total * q // 100))  # ceil, at least the first sample
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return float(bucket_bounds(i)[1])
        return float(bucket_bounds(max(self.counts))[1])

    def max(self) -> float | None:
        """Highest recorded value (upper bound of the top non-empty bucket), ``None`` when empty."""
        return float(bucket_bounds(max(self.counts))[1]) if self.counts else None

    def mean(self) -> float | None:
        """Mean of the bucket midpoints, ``None`` when empty."""
        if self.total == 0:
            return None
        acc = 0.0
        for i, c in self.counts.items():
            low, high = bucket_bounds(i)
            acc += (low + high) / 2 * c
        return acc / self.total

    def to_json(self) -> HistogramJSON:
        """The serialized form: ``{"unit": ..., "buckets": [[index, count], ...]}``."""
        return {"unit": self.unit, "buckets": [[i, self.counts[i]] for i in sorted(self.counts)]}

    @classmethod
    def from_json(cls, data: HistogramJSON | dict) -> Histogram:
        """Rebuild a histogram from ``to_json()``'s output; rejects malformed input clearly."""
        try:
            h = cls(str(data.get("unit", "us")))
            for i, c in data["buckets"]:
                if int(i) < 0 or int(i) >= N_BUCKETS or int(c) < 0:
                    raise ValueError(f"bucket [{i}, {c}] out of range")
                h.counts[int(i)] = h.counts.get(int(i), 0) + int(c)
                h.total += int(c)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"not a histogram (expected {{'unit': 'us', 'buckets': [[index, count], ...]}}): "
                f"{exc}"
            ) from exc
        return h

    @classmethod
    def merged(
        cls, parts: Iterable[HistogramJSON | dict | Histogram], unit: str = "us"
    ) -> Histogram:
        """One histogram holding the samples of all ``parts`` (objects or serialized forms)."""
        out = cls(unit)
        for part in parts:
            out.merge(part if isinstance(part, Histogram) else cls.from_json(part))
        return out

    def __len__(self) -> int:
        return self.total

    def __repr__(self) -> str:
        return f"Histogram(unit={self.unit!r}, total={self.total}, buckets={len(self.counts)})"
