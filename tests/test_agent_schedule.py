"""lab.agent.schedule: the pure arrival schedule (no clock, no sleep)."""

from __future__ import annotations

import math

import pytest

from lab.agent.schedule import (
    Arrival,
    PlanError,
    build_schedule,
    close,
    hold,
    ramp,
    simple_phases,
)


def test_uniform_ramp_until_hold_close_all() -> None:
    s = build_schedule(simple_phases(2500, 15_000, 60, None))
    assert len(s) == 15_000
    assert s.open_s[0] == 0.0
    assert s.open_s[1] == pytest.approx(1 / 2500)
    assert s.open_s[-1] == pytest.approx(14_999 / 2500)
    # every whole second of the ramp holds exactly 2,500 opens
    per_second = [0] * 6
    for t in s.open_s:
        per_second[int(t + 1e-9)] += 1
    assert per_second == [2500] * 6
    assert s.phase_end_s == pytest.approx((6.0, 66.0, 66.0))
    assert set(s.close_s) == {66.0}
    assert s.end_s == 66.0
    assert s.peak_open() == 15_000
    assert s.peak_rate_per_s() == 2500
    assert s.planned_by(1.0) == 2501  # t=0 .. t=1.0 inclusive
    assert s.planned_by(-0.1) == 0


def test_ramp_for_a_duration_then_close_at_a_rate_oldest_first() -> None:
    s = build_schedule([ramp(10, duration_s=2), hold(1), close(5)])
    assert len(s) == 20
    assert list(s.open_s) == pytest.approx([k / 10 for k in range(20)])
    # close at 5/s from t=3, in arrival order
    assert list(s.close_s) == pytest.approx([3 + k / 5 for k in range(20)])
    assert s.end_s == pytest.approx(7.0)


def test_several_ramps_partial_close_and_leftovers_close_at_the_end() -> None:
    s = build_schedule([ramp(100, until=100), close(None, count=40), ramp(50, until=110), hold(2)])
    # second ramp tops up from 60 open to 110: 50 more
    assert len(s) == 150
    assert sum(1 for c in s.close_s if c == pytest.approx(1.0)) == 40
    assert s.close_s[0] == pytest.approx(1.0)
    assert s.close_s[40] == pytest.approx(s.end_s)
    assert s.end_s == pytest.approx(1.0 + 1.0 + 2.0)
    assert s.peak_open() == 110
    assert all(c >= o for o, c in zip(s.open_s, s.close_s, strict=True))


def test_poisson_is_seeded_and_keeps_the_rate() -> None:
    a = build_schedule([ramp(1000, duration_s=20)], arrival=Arrival.POISSON, seed=7)
    b = build_schedule([ramp(1000, duration_s=20)], arrival=Arrival.POISSON, seed=7)
    c = build_schedule([ramp(1000, duration_s=20)], arrival=Arrival.POISSON, seed=8)
    assert list(a.open_s) == list(b.open_s)
    assert list(a.open_s) != list(c.open_s)
    assert 19_000 < len(a) < 21_000
    assert all(0 < t < 20 for t in a.open_s)
    assert list(a.open_s) == sorted(a.open_s)
    n = build_schedule([ramp(1000, until=500)], arrival=Arrival.POISSON, seed=1)
    assert len(n) == 500


def test_shards_partition_the_schedule() -> None:
    s = build_schedule(simple_phases(100, 1001, 1, 50))
    shards = [s.shard(p, 3) for p in range(3)]
    assert sum(len(x) for x in shards) == 1001
    merged = sorted(t for x in shards for t in x.open_s)
    assert merged == list(s.open_s)
    assert list(shards[1].open_s) == list(s.open_s[1::3])
    assert list(shards[2].close_s) == list(s.close_s[2::3])


def test_processes_take_turns_when_one_keeps_the_rate() -> None:
    """2,500/s to 64,000 over 4 processes: one opens at a time (consecutive runs of 16,000),
    so each wakes with ~5 connections due rather than ~1; the shards still partition the
    schedule and map back to it through first and step."""
    s = build_schedule(simple_phases(2500, 64_000, 1, None))
    assert s.lanes(4, 6000) == 1
    shards = [s.shard(p, 4, 1) for p in range(4)]
    assert [(x.first, x.step, len(x)) for x in shards] == [
        (0, 1, 16_000), (16_000, 1, 16_000), (32_000, 1, 16_000), (48_000, 1, 16_000)
    ]  # fmt: skip
    for x in shards:
        assert list(x.open_s) == list(s.open_s[x.first : x.first + len(x)])
    assert shards[0].open_s[-1] < shards[1].open_s[0]  # process 1 starts when 0 is done
    # 20,000/s needs 4 side by side (at most 6,000/s each): plain interleaving
    fast = build_schedule(simple_phases(20_000, 64_000, 1, None))
    assert fast.lanes(4, 6000) == 4
    assert [(x.first, x.step) for x in (fast.shard(p, 4, 4) for p in range(4))] == [
        (p, 4) for p in range(4)
    ]
    assert fast.shard(1, 4, 4).open_s == fast.shard(1, 4).open_s


def test_lanes_mix_interleaving_and_turns() -> None:
    """10,000/s over 4 processes: 2 lanes (5,000/s each), each lane's 2 processes taking
    consecutive runs of it; together exactly the schedule, once, in equal shares."""
    s = build_schedule(simple_phases(10_000, 1001, 1, None))
    lanes = s.lanes(4, 6000)
    assert lanes == 2
    shards = [s.shard(p, 4, lanes) for p in range(4)]
    conns = [x.first + k * x.step for x in shards for k in range(len(x))]
    assert sorted(conns) == list(range(1001))
    assert {x.step for x in shards} == {2}
    assert [len(x) for x in shards] == [250, 250, 251, 250]
    for x in shards:
        assert list(x.open_s) == [s.open_s[x.first + k * x.step] for k in range(len(x))]


def test_lanes_divide_the_processes_so_that_shares_stay_equal() -> None:
    """A lane count that does not divide the processes would give some processes two shares
    (64,000 at 13,000/s over 4 processes in 3 lanes: 10,667 / 21,333 / 21,333 / 10,667, past
    the open-file limit the capacity check counts on): the next divisor is taken."""
    s = build_schedule(simple_phases(13_000, 64_000, 1, None))
    assert s.lanes(4, 6000) == 4  # 3 needed: 4 is the next divisor of 4
    assert max(len(s.shard(p, 4, 4)) for p in range(4)) == 16_000
    assert build_schedule(simple_phases(10_000, 600, 1, None)).lanes(5, 6000) == 5
    assert build_schedule(simple_phases(10_000, 600, 1, None)).lanes(6, 6000) == 2
    assert build_schedule(simple_phases(13_000, 600, 1, None)).lanes(6, 6000) == 3
    assert build_schedule(simple_phases(100_000, 600, 1, None)).lanes(6, 6000) == 6


def test_close_rates_count_for_the_lanes() -> None:
    """Closes go oldest first, so a lane's closes fall on one process at a time: a fast
    close phase needs lanes as a fast ramp does; closing all at once needs none."""
    s = build_schedule(simple_phases(100, 1000, 1, 20_000))
    assert s.phase_close_rate_per_s == (0.0, 0.0, 20_000.0)
    assert s.lanes(4, 6000) == 4
    assert build_schedule(simple_phases(100, 1000, 1, 5000)).lanes(4, 6000) == 1
    assert build_schedule(simple_phases(100, 1000, 1, None)).lanes(4, 6000) == 1


def test_plans_that_close_while_opening_stay_interleaved() -> None:
    """With churn a run of consecutive connections could exceed a process's share of the peak
    (its open files): such plans interleave over every process."""
    churn = build_schedule([ramp(100, until=100), close(100, count=50), ramp(100, duration_s=1)])
    assert churn.lanes(3, 6000) == 3
    # a close at the very time of the last open counts as churn too (opens go first)
    same = [ramp(100, until=100), close(100, count=50), ramp(100, duration_s=0.005)]
    assert build_schedule(same).lanes(2, 6000) == 2
    assert build_schedule(simple_phases(100, 100, 1, None)).lanes(3, 6000) == 1
    assert build_schedule(simple_phases(100, 100, 1, None)).lanes(1, 6000) == 1
    with pytest.raises(ValueError, match="out of range"):
        churn.shard(0, 3, 4)


def test_peak_rate_is_the_fastest_phase_not_a_whole_second_count() -> None:
    """A ramp shorter than a second asks its rate of the processes though it opens fewer
    connections than that in its one second."""
    s = build_schedule(simple_phases(30_000, 3000, 1, None))
    assert s.peak_rate_per_s() == 30_000
    s = build_schedule([ramp(100, until=50), ramp(5000, duration_s=0.1), hold(1), close(9000)])
    assert s.peak_rate_per_s() == 5000  # a close phase opens nothing
    assert build_schedule([ramp(10, until=0), hold(1)]).peak_rate_per_s() == 0.0


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([], "no phases"),
        ([ramp(10, until=5), hold(-1)], r"phases\[1\] \(hold\): duration_s must be"),
        ([ramp(0, until=10)], "rate_per_s must be > 0"),
        ([ramp(10)], "exactly one of until"),
        ([ramp(10, until=5, duration_s=1)], "exactly one of until"),
        ([ramp(10, until=5), hold(-1)], "duration_s must be"),
        ([ramp(10, until=5), hold(math.inf)], "duration_s must be"),
        ([ramp(10, until=5), close(-3)], "close all at once"),
    ],
)
def test_bad_phases_name_the_phase_and_the_fix(phases: list, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build_schedule(phases)
