"""Arrival phases and the connection schedule they imply: a pure function, no clock, no sleep.

What it is for: the agent is an open-model load generator (tsung's arrival phases). The plan is
a list of phases; ``build_schedule`` turns it into, for every connection ``i`` (in arrival
order), the offset in seconds from the common start at which it must open (``open_s[i]``)
and at which it must close (``close_s[i]``). The agent processes then follow these times;
they never slow down when behind, they report the lag.

Phases (``Phase``; the JSON plan file holds the same fields, see ``lab.agent`` docstring):
- ``ramp``: open connections at ``rate_per_s``, until ``until`` connections are open in
  total, or for ``duration_s`` seconds (exactly one of the two).
- ``hold``: open nothing, close nothing, for ``duration_s`` seconds.
- ``close``: close the oldest open connections first, at ``rate_per_s``, or all at once when
  ``rate_per_s`` is None; optionally only ``count`` of them.
Connections still open after the last phase close at its end.

Arrivals are ``uniform`` (one every 1/rate s, the first at the phase start) or ``poisson``
(exponential inter-arrival times from ``random.Random(seed)``: same seed, same schedule).

Sharding (``shard``): the P processes of an agent share the connections so that together they
keep the exact schedule. Only as many of them as the rate needs open connections side by side
(``lanes``): lane ``l`` of ``L`` takes connections ``l, l+L, l+2L, ...``, and the processes of
a lane take consecutive runs of it, one after the other. At 2,500/s with 4 processes (L = 1)
process 0 opens connections 0..15,999, then process 1 the next 16,000, ...: each process
wakes only while it ramps, with ~5 connections due at each wake-up instead of ~1.25 (4
interleaved processes cost ~200 µs of CPU per connection on this kind of VM, one ~120).
L divides P, so every process gets an equal run. With L = P it is plain interleaving
(``p, p+P, ...``), which a plan whose connections close while others still open always gets,
so that no process holds more than its share at once. Close phases count too: closes go
oldest first, so a lane's closes fall on one of its processes at a time.
"""

from __future__ import annotations

import enum
import math
import random
from array import array
from bisect import bisect_right
from dataclasses import dataclass


class PhaseKind(enum.Enum):
    RAMP = "ramp"
    HOLD = "hold"
    CLOSE = "close"


class Arrival(enum.Enum):
    UNIFORM = "uniform"
    POISSON = "poisson"


class PlanError(ValueError):
    """A plan that cannot be run; the message names the phase, the field and the fix."""


@dataclass(frozen=True, slots=True)
class Phase:
    """One arrival phase. Build with ``ramp``, ``hold`` or ``close``."""

    kind: PhaseKind
    rate_per_s: float | None = None
    until: int | None = None
    duration_s: float | None = None
    count: int | None = None


def ramp(rate_per_s: float, *, until: int | None = None, duration_s: float | None = None) -> Phase:
    return Phase(PhaseKind.RAMP, rate_per_s=rate_per_s, until=until, duration_s=duration_s)


def hold(duration_s: float) -> Phase:
    return Phase(PhaseKind.HOLD, duration_s=duration_s)


def close(rate_per_s: float | None = None, *, count: int | None = None) -> Phase:
    return Phase(PhaseKind.CLOSE, rate_per_s=rate_per_s, count=count)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Open and close offsets (seconds from the start) per connection, in arrival order.

    ``open_s`` is non-decreasing; ``close_s[i] >= open_s[i]``; ``phase_end_s`` holds the end of
    each phase; ``end_s`` is when the plan is over (every connection closed by then);
    ``phase_rate_per_s`` the new connections per second each phase asks for (0.0 for a phase
    that opens none; a shard keeps the whole plan's).
    """

    open_s: array
    close_s: array
    phase_end_s: tuple[float, ...]
    end_s: float
    phase_rate_per_s: tuple[float, ...] = ()
    # closes per second each phase asks for (a close phase with a rate; else 0.0)
    phase_close_rate_per_s: tuple[float, ...] = ()
    # a shard's row k is connection first + k * step of the whole schedule
    first: int = 0
    step: int = 1

    def __len__(self) -> int:
        return len(self.open_s)

    def planned_by(self, elapsed_s: float) -> int:
        """Connections whose open time is at or before ``elapsed_s``."""
        return bisect_right(self.open_s, elapsed_s)

    def peak_open(self) -> int:
        """Most connections open at the same time if every connection opens and closes on time."""
        events = sorted(
            [(t, 1) for t in self.open_s] + [(t, -1) for t in self.close_s],
            key=lambda e: (e[0], e[1]),  # at equal times, closes (-1) come first
        )
        peak = cur = 0
        for _, d in events:
            cur += d
            peak = max(peak, cur)
        return peak

    def peak_rate_per_s(self) -> float:
        """The highest rate of new connections (per second) any phase asks for. The rate, not
        a count over a whole second: a ramp of 3,000 at 30,000/s opens 3,000 in its only
        second, yet the processes must open one every 33 µs, and fall behind as at 30,000/s."""
        return max(self.phase_rate_per_s, default=0.0)

    def lanes(self, procs: int, rate_per_proc: float) -> int:
        """How many of ``procs`` processes must open (and close) connections side by side so
        that none is asked for more than ``rate_per_proc`` a second: the smallest divisor of
        ``procs`` that does it, so that every process gets an equal run (at most
        ``ceil(len / procs)`` connections, the share the open-file check counts on). ``procs``
        (plain interleaving) when a connection may close before or as the last one opens:
        with churn, a run of consecutive connections could be more than one process's share
        of the peak."""
        n = len(self)
        if procs <= 1 or n == 0:
            return 1
        if min(self.close_s) <= self.open_s[n - 1]:
            return procs
        rate = max(self.peak_rate_per_s(), max(self.phase_close_rate_per_s, default=0.0))
        need = max(1, math.ceil(rate / rate_per_proc)) if rate_per_proc > 0 else procs
        return next(d for d in range(min(need, procs), procs + 1) if procs % d == 0)

    def shard(self, proc: int, procs: int, lanes: int | None = None) -> Schedule:
        """The connections of process ``proc`` of ``procs`` when ``lanes`` of them open side
        by side (default ``procs``: interleaved, ``proc, proc+procs, ...``): lane
        ``proc % lanes``, and within it the ``proc // lanes``-th of its processes' equal runs.
        ``first`` and ``step`` of the result map its rows back to the whole schedule."""
        lanes = procs if lanes is None else lanes
        if not 1 <= lanes <= procs or not 0 <= proc < procs:
            raise ValueError(f"shard {proc} of {procs} in {lanes} lane(s): out of range")
        lane, q = proc % lanes, proc // lanes
        in_lane = len(range(lane, procs, lanes))  # processes sharing this lane
        size = len(range(lane, len(self), lanes))  # connections of this lane
        lo, hi = q * size // in_lane, (q + 1) * size // in_lane
        first = lane + lo * lanes
        idx = slice(first, lane + hi * lanes, lanes)
        return Schedule(
            array("d", self.open_s[idx]),
            array("d", self.close_s[idx]),
            self.phase_end_s,
            self.end_s,
            self.phase_rate_per_s,
            self.phase_close_rate_per_s,
            first=first,
            step=lanes,
        )


def _check(phase: Phase, n: int) -> None:
    where = f"phases[{n}] ({phase.kind.value})"  # from 0, as phases.0.rate_per_s in YAML
    if phase.kind is PhaseKind.RAMP:
        if phase.rate_per_s is None or not phase.rate_per_s > 0:
            raise PlanError(f"{where}: rate_per_s must be > 0, got {phase.rate_per_s}")
        if (phase.until is None) == (phase.duration_s is None):
            raise PlanError(f"{where}: give exactly one of until (connections) or duration_s")
        if phase.until is not None and phase.until < 0:
            raise PlanError(f"{where}: until must be >= 0, got {phase.until}")
    if phase.duration_s is not None and not (
        phase.duration_s >= 0 and math.isfinite(phase.duration_s)
    ):
        raise PlanError(f"{where}: duration_s must be a finite number >= 0, got {phase.duration_s}")
    if phase.kind is PhaseKind.HOLD and phase.duration_s is None:
        raise PlanError(f"{where}: hold needs duration_s")
    if phase.kind is PhaseKind.CLOSE:
        if phase.rate_per_s is not None and not phase.rate_per_s > 0:
            raise PlanError(f"{where}: rate_per_s must be > 0 (or null: close all at once)")
        if phase.count is not None and phase.count < 0:
            raise PlanError(f"{where}: count must be >= 0, got {phase.count}")


def _arrivals(
    phase: Phase, t0: float, n_open: int, arrival: Arrival, rng: random.Random
) -> tuple[list[float], float]:
    """Open offsets of one ramp phase and the phase's end."""
    rate = float(phase.rate_per_s or 0.0)
    times: list[float] = []
    if phase.until is not None:
        n = max(0, phase.until - n_open)
        if arrival is Arrival.UNIFORM:
            times = [t0 + k / rate for k in range(n)]
            return times, t0 + n / rate
        t = t0
        for _ in range(n):
            t += rng.expovariate(rate)
            times.append(t)
        return times, t
    end = t0 + float(phase.duration_s or 0.0)
    if arrival is Arrival.UNIFORM:
        n = math.ceil(round((end - t0) * rate, 9))
        return [t0 + k / rate for k in range(n)], end
    t = t0 + rng.expovariate(rate)
    while t < end:
        times.append(t)
        t += rng.expovariate(rate)
    return times, end


def build_schedule(
    phases: list[Phase] | tuple[Phase, ...], *, arrival: Arrival = Arrival.UNIFORM, seed: int = 0
) -> Schedule:
    """The schedule of ``phases`` (see the module docstring). Raises ``PlanError`` on bad phases."""
    if not phases:
        raise PlanError("the plan has no phases: give at least one ramp")
    rng = random.Random(seed)
    open_s = array("d")
    close_s = array("d")
    open_fifo: list[int] = []  # indexes of connections still open, oldest first
    head = 0
    t = 0.0
    ends: list[float] = []
    rates: list[float] = []
    close_rates: list[float] = []
    for n, phase in enumerate(phases):
        _check(phase, n)
        rates.append(0.0)
        close_rates.append(0.0)
        if phase.kind is PhaseKind.RAMP:
            times, t_end = _arrivals(phase, t, len(open_fifo) - head, arrival, rng)
            for ts in times:
                open_fifo.append(len(open_s))
                open_s.append(ts)
                close_s.append(math.inf)
            t = t_end
            if times:
                rates[-1] = float(phase.rate_per_s or 0.0)
        elif phase.kind is PhaseKind.HOLD:
            t += float(phase.duration_s or 0.0)
        else:
            n_open = len(open_fifo) - head
            k = n_open if phase.count is None else min(phase.count, n_open)
            rate = phase.rate_per_s
            for j in range(k):
                close_s[open_fifo[head + j]] = t if rate is None else t + j / rate
            head += k
            if rate is not None:
                t += k / rate
                if k:
                    close_rates[-1] = float(rate)
        ends.append(t)
    for j in range(head, len(open_fifo)):
        close_s[open_fifo[j]] = t
    return Schedule(open_s, close_s, tuple(ends), t, tuple(rates), tuple(close_rates))


def simple_phases(
    rate_per_s: float, connections: int, hold_s: float, close_rate_per_s: float | None
) -> list[Phase]:
    """The command line's one-ramp plan: ramp to ``connections`` at ``rate_per_s``, hold, close."""
    return [ramp(rate_per_s, until=connections), hold(hold_s), close(close_rate_per_s)]
