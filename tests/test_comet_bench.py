"""bench/bench_comet.py runs end to end at a tiny size and prints every figure (the figures
themselves are performance, reported by the benchmark, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import require

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_comet.py"


def bench(*args: str) -> tuple[list[str], dict[str, Any]]:
    """Run bench_comet with ``args``; its stdout lines and its closing JSON figures."""
    result = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    return lines, json.loads(lines[-1])


def test_bench_comet_prints_its_figures() -> None:
    lines, figures = bench("-n", "60", "-w", "1", "--accept-connections", "60", "--rounds", "2")
    assert any(
        line.startswith("lab.comet accept+upgrade, 1 worker: 60 connections") for line in lines
    )
    assert any("KiB summed worker USS per connection" in line for line in lines)
    assert figures["kind"] == "bench_comet"
    assert figures["connections"] == 60 and figures["broadcast_delivered_min"] == 60
    for key in ("accept_rate_per_s", "broadcast_all_ms", "fanout_ms"):  # NaN fails too
        assert figures[key] > 0
    assert figures["accept_cpu_us_per_conn"] >= 0  # CPU time ticks are 10 ms
    assert isinstance(figures["uss_per_conn_bytes"], float)  # may be ~0 at this size
    # 60 subscribers in one worker: sent by its C loop (channels of 32 or more), 2 rounds
    assert figures["fanout_c"] == 2 * 60 and any("; its loop in C)" in line for line in lines)


def test_bench_comet_measures_nginx_nchan_the_same_way() -> None:
    require("nginx", "bench_comet --server nchan")
    require("nchan", "bench_comet --server nchan (libnginx-mod-nchan)")
    lines, figures = bench(
        "--accept-repeats", "1", "--server", "nchan", "-n", "60", "-w", "2",
        "--accept-connections", "60", "--rounds", "2", "--client-mode", "after",
    )  # fmt: skip
    assert any(
        line.startswith("nginx + nchan accept+upgrade, 1 worker: 60 connections") for line in lines
    )
    assert figures["server"] == "nginx + nchan"
    assert figures["connections"] == 60 and figures["broadcast_delivered_min"] == 60
    assert figures["online_seen"] == 60  # from nchan's own status page
    nginx_left = [
        p.pid for p in psutil.process_iter(["cmdline"]) if "bench-nchan-" in " ".join(
            p.info["cmdline"] or [])
    ]  # fmt: skip
    assert nginx_left == []


def test_bench_comet_floor_server_is_accept_only() -> None:
    lines, figures = bench(
        "--accept-repeats", "1", "--server", "bare", "-n", "0", "--accept-connections", "60"
    )
    assert any(
        line.startswith("bare uvloop (floor) accept+upgrade, 1 worker: 60 connections")
        for line in lines
    )
    assert figures["accept_connections"] == 60 and figures["accept_failed"] == 0
    assert not any("broadcast" in line for line in lines)  # -n 0: the accept test only
