"""lab.stats and lab.summary_table: pure functions on small constructed tables, known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import runfolder

from lab import stats, summary_table
from lab.stats import Tables


def make_tables(run: dict[str, Any] | None = None, **frames: pd.DataFrame) -> Tables:
    """Tables from the given frames; the others empty with their documented columns."""
    full = {}
    for name in stats.TABLE_COLUMNS:
        frame = frames.get(name, stats.empty_table(name))
        for col in stats.TABLE_COLUMNS[name]:
            if col not in frame.columns:
                frame[col] = np.nan
        full[name] = frame
    hist = frames.get("histograms", pd.DataFrame({"metric": [], "index": [], "count": []}))
    pids = frames.get("pids", pd.DataFrame({"host": [], "role": [], "pid": []}))
    return Tables(folder=Path("/nonexistent"), run=run or {}, histograms=hist, pids=pids, **full)


def conns(
    scheduled: list[float],
    connected: list[float],
    closed: list[float] | None = None,
    outcome: list[str] | None = None,
) -> pd.DataFrame:
    n = len(scheduled)
    frame = pd.DataFrame(
        {
            "host": "h",
            "agent": "a0",
            "proc": 0,
            "conn": range(n),
            "scheduled": scheduled,
            "started": scheduled,
            "connected": connected,
            "closed": closed if closed is not None else [math.nan] * n,
            "outcome": outcome or ["ok"] * n,
        }
    )
    frame["connect_ms"] = (frame["connected"] - frame["scheduled"]) * 1000
    return frame


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Tables:
    return stats.load_tables(runfolder.build(tmp_path_factory.mktemp("run") / "run"))


def test_summary_of_known_run(synthetic: Tables) -> None:
    s = stats.summarize(synthetic, synthetic.run)
    ok = runfolder.CONNS - runfolder.REFUSED
    assert s["peak_connections"] == ok
    assert s["connect_errors"] == runfolder.REFUSED
    assert s["errors_by_reason"] == {"refused": runfolder.REFUSED}
    assert s["ramp_rate_min_per_s"] == pytest.approx(runfolder.RATE_PER_S, abs=2)
    assert s["ramp_rate_mean_per_s"] == pytest.approx(runfolder.RATE_PER_S, rel=0.01)
    assert s["ramp_whole_seconds"] == 3  # 1,000 at 250/s span 3.996 s
    assert s["server_bytes_per_conn"] == pytest.approx(runfolder.SERVER_BYTES, rel=1e-6)
    assert s["agent_bytes_per_conn"] == pytest.approx(runfolder.AGENT_BYTES, rel=1e-6)
    assert s["kernel_bytes_per_conn"] == pytest.approx(runfolder.KERNEL_BYTES, rel=1e-6)
    assert s["connect_ms_p50"] == pytest.approx(runfolder.CONNECT_MS, abs=0.01)
    assert s["connect_ms_max"] == pytest.approx(runfolder.CONNECT_MS, abs=0.01)
    # delivery from the merged histograms: the bucket's upper bound, < 0.8% above
    assert s["delivery_ms_p99"] == pytest.approx(runfolder.DELIVERY_MS, rel=0.008)
    assert s["messages_lost"] == 0
    # each agent's last cumulative count, summed (agent k reports k: runfolder.py)
    assert s["messages_untimed"] == sum(range(len(runfolder.AGENTS)))
    assert s["agent_saturated"] is False
    assert s["planned_peak_connections"] == runfolder.CONNS
    assert s["planned_rate_per_s"] == runfolder.RATE_PER_S
    assert s["planned_hold_s"] == runfolder.HOLD_S
    assert s["server_cpu_us_per_conn"] > 0
    json.dumps(s)  # run.json must hold it as it is
    from lab.experiment import SUMMARY_FIELDS

    missing = [f for f in SUMMARY_FIELDS if f not in s]
    assert not missing


def test_slowest_whole_second_and_partial_last_second() -> None:
    # 10/s scheduled over 3.9 s; second 1 achieves only 4 (6 connect late, in second 2)
    sched = [0.05 + i / 10 for i in range(40)]
    connected = [t + 0.001 for t in sched]
    for i in range(14, 20):
        connected[i] = 2.5
    t = make_tables(connections=conns(sched, connected))
    rates = stats.rate_frame(t)
    whole = rates[rates["whole"]]
    assert list(whole["second"]) == [0, 1, 2]
    assert list(whole["planned"]) == [10, 10, 10]
    assert list(whole["achieved"]) == [10, 4, 16]
    assert stats.summarize(t, {})["ramp_rate_min_per_s"] == 4


def test_a_run_stopped_mid_ramp_counts_only_the_seconds_before_the_stop() -> None:
    """Interrupted at 2.35 s into a 10/s ramp planned for 4 s: the connections due after the
    stop were never started. Seconds 2 and 3 were cut short by the stop, not slow: only 0 and
    1 are whole, and the slowest whole second is 10/s, not 0/s."""
    sched = [0.05 + i / 10 for i in range(40)]
    connected = [t + 0.001 if t < 2.35 else math.nan for t in sched]
    outcome = ["ok" if t < 2.35 else "not_started" for t in sched]
    t = make_tables(connections=conns(sched, connected, outcome=outcome))
    whole = stats.rate_frame(t).query("whole")
    assert list(whole["second"]) == [0, 1]
    s = stats.summarize(t, {})
    assert (s["ramp_rate_min_per_s"], s["ramp_whole_seconds"]) == (10, 2)


def test_peak_counts_a_close_before_an_open_at_the_same_instant() -> None:
    t = make_tables(connections=conns([0, 0, 1], [0.1, 0.2, 0.2], [0.2, math.nan, math.nan]))
    assert stats.peak_connections(t) == 2


def test_errors_exclude_not_started() -> None:
    frame = conns(
        [0, 0.1, 0.2, 0.3],
        [0.01, math.nan, math.nan, 0.31],
        outcome=["ok", "timeout", "not_started", "ok"],
    )
    s = stats.summarize(make_tables(connections=frame), {})
    assert s["connect_errors"] == 1
    assert s["errors_by_reason"] == {"timeout": 1}


def test_pending_after_an_interrupt_is_counted_apart_not_as_errors() -> None:
    frame = conns(
        [0, 0.1, 0.2, 0.3, 0.4],
        [0.01, math.nan, math.nan, math.nan, math.nan],
        outcome=["ok", "pending", "pending", "not_started", "reset"],
    )
    s = stats.summarize(make_tables(connections=frame), {})
    assert s["connect_errors"] == 1
    assert s["errors_by_reason"] == {"reset": 1}
    assert s["connections_pending"] == 2
    clean = stats.summarize(make_tables(connections=conns([0], [0.01], outcome=["ok"])), {})
    assert clean["connections_pending"] == 0


def test_memory_fit_uses_samples_until_the_first_close() -> None:
    sched = [i / 100 for i in range(100)]
    connected = [x + 0.001 for x in sched]
    closed = [5.0] * 100
    procs = []
    for second in range(8):
        t = second + 0.5
        open_now = sum(1 for c in connected if c <= t) if t < 5 else 0
        # memory is not returned after the close: the fit must ignore those samples
        mem = 1e6 + 4096 * (open_now if t < 5 else 100)
        procs.append(
            {
                "t": t,
                "host": "h",
                "pid": 1,
                "role": "server",
                "cpu_percent": 10.0,
                "rss": mem + 5e6,
                "uss": mem,
            }
        )
    t = make_tables(connections=conns(sched, connected, closed), monitor_procs=pd.DataFrame(procs))
    fits = stats.memory_fits(t)
    assert fits["server"].bytes_per_conn == pytest.approx(4096)
    assert fits["server"].intercept_bytes == pytest.approx(1e6 + 5e6)  # RSS: shared pages too


def test_cpu_per_new_connection() -> None:
    sched = [1 + i / 100 for i in range(100)]  # 100 connections during second 1..2
    connected = [x + 0.001 for x in sched]
    procs = [
        {
            "t": float(s),
            "host": "h",
            "pid": 1,
            "role": "server",
            "cpu_percent": 50.0,
            "rss": 1.0,
            "uss": 1.0,
        }
        for s in range(6)
    ]
    t = make_tables(connections=conns(sched, connected), monitor_procs=pd.DataFrame(procs))
    s = stats.summarize(t, {})
    # window (1.0, 2.991]: samples at t=2 only (0.5 s CPU) → 5 ms per connection
    assert s["server_cpu_us_per_conn"] == pytest.approx(0.5 / 100 * 1e6)
    assert s["server_cpu_percent_mean"] == pytest.approx(50.0)


def test_agent_stream_fallback_without_connection_records() -> None:
    rows = []
    for a, agent in enumerate(("a0", "a1")):
        for s in range(5):
            n = min(s, 3) * 100
            rows.append(
                {
                    "t": 100.0 + s + a * 0.1,
                    "host": "h",
                    "agent": agent,
                    "planned": n,
                    "started": n,
                    "connected": n,
                    "open": n,
                    "failed_refused": s,
                    "lost": 1,
                    "saturated": s == 4,
                    "lag_ms": 0.1,
                }
            )
    t = make_tables(agent=pd.DataFrame(rows))
    s = stats.summarize(t, {})
    assert s["peak_connections"] == 600
    assert s["connect_errors"] == 8
    assert s["messages_lost"] == 2
    assert s["agent_saturated"] is True
    assert s["ramp_rate_mean_per_s"] == pytest.approx(200)
    assert s["ramp_rate_min_per_s"] is None  # no whole seconds without records
    frame = stats.connections_frame(t)
    assert frame[frame["series"] == "total"]["connections"].max() == 600


def test_empty_folder_summarizes_to_nothing_measured(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"outcome": "interrupted"}))
    t = stats.load_tables(tmp_path)
    s = stats.summarize(t, t.run)
    # nothing measured reads as unknown, never as zero errors or zero lost: a threshold on
    # any of them then fails ("not measured") instead of passing on a run that did nothing
    for key in (
        "peak_connections",
        "connect_errors",
        "messages_lost",
        "messages_received",
        "messages_untimed",
        "agent_saturated",
        "ramp_whole_seconds",
        "server_bytes_per_conn",
        "ramp_rate_min_per_s",
    ):
        assert s[key] is None, key
    (verdict,) = stats.evaluate_thresholds(s, [{"name": "messages_lost", "op": "==", "value": 0}])
    assert verdict["passed"] is False and verdict["actual"] is None
    json.dumps(s)
    for frame in (
        stats.rate_frame(t),
        stats.memory_frame(t),
        stats.errors_frame(t),
        stats.latency_frame(t),
        stats.delivery_frame(t),
        stats.connections_frame(t),
    ):
        assert frame.empty


def test_load_tables_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(stats.StatsError, match="does not exist"):
        stats.load_tables(tmp_path / "nope")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(stats.StatsError, match="not valid JSON"):
        stats.load_tables(tmp_path)


def test_evaluate_thresholds() -> None:
    summary = {"peak_connections": 64000, "connect_errors": 0, "delivery_ms_p99": None}
    results = stats.evaluate_thresholds(
        summary,
        [
            {"name": "peak_connections", "op": ">=", "value": 64000},
            {"name": "connect_errors", "op": "==", "value": 1},
            {"name": "delivery_ms_p99", "op": "<=", "value": 600},
        ],
    )
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[0] == {
        "name": "peak_connections",
        "op": ">=",
        "value": 64000,
        "actual": 64000,
        "passed": True,
    }
    with pytest.raises(stats.StatsError, match="unknown operator"):
        stats.evaluate_thresholds(summary, [{"name": "connect_errors", "op": "=~", "value": 0}])
    with pytest.raises(stats.StatsError, match="not a summary field"):
        stats.evaluate_thresholds(summary, [{"name": "nope", "op": "==", "value": 0}])


def test_thresholds_accept_experiment_threshold_objects() -> None:
    from lab.experiment import Threshold

    result = stats.evaluate_thresholds(
        {"connect_errors": 0}, [Threshold("connect_errors", "==", 0)]
    )
    assert result[0]["passed"] is True


def test_summary_rows_show_planned_achieved_and_verdicts(synthetic: Tables) -> None:
    s = stats.summarize(synthetic, synthetic.run)
    verdicts = stats.evaluate_thresholds(s, [{"name": "connect_errors", "op": "==", "value": 0}])
    rows = summary_table.summary_rows(s, verdicts).set_index("figure")
    assert rows.loc["connect errors", "threshold"] == "FAIL (== 0)"
    assert rows.loc["peak simultaneous connections", "planned"] == "1,000"
    assert rows.loc["peak simultaneous connections", "achieved"] == "997"
    assert rows.loc["server memory per connection", "achieved"] == "4.88"  # KiB
    assert rows.loc["errors: refused", "achieved"] == "3"


def test_compare_rows_and_host_differences() -> None:
    a = {"peak_connections": 1000, "server_bytes_per_conn": 4096.0, "agent_saturated": False}
    b = {"peak_connections": 2000, "server_bytes_per_conn": 2048.0, "agent_saturated": True}
    rows = summary_table.compare_rows([("A", a), ("B", b)]).set_index("figure")
    assert rows.loc["peak simultaneous connections", "B ÷ first"] == "2.00×"
    assert rows.loc["server memory per connection", "B ÷ first"] == "0.50×"
    assert rows.loc["agent saturated", "B ÷ first"] == ""

    def record(cpu: str, somaxconn: int) -> dict[str, Any]:
        meta = {"cpu_model": cpu, "kernel": "6.1", "sysctls": {"net.core.somaxconn": somaxconn}}
        return {"hosts": [{"name": "local", "metadata": meta}]}

    assert (
        summary_table.host_differences([("A", record("X", 4096)), ("B", record("X", 4096))]) == []
    )
    warnings = summary_table.host_differences([("A", record("X", 4096)), ("B", record("Y", 128))])
    assert len(warnings) == 2
    assert any("CPU model" in w and "'Y'" in w for w in warnings)
    assert any("net.core.somaxconn" in w for w in warnings)


def test_environment_frame(synthetic: Tables) -> None:
    env = summary_table.environment_frame(synthetic.run).set_index("item")
    assert env.loc["cpu_model", "local"] == "Test CPU"
    assert env.loc["sysctls: net.core.somaxconn", "local"] == "4096"
    assert env.loc["git_commit", "controller"] == "0" * 40


def test_the_total_is_drawn_when_the_agents_reported_it() -> None:
    # one agent reporting at x.85 s: its line and the total are the same points, at the same
    # times (not floored to the second, which drew the total 0.85 s early)
    agent = pd.DataFrame({"t": [100.85, 101.85, 102.85], "agent": ["a0"] * 3, "open": [10, 20, 30]})
    server = pd.DataFrame(
        {"t": [101.4, 101.4, 102.4, 102.4], "worker": [0, 1, 0, 1], "online": [5, 5, 10, 10]}
    )
    frame = stats.connections_frame(make_tables(agent=agent, server=server))
    by = {s: f.sort_values("elapsed_s") for s, f in frame.groupby("series")}
    assert by["total"]["elapsed_s"].tolist() == by["a0"]["elapsed_s"].tolist()
    assert by["total"]["connections"].tolist() == [10, 20, 30]
    online = by["server online"]
    assert online["connections"].tolist() == [10, 20]  # summed over the workers
    first = online["elapsed_s"].iloc[0] - by["a0"]["elapsed_s"].iloc[0]
    assert abs(first - 0.55) < 1e-9  # at the workers' report time, 101.4 s


def test_compare_names_what_differs_besides_the_hosts() -> None:
    def record(name: str, rate: int, commit: str, overrides: dict[str, str]) -> dict:
        return {
            "experiment": {"name": name, "resolved": {"phases": [{"rate_per_s": rate}]}},
            "overrides": overrides,
            "controller": {"git_commit": commit, "git_dirty": False},
        }

    same = record("smoke", 1000, "abc123456789", {})
    assert summary_table.run_differences([("A", same), ("B", dict(same))]) == []
    found = summary_table.run_differences(
        [("A", same), ("B", record("c64k", 2500, "def987654321", {"agents.procs": "4"}))]
    )
    assert "experiment — B: 'c64k', A: 'smoke'" in found
    assert "experiment settings — differ" in found
    assert any(f.startswith("overrides — B: ") for f in found)
    assert "lab commit — B: 'def987654', A: 'abc123456'" in found
