"""lab.histogram: bucketing, percentiles, merge and the JSON form."""

from __future__ import annotations

import random

import pytest

from lab.histogram import MAX_VALUE, Histogram, bucket_bounds, bucket_index


def test_buckets_cover_values_with_small_relative_error() -> None:
    for v in [0, 1, 127, 255, 256, 257, 511, 512, 1000, 12_345, 10**6, 10**9, MAX_VALUE]:
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v <= high
        assert high - low <= max(0, v) / 128
    # indexes are monotonic and contiguous
    prev = -1
    for v in range(0, 70_000, 7):
        i = bucket_index(v)
        assert i >= prev
        prev = i
    assert bucket_index(-5) == 0
    assert bucket_index(MAX_VALUE * 10) == bucket_index(MAX_VALUE)


def test_percentiles_of_known_data() -> None:
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    assert h.percentile(50) == 50
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.max() == 100
    assert h.mean() == pytest.approx(50.5)
    assert Histogram().percentile(50) is None
    with pytest.raises(ValueError):
        h.percentile(101)


def test_percentile_never_under_reports_large_values() -> None:
    rng = random.Random(1)
    values = sorted(rng.randint(1, 5_000_000) for _ in range(10_000))
    h = Histogram()
    for v in values:
        h.record(v)
    for q in (50, 90, 99, 99.9):
        exact = values[max(0, int(-(-len(values) * q // 100)) - 1)]
        got = h.percentile(q)
        assert got is not None
        assert exact <= got <= exact * (1 + 1 / 128)


def test_merge_equals_recording_everything_once() -> None:
    rng = random.Random(2)
    parts = [Histogram() for _ in range(3)]
    whole = Histogram()
    for _ in range(3000):
        v = rng.expovariate(1 / 2000)
        rng.choice(parts).record(v)
        whole.record(v)
    merged = Histogram.merged(p.to_json() for p in parts)
    assert merged.to_json() == whole.to_json()
    assert len(merged) == 3000
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram("us").merge(Histogram("ms"))


def test_json_round_trip_and_bad_input() -> None:
    h = Histogram()
    for v in (5, 5, 300, 70_000):
        h.record(v)
    d = h.to_json()
    assert d["unit"] == "us"
    assert d["buckets"] == sorted(d["buckets"])
    assert sum(c for _, c in d["buckets"]) == 4
    assert Histogram.from_json(d).to_json() == d
    with pytest.raises(ValueError, match="not a histogram"):
        Histogram.from_json({"unit": "us", "buckets": [[-1, 3]]})
    with pytest.raises(ValueError, match="not a histogram"):
        Histogram.from_json({"unit": "us"})
    h.reset()
    assert h.to_json() == {"unit": "us", "buckets": []}
