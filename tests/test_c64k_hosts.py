"""experiments/c64k-hosts.yaml with experiments/inventory-netns.yaml, as they are, on the
network-namespace hosts that inventory describes (real OpenSSH, tests/netns.py): `lab doctor`
says the full 64k plan fits and names the fix when the source addresses are taken away, and
`lab run` completes the same experiment at reduced scale (-p overrides only) with both agent
hosts connecting, the server host accepting every connection and nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.deploy import cache_dir
from lab.inventory import load_inventory
from tests.conftest import require, require_root
from tests.netns import netns_inventory_hosts
from tests.test_run import run_processes, tables_with_rows

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "c64k-hosts.yaml"
INVENTORY = ROOT / "experiments" / "inventory-netns.yaml"
CONNECTIONS = 3000
# The same experiment at a scale two shared cores run in seconds. The ramp-rate threshold is
# not what this test is about (bench/ measures rates), so it is relaxed; the others stay.
REDUCED = {
    "phases.0.rate_per_s": "1500",
    "phases.0.until_connections": str(CONNECTIONS),
    "phases.1.hold_s": "2",
    "phases.2.close_rate_per_s": "3000",
    "max_duration_s": "90",
    "thresholds.0.value": str(CONNECTIONS),
    "thresholds.2.value": "0",
}


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The inventory's hosts as namespace hosts; yields the environment `lab` runs with: a HOME
    holding the inventory's key_file and known_hosts, the real deploy cache."""
    require("sshd", "OpenSSH test hosts")
    require("ip", "network namespaces")
    require_root("ip netns")
    tmp = tmp_path_factory.mktemp("c64k-netns")
    home = tmp / "home"
    source_ips = yaml.safe_load(EXPERIMENT.read_text())["agents"]["source_ips"]
    workdirs = [Path(h.workdir) for h in load_inventory(INVENTORY)]
    ours = [w for w in workdirs if not w.exists()]
    env = {**os.environ, "HOME": str(home), "COMET_LAB_CACHE": str(cache_dir())}
    env.pop("SSH_AUTH_SOCK", None)
    try:
        with netns_inventory_hosts(INVENTORY, tmp, home, source_ips) as hosts:
            assert [h.name for h in hosts] == ["srv", "a1", "a2"]
            yield env
    finally:
        for w in ours:
            shutil.rmtree(w, ignore_errors=True)


def lab(env: dict[str, str], module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def params(overrides: dict[str, str]) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("-p", f"{k}={v}")]


def test_doctor_says_the_full_plan_fits_and_names_the_fix(lab_env: dict[str, str]) -> None:
    done = lab(lab_env, "lab.doctor", str(EXPERIMENT))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "OK    plan       capacity                 64000 connections" in out, out
    assert "--source-ips 198.18.0.11,198.18.0.21" in out, out
    assert "--source-ips 198.18.0.12,198.18.0.22" in out, out
    # one address per agent host is not enough for 32,000 to one destination: doctor says so
    done = lab(lab_env, "lab.doctor", str(EXPERIMENT), "-p", "agents.source_ips=auto")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "agents.source_ips.a1" in done.stdout, done.stdout


def server_counts(folder: Path) -> tuple[int, int]:
    """(connections the server accepted: each worker's cumulative count summed, most open at
    once: each worker's count in a whole second summed)."""
    import pandas as pd

    server = pd.read_parquet(folder / "server.parquet")
    accepted = int(server.groupby("pid")["connects"].max().sum())
    per_second = server.assign(second=server["t"].astype(float) // 1)
    online = per_second.groupby(["second", "pid"])["online"].max().groupby("second").sum()
    return accepted, int(online.max())


def test_reduced_c64k_hosts_run(lab_env: dict[str, str], tmp_path: Path) -> None:
    import pandas as pd

    done = lab(
        lab_env, "lab.run", str(EXPERIMENT), *params(REDUCED),
        "--results", str(tmp_path / "results"), "--no-report", "--progress", "text",
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    folder = Path(lines[-1])
    record: dict[str, Any] = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "completed", (record["reason"], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]  # every threshold passed
    assert record["overrides"] == REDUCED
    assert [h["name"] for h in record["inventory"]] == ["srv", "a1", "a2"]
    agents = {r["name"]: r for r in record["plan"] if r["role"] == "agent"}
    assert {r["host"] for r in agents.values()} == {"a1", "a2"}
    for r in agents.values():
        argv = " ".join(r["argv"])
        assert "--source-ips 198.18.0.1" in argv and ",198.18.0.2" in argv, argv
    summary = record["summary"]
    assert summary["peak_connections"] == CONNECTIONS
    assert summary["connect_errors"] == 0
    # both agent hosts contributed their half
    conns = pd.read_parquet(folder / "connections.parquet")
    ok = conns[conns["outcome"] == "ok"].groupby("host").size().to_dict()
    assert ok == {"a1": CONNECTIONS // 2, "a2": CONNECTIONS // 2}, ok
    # the server host accepted every one of them
    accepted, online = server_counts(folder)
    assert online == CONNECTIONS
    assert CONNECTIONS <= accepted <= CONNECTIONS + 5  # + the controller's /healthz probes
    assert set(pd.read_parquet(folder / "server.parquet")["host"]) == {"srv"}
    rows = tables_with_rows(folder)
    assert rows.get("monitor_host", 0) > 0, rows
    # nothing is left: teardown found nothing alive, and no process of the run exists anywhere
    # (no strays either: hosts sharing a kernel must not sweep each other's roles)
    for host in record["hosts"]:
        assert host["teardown"]["left"] == [] and host["teardown"]["strays"] == [], host
    assert run_processes(record["run_id"]) == {}
