"""Run folders and the Parquet tables, built from files the real roles wrote."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from lab.agent.records import Outcome, Records
from lab.histogram import bucket_index
from lab.results import TABLES, RunFolder, build_tables

PY = sys.executable
CONNS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling a condition with a deadline
    raise AssertionError(f"{url} never healthy")


@pytest.fixture(scope="module")
def real_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw/local/ as the real monitor, server and agent wrote it in a short run."""
    raw = tmp_path_factory.mktemp("run") / "raw" / "local"
    raw.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "COMET_LAB_RUN_ID": f"test-results-{os.getpid()}"}  # this run only
    roles = dict(cwd=raw, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    mon = subprocess.Popen(
        [
            PY,
            "-m",
            "lab.monitor",
            "--interval",
            "0.5",
            "--duration",
            "60",
            "--out",
            "monitor.jsonl",
        ],
        **roles,  # type: ignore[call-overload]
    )
    srv = subprocess.Popen(
        [
            PY,
            "-m",
            "lab.comet",
            "--port",
            str(port),
            "--workers",
            "1",
            "--quiet",
            "--max-connections",
            "1000",
            "--out",
            "server.jsonl",
        ],
        **roles,  # type: ignore[call-overload]
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", srv)
        subprocess.run(
            [
                PY,
                "-m",
                "lab.agent",
                "--url",
                f"ws://127.0.0.1:{port}/ws?channel=c",
                "--rate",
                "200",
                "--connections",
                str(CONNS),
                "--hold",
                "1.5",
                "--procs",
                "1",
                "--publish-url",
                f"http://127.0.0.1:{port}/pub/c",
                "--publish-rate",
                "4",
                "--publish-count",
                "3",
                "--publish-delay",
                "0.7",
                "--max-duration",
                "60",
                "--agent-id",
                "agent-0",
                "--out",
                "agent-0.jsonl",
                "--records",
                "agent-0.rec",
                "--quiet",
            ],
            cwd=raw,
            env=env,
            stdout=subprocess.DEVNULL,
            timeout=90,
            check=True,
        )
        # let the server and monitor write a line after the agent is done
        end = time.monotonic() + 10
        while time.monotonic() < end and '"online":0' not in (raw / "server.jsonl").read_text():
            time.sleep(0.1)
    finally:
        for p in (srv, mon):
            p.send_signal(signal.SIGTERM)
        for p in (srv, mon):
            p.wait(timeout=30)
    return raw.parent.parent


def test_tables_from_real_roles(real_raw: Path) -> None:
    paths = build_tables(real_raw, {"local": 0.0})
    assert sorted(p.name for p in paths) == sorted(f"{t}.parquet" for t in TABLES)
    tables = {p.stem: pd.read_parquet(p) for p in paths}
    for name, df in tables.items():
        assert list(df.columns) == list(TABLES[name]), name
    agent = tables["agent"]
    end = agent[agent["end"]].iloc[-1]
    assert end["connected"] == CONNS and end["failed_refused"] == 0 and end["lost"] == 0
    assert agent["connect_p50_ms"].notna().any() and agent["delivery_max_ms"].notna().any()
    server = tables["server"]
    assert server["connects"].max() >= CONNS and (server["worker"] == 0).all()
    # which publish a fan-out figure belongs to
    assert (
        server["fanout_id"].max() >= 1
        and server.loc[server["fanout_id"] > 0, "fanout_ms"].gt(0).all()
    )
    procs = tables["monitor_procs"]
    assert {"server", "agent", "monitor"} <= set(procs["role"])
    assert procs["uss"].notna().any() and procs["num_fds"].max() > 0
    assert len(tables["monitor_cpu"]) == len(tables["monitor_host"]) * os.cpu_count()
    conns = tables["connections"]
    assert len(conns) == CONNS and (conns["outcome"] == "ok").all()
    assert (conns["agent"] == "agent-0").all() and sorted(conns["conn"]) == list(range(CONNS))
    assert (conns["connect_ms"] > 0).all()


def test_clock_offsets_correct_times(real_raw: Path, tmp_path: Path) -> None:
    build_tables(real_raw, {"local": 0.0})
    before = {t: pd.read_parquet(real_raw / f"{t}.parquet") for t in ("agent", "connections")}
    build_tables(real_raw, {"local": 2.5})  # host clock 2.5 s ahead of the controller
    after = {t: pd.read_parquet(real_raw / f"{t}.parquet") for t in ("agent", "connections")}
    assert (before["agent"]["t"] - after["agent"]["t"]).round(6).eq(2.5).all()
    diff = before["connections"]["connected"] - after["connections"]["connected"]
    assert diff.round(6).eq(2.5).all()
    assert before["connections"]["connect_ms"].equals(after["connections"]["connect_ms"])


def test_partial_and_missing_data(tmp_path: Path) -> None:
    """An interrupted run: a truncated line, a half-written .rec, no server, no monitor."""
    folder = RunFolder.create(tmp_path, "partial")
    raw = folder.host_raw_dir("a1")
    line = {"kind": "agent", "t": 100.0, "agent": "agent-1", "elapsed_s": 1.0, "planned": 10,
            "started": 10, "connected": 9, "open": 9, "closed": 0,
            "failed": {"refused": 1}, "procs": [{"pid": 1, "cpu_percent": 5.0, "uss": 1000},
                                                  {"pid": 2, "cpu_percent": None, "uss": 500}],
            "connect_hist": {"unit": "us", "buckets": [[bucket_index(300), 9]]}}  # fmt: skip
    (raw / "agent-1.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line)[:40])
    rec = Records(4, agent="agent-1")
    rec.scheduled[0], rec.connected[0], rec.outcome[0] = 100.0, 100.002, Outcome.OK
    rec.save(raw / "agent-1.rec")
    data = (raw / "agent-1.rec").read_bytes()
    (raw / "agent-1.rec").write_bytes(data[: len(data) - 2])  # cut mid-column
    (raw / "agent-2.rec").write_bytes(b"garbage")
    paths = build_tables(folder.path, {})
    assert len(paths) == len(TABLES)
    agent = pd.read_parquet(folder.path / "agent.parquet")
    assert len(agent) == 1 and agent["failed_refused"].iloc[0] == 1
    assert agent["failed_timeout"].iloc[0] == 0 and agent["uss"].iloc[0] == 1500
    # a process without a CPU figure yet (its first line): no partial sum that reads as a dip
    assert pd.isna(agent["cpu_percent"].iloc[0])
    assert math.isclose(agent["connect_p50_ms"].iloc[0], 0.3, rel_tol=0.01)
    assert pd.read_parquet(folder.path / "server.parquet").empty
    conns = pd.read_parquet(folder.path / "connections.parquet")
    assert len(conns) == 2 and conns["outcome"].iloc[0] == "ok"
    assert math.isclose(conns["connect_ms"].iloc[0], 2.0)
    assert "agent-2.rec" in (folder.logs_dir / "build_tables.log").read_text()
    assert build_tables(tmp_path / "no-such-run", {})[0].exists() is True  # no raw/: empty tables


def test_run_folder_and_atomic_run_json(tmp_path: Path) -> None:
    now = 1764172800.0
    a = RunFolder.create(tmp_path, "smoke", now=now)
    b = RunFolder.create(tmp_path, "smoke", now=now)
    assert a.run_id == "20251126-160000-smoke" and b.run_id == a.run_id + "-2"
    assert a.raw_dir.is_dir() and a.logs_dir.is_dir()
    # results/latest: the newest run (notebooks/report.ipynb's default), listed once
    assert (tmp_path / "latest").resolve() == b.path.resolve()
    b.write_run_json({"schema_version": 1, "outcome": "completed"})
    from lab.publish import index_rows

    assert [r["run_id"] for r in index_rows(tmp_path)] == [b.run_id]
    a.write_run_json({"schema_version": 1, "outcome": "running", "summary": {"x": math.nan}})
    a.write_run_json({"schema_version": 1, "outcome": "completed", "summary": {"x": 1.5}})
    assert RunFolder.open(a.path).read_run_json()["outcome"] == "completed"
    assert [p.name for p in a.path.iterdir() if p.name.startswith(".")] == []
    a.write_run_json({"summary": {"x": math.inf}})
    assert json.loads(a.run_json.read_text())["summary"]["x"] is None
