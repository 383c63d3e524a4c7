"""A small results folder in the documented format (results/README.md), built without running
anything: for the stats, report, notebook and publish tests, where known inputs give known
answers. The real pipeline's folders are tested by the smoke-run tests.

The run: two agents on host ``local`` open ``CONNS`` connections at ``RATE_PER_S`` (uniform),
hold them ``HOLD_S`` seconds and close them; ``REFUSED`` of them are refused. The server's
memory grows by ``SERVER_BYTES`` per open connection, the agents' by ``AGENT_BYTES``, the
kernel's by ``KERNEL_BYTES``. Every message published reaches every connection after
``DELIVERY_MS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

START = 1_764_172_800.0  # run start (unix s)
RAMP_AT = START + 2.0  # first scheduled connection
CONNS = 1_000
RATE_PER_S = 250.0
HOLD_S = 4.0
REFUSED = 3
CONNECT_MS = 2.0
SERVER_BYTES = 5_000.0
AGENT_BYTES = 3_000.0
KERNEL_BYTES = 8_000.0
DELIVERY_MS = 30.0
FANOUT_MS = 100.0  # a worker's fan-out of message N takes FANOUT_MS + N (+1 on worker 1)
DURATION_S = 14
HOST = "local"
AGENTS = ("agent-0", "agent-1")


def build_connections() -> pd.DataFrame:
    i = np.arange(CONNS)
    scheduled = RAMP_AT + i / RATE_PER_S
    started = scheduled + 0.0005
    refused = np.zeros(CONNS, dtype=bool)
    refused[[10, 500, 900]] = True
    connected = np.where(refused, np.nan, started + CONNECT_MS / 1000.0 - 0.0005)
    close_at = RAMP_AT + CONNS / RATE_PER_S + HOLD_S
    closed = np.where(refused, np.nan, close_at + i / 1000.0)
    return pd.DataFrame(
        {
            "host": HOST,
            "agent": [AGENTS[k % 2] for k in i],
            "proc": i % 2,
            "conn": i,
            "scheduled": scheduled,
            "started": started,
            "connected": connected,
            "closed": closed,
            "outcome": np.where(refused, "refused", "ok"),
            "connect_ms": (connected - scheduled) * 1000.0,
        }
    )


def open_at(conns: pd.DataFrame, t: float) -> int:
    return int(((conns["connected"] <= t) & ~(conns["closed"] <= t)).sum())


def build(folder: Path, *, name: str = "synthetic", cpu_model: str = "Test CPU") -> Path:
    """Write the folder (run.json, the six tables, raw/ and logs/) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    conns = build_connections()
    conns.to_parquet(folder / "connections.parquet")
    seconds = [START + s + 0.5 for s in range(DURATION_S)]
    agent_rows, server_rows, host_rows, cpu_rows, proc_rows = [], [], [], [], []
    raw_lines: dict[str, list[str]] = {a: [] for a in AGENTS}
    published = 0
    message_id = 0  # the latest broadcast's id
    received = [0.0, 0.0]  # messages each agent received so far
    for t in seconds:
        for k, agent in enumerate(AGENTS):
            mine = conns[conns["agent"] == agent]
            opened = int((mine["connected"] <= t).sum())
            closed = int((mine["closed"] <= t).sum())
            failed = int(((mine["outcome"] == "refused") & (mine["started"] <= t)).sum())
            msgs = int(received[k])
            row = {
                "t": t,
                "host": HOST,
                "agent": agent,
                "elapsed_s": t - START,
                "planned": int((mine["scheduled"] <= t).sum()),
                "started": int((mine["started"] <= t).sum()),
                "connected": opened,
                "open": opened - closed,
                "closed": closed,
                "failed_refused": failed,
                "failed_timeout": 0,
                "failed_reset": 0,
                "failed_no_port": 0,
                "failed_no_files": 0,
                "failed_http": 0,
                "failed_other": 0,
                "msgs_in": msgs,
                "msgs_out": 0,
                "bytes_in": msgs * 64,
                "bytes_out": 0,
                "lost": 0,
                "dup": 0,
                "reordered": 0,
                "untimed": k,  # agent k: k of its messages without an arrival time
                "lag_ms": 0.5,
                "cpu_percent": 20.0 + k,
                "uss": 20e6 + AGENT_BYTES * (opened - closed),
                "saturated": False,
                "connect_p50_ms": CONNECT_MS if opened else np.nan,
                "connect_p99_ms": CONNECT_MS if opened else np.nan,
                "connect_max_ms": CONNECT_MS if opened else np.nan,
                "delivery_p50_ms": DELIVERY_MS if published else np.nan,
                "delivery_p99_ms": DELIVERY_MS if published else np.nan,
                "delivery_max_ms": DELIVERY_MS if published else np.nan,
            }
            agent_rows.append(row)
            delivered = opened - closed if published else 0
            raw_lines[agent].append(
                json.dumps(
                    {
                        "kind": "agent",
                        "t": t,
                        "agent": agent,
                        "connect_hist": {"unit": "us", "buckets": []},
                        "delivery_hist": {
                            "unit": "us",
                            "buckets": [[_bucket(int(DELIVERY_MS * 1000)), delivered]]
                            if delivered
                            else [],
                        },
                    }
                )
            )
        open_now = open_at(conns, t)
        # one message to every open connection per second during the hold
        published = 1 if RAMP_AT + 4 < t < RAMP_AT + 4 + HOLD_S else 0
        received[:] = [r + published * open_now / 2 for r in received]
        message_id += published
        for worker in (0, 1):
            events = int((conns["connected"] <= t).sum() // 2)
            server_rows.append(
                {
                    "t": t,
                    "host": HOST,
                    "worker": worker,
                    "pid": 100 + worker,
                    "uptime_s": int(t - START),
                    "online": open_now // 2 + worker * (open_now % 2),
                    "events": events * (2 if worker == 0 else 1),
                    "connects": events,
                    "messages": 0,
                    "closes": 0,
                    "pcs": int(RATE_PER_S / 2),
                    "restarts": 0,
                    # the latest broadcast each worker wrote: FANOUT_MS + the message id
                    "fanout_ms": float(FANOUT_MS + message_id + worker) if message_id else 0.0,
                    "fanout_subscribers": open_now // 2 if message_id else 0,
                    "fanout_id": message_id,
                    "fanout_c": message_id * 10,
                }
            )
        host_rows.append(
            {
                "t": t,
                "host": HOST,
                "mem_total": 24e9,
                "mem_used": 2e9 + 20e3 * open_now,
                "mem_available": 22e9,
                "tcp_inuse": 2 * open_now,
                "tcp_orphan": 0,
                "tcp_tw": 7,
                "tcp_alloc": 2 * open_now,
                "tcp_mem_bytes": KERNEL_BYTES / 2 * open_now,
                "tcp_slab_bytes": KERNEL_BYTES / 2 * open_now,
                "self_cpu_percent": 0.3,
            }
        )
        for core in (0, 1):
            cpu_rows.append({"t": t, "host": HOST, "core": core, "cpu_percent": 40.0 + core})
        procs = [
            (100, "server", 30.0, 30e6 + SERVER_BYTES / 2 * open_now),
            (101, "server", 10.0, 30e6 + SERVER_BYTES / 2 * open_now),
            (200, "agent", 20.0, 20e6 + AGENT_BYTES / 2 * open_now),
            (201, "agent", 21.0, 20e6 + AGENT_BYTES / 2 * open_now),
            (300, "monitor", 0.3, 15e6),
        ]
        for pid, role, cpu, uss in procs:
            proc_rows.append(
                {
                    "t": t,
                    "host": HOST,
                    "pid": pid,
                    "role": role,
                    "cpu_percent": cpu,
                    "rss": uss + 10e6,  # shared pages: the same slope
                    "uss": uss,
                    "num_fds": 10 + pid,
                    "threads": 1,
                }
            )
    pd.DataFrame(agent_rows).to_parquet(folder / "agent.parquet")
    pd.DataFrame(server_rows).to_parquet(folder / "server.parquet")
    pd.DataFrame(host_rows).to_parquet(folder / "monitor_host.parquet")
    pd.DataFrame(cpu_rows).to_parquet(folder / "monitor_cpu.parquet")
    pd.DataFrame(proc_rows).to_parquet(folder / "monitor_procs.parquet")
    raw = folder / "raw" / HOST
    raw.mkdir(parents=True, exist_ok=True)
    for agent, lines in raw_lines.items():
        (raw / f"{agent}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "logs").mkdir(exist_ok=True)
    record = {
        "schema_version": 1,
        "run_id": folder.name,
        "created": START,
        "experiment": {
            "path": "experiments/synthetic.yaml",
            "name": name,
            "resolved": {
                "name": name,
                "phases": [
                    {"kind": "ramp", "rate_per_s": RATE_PER_S, "until_connections": CONNS},
                    {"kind": "hold", "hold_s": HOLD_S},
                    {"kind": "close", "close_rate_per_s": 1000.0},
                ],
            },
        },
        "overrides": {},
        "inventory": [{"name": HOST, "address": "127.0.0.1"}],
        "hosts": [
            {
                "name": HOST,
                "clock_offset_s": 0.0,
                "metadata": {
                    "python": "3.11.2",
                    "kernel": "6.1.0-test",
                    "cpu_model": cpu_model,
                    "cpu_count": 2,
                    "mem_total": 24e9,
                    "sysctls": {"net.core.somaxconn": 4096},
                    "rlimits": {"nofile": [20000, 20000]},
                    "packages": {"websockets": "13.0"},
                },
            }
        ],
        "controller": {"git_commit": "0" * 40, "git_dirty": False, "packages": {}},
        "outcome": "completed",
        "reason": "",
        "started": START,
        "ended": START + DURATION_S,
        "thresholds": [],
        "summary": {},
    }
    (folder / "run.json").write_text(json.dumps(record, indent=2))
    return folder


def _bucket(value_us: int) -> int:
    from lab.histogram import bucket_index

    return bucket_index(value_us)


ROOT = Path(__file__).resolve().parent.parent
_SMOKE: dict[str, Any] = {}


def smoke_run(tmp_path_factory: Any) -> Path:
    """A real ``experiments/smoke.yaml`` run (the embedded local host), made once per test
    session and shared by the notebook and publish tests. Fails when the run does not
    complete, naming its reason."""
    if "folder" not in _SMOKE:
        if "error" in _SMOKE:
            raise AssertionError(_SMOKE["error"])
        from lab.run import execute

        root = tmp_path_factory.mktemp("smoke-results")
        try:
            folder = execute(ROOT / "experiments" / "smoke.yaml", {}, None, root, "text")
        except BaseException as exc:
            _SMOKE["error"] = f"the smoke run raised {exc!r}"
            raise
        record = json.loads((folder / "run.json").read_text())
        if record.get("outcome") != "completed":
            _SMOKE["error"] = (
                f"the smoke run in {folder} ended {record.get('outcome')}: {record.get('reason')}"
            )
            raise AssertionError(_SMOKE["error"])
        _SMOKE["folder"] = folder
    return Path(_SMOKE["folder"])


def published_smoke(tmp_path_factory: Any) -> Path:
    """A copy of the smoke run published once (``lab.publish.publish_run``: run.ipynb executed,
    report.html, index.html), shared by the notebook and publish tests."""
    if "published" not in _SMOKE:
        import shutil

        from lab.publish import publish_run

        source = smoke_run(tmp_path_factory)
        copy = tmp_path_factory.mktemp("published") / source.name
        shutil.copytree(source, copy)
        publish_run(copy)
        _SMOKE["published"] = copy
    return Path(_SMOKE["published"])


def compared(tmp_path_factory: Any) -> Path:
    """``lab compare`` once on the smoke run and a constructed run on another CPU model: the
    HTML page (its executed notebook beside it, same name with .ipynb)."""
    if "compared" not in _SMOKE:
        from lab.publish import compare_main

        folder = tmp_path_factory.mktemp("compare")
        other = build(folder / "constructed", cpu_model="Another CPU")
        out = folder / "compare.html"
        runs = [str(smoke_run(tmp_path_factory)), str(other)]
        assert compare_main([*runs, "--out", str(out)], prog="lab compare") == 0
        _SMOKE["compared"] = out
    return Path(_SMOKE["compared"])
