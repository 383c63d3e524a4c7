"""The engine end to end with real roles over real SSH: the embedded default, OpenSSH hosts in
network namespaces, a host that drops out, and an interrupt. Each run is small (hundreds of
connections, seconds of load) and bounded by its experiment's max_duration_s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from lab.launch import mask_overrides, mask_secrets, role_command
from lab.plan import Role, RoleLaunch
from lab.run import exit_code, run_or_load
from tests.conftest import require, require_root
from tests.netns import NetnsHost, kill_sshd, netns_hosts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny.yaml"
TOKEN = "s3cret-publish-token"


# --- helpers ---------------------------------------------------------------------------------


def run_processes(run_id: str) -> dict[int, str]:
    """Every process on this machine (all namespaces) that belongs to the run: pid → cmdline."""
    marker = f"COMET_LAB_RUN_ID={run_id}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in env:
            found[int(pid)] = cmd.decode(errors="replace")
    return found


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def start_lab_run(args: list[str], results: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lab.run", *args, "--results", str(results), "--no-report",
         "--progress", "text"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_json_of(results: Path) -> dict[str, Any] | None:
    folders = (
        [p for p in results.iterdir() if (p / "run.json").is_file() and not p.is_symlink()]
        if results.exists()
        else []  # results/latest is a link to the run, not a second one
    )
    if len(folders) != 1:
        return None
    try:
        return json.loads((folders[0] / "run.json").read_text())
    except ValueError:  # caught mid-replace: try again
        return None


def agents_running(results: Path) -> dict[str, Any] | None:
    """run.json once the agents have been started and are alive."""
    record = run_json_of(results)
    if not record or "agents_start_at" not in record or time.time() < record["agents_start_at"]:
        return None
    procs = run_processes(record["run_id"])
    return record if any("lab.agent" in c for c in procs.values()) else None


def finish(proc: subprocess.Popen[str], timeout_s: float) -> tuple[int, Path, str]:
    out, err = proc.communicate(timeout=timeout_s)
    lines = out.strip().splitlines()
    assert lines, f"lab run printed nothing on stdout; stderr:\n{err}"
    return proc.returncode, Path(lines[-1]), err


def tables_with_rows(folder: Path) -> dict[str, int]:
    import pandas as pd

    return {p.stem: len(pd.read_parquet(p)) for p in folder.glob("*.parquet")}


# --- pure pieces -----------------------------------------------------------------------------


def test_role_command_runs_in_its_own_group_with_stderr_to_a_file() -> None:
    launch = RoleLaunch("h", Role.AGENT, "agent-0", ("--url", "ws://x/ws?a=b c"), None, "a.jsonl")
    cmd = role_command(launch, "/w/venv/bin/python", "/w/runs/r1", "r1", ["--start-at", "5"])
    assert cmd.startswith("cd /w/runs/r1 && COMET_LAB_RUN_ID=r1 ")
    assert "COMET_LAB_HOST=h " in cmd  # the sweep at teardown matches run and host
    assert "exec setsid -w sh -c" in cmd and "agent-0.pgid" in cmd and "@pgid" in cmd
    assert "-m lab.agent" in cmd and "agent-0.stderr.log" in cmd and "--start-at 5" in cmd
    external = RoleLaunch("h", Role.SERVER, "server", (), "nginx -g 'daemon off;'")
    assert "exec sh -c" in role_command(external, "py", "/d", "r1")


def test_secrets_are_masked_and_exit_codes_follow_outcome() -> None:
    assert mask_secrets(["--publish-token", "abc", "--rate", "5"]) == [
        "--publish-token", "***", "--rate", "5",
    ]  # fmt: skip
    assert mask_secrets(["-p", "server.publish_token=abc", "-p", "agents.procs=2"]) == [
        "-p", "server.publish_token=***", "-p", "agents.procs=2",
    ]  # fmt: skip
    assert mask_overrides({"server.publish_token": "abc", "agents.procs": "2"}) == {
        "server.publish_token": "***", "agents.procs": "2",
    }  # fmt: skip
    passed = [{"passed": True}]
    assert exit_code({"outcome": "completed", "thresholds": passed}) == 0
    assert exit_code({"outcome": "completed", "thresholds": [{"passed": False}]}) == 1
    assert exit_code({"outcome": "failed", "thresholds": passed}) == 1
    assert exit_code({"outcome": "interrupted"}) == 130


def test_a_servers_own_publish_token_is_masked_in_the_fetched_logs(tmp_path: Path) -> None:
    from lab.engine import _mask_tokens

    log = tmp_path / "srv-server.log"
    log.write_text("lab.comet: listening\nlab.comet: publish token: Zx-9_secret\nnext line\n")
    _mask_tokens(log)
    assert log.read_text() == "lab.comet: listening\nlab.comet: publish token: ***\nnext line\n"


def test_bad_experiment_fails_before_any_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [{rate_per_s: 10, until_connections: 10}]\nserver: {wrokers: 2}\n")
    proc = start_lab_run([str(bad)], tmp_path / "results")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "server.wrokers" in err and "workers" in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# --- the embedded default --------------------------------------------------------------------


def test_embedded_default_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the notebook's entry point, into a folder it names (the CLI is exercised below)
    given = tmp_path / "results" / "given-run"
    folder = run_or_load(TINY, results_dir=given)
    assert folder == given
    record = json.loads((folder / "run.json").read_text())
    progress = capsys.readouterr().out
    assert record["outcome"] == "completed", (record["reason"], progress[-3000:])
    assert exit_code(record) == 0
    assert "server healthy" in progress and "connected 200/200" in progress
    rows = tables_with_rows(folder)
    assert sum(1 for n in rows.values() if n > 0) >= 3, rows
    assert record["summary"]["peak_connections"] >= 200
    assert record["summary"]["connect_errors"] == 0
    assert record["summary"]["messages_received"] == 200 * 5  # every broadcast to everyone
    assert all(t["passed"] for t in record["thresholds"])
    assert {r["name"] for r in record["roles"]} == {"monitor@local", "server", "agent-0"}
    assert all(r["pgid"] for r in record["roles"])
    assert (folder / "raw" / "local" / "agent-0.jsonl").is_file()
    assert (folder / "logs" / "local-server.log").is_file()
    host = record["hosts"][0]
    assert host["metadata"]["python"] and "clock_offset_s" in host
    checks = {c["check"]: c["level"] for c in host["checks"]}  # lab doctor's, made by the run
    assert checks["python"] == checks["open files (nofile)"] == "ok", checks
    assert host["teardown"]["left"] == []
    assert run_processes(record["run_id"]) == {}
    # a folder that holds a run is loaded, not run again
    assert run_or_load(TINY, results_dir=given) == given
    assert json.loads((given / "run.json").read_text())["run_id"] == record["run_id"]


def make_time_wait(n: int) -> None:
    """Leave ``n`` loopback connections in TIME_WAIT (each closed by its client first)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(n)
        for _ in range(n):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            client.close()
            assert server.recv(1) == b""  # the client's FIN is in
            server.close()


def test_a_run_first_waits_for_an_earlier_runs_time_wait_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lab.engine
    from lab.limits import time_wait_sockets

    make_time_wait(60)
    limit = time_wait_sockets() - 30  # lower than what the host has now, whatever else ran
    monkeypatch.setattr(lab.engine, "SETTLE_TIME_WAIT", limit)
    monkeypatch.setattr(lab.engine, "SETTLE_TIMEOUT_S", 1.0)  # they last 60 s: do not wait it out
    t0 = time.monotonic()
    folder = run_or_load(TINY, results_dir=tmp_path / "run")
    record = json.loads((folder / "run.json").read_text())
    progress = capsys.readouterr().out
    assert record["outcome"] == "completed", record["reason"]
    tw = record["hosts"][0]["time_wait"]
    assert tw["found"] > limit
    assert f"{tw['found']} TIME_WAIT sockets left by an earlier run" in progress
    still = [n for n in record.get("notes", []) if "TIME_WAIT sockets still there" in n]
    assert bool(still) == (tw["at_start"] > limit)
    assert time.monotonic() - t0 < 60  # the wait is bounded


def test_a_host_that_fails_lab_doctors_checks_stops_the_run_before_any_load(
    tmp_path: Path,
) -> None:
    # the run's host (this machine, through the embedded SSH server) gets an open-file hard
    # limit below lab doctor's minimum: the run must stop at the check, name it and the fix,
    # start nothing, and still leave its folder
    import resource

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))

    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.run", str(TINY), "--results", str(tmp_path / "results"),
         "--no-report", "--progress", "text"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=low_nofile,
    )  # fmt: skip
    code, folder, err = finish(proc, 120)
    assert code == 1
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "failed"
    assert "host check failed: open files (nofile)" in record["reason"]
    assert "fix: raise the hard limit" in record["reason"]
    assert "open files (nofile)" in err
    (check,) = [c for c in record["hosts"][0]["checks"] if c["level"] == "fail"]
    assert check["check"] == "open files (nofile)" and "hard 2048" in check["value"]
    assert "agents_start_at" not in record and not record.get("roles")
    assert run_processes(record["run_id"]) == {}


def test_another_program_on_the_server_port_stops_the_run_naming_it(tmp_path: Path) -> None:
    """A listener that is not a comet server (it never answers HTTP) on the server's port:
    the run stops before the server starts, names the address and the fix, starts no agent
    and leaves its folder. (lab.comet alone would say the same in terms of its own --port.)"""
    import socket

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 18190))  # tiny.yaml's server.port
        squatter.listen()
        code, folder, _ = finish(start_lab_run([str(TINY)], tmp_path / "results"), 120)
    assert code == 1
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "failed"
    assert "another program listens on 127.0.0.1:18190 on host 'local'" in record["reason"]
    assert "-p server.port=N" in record["reason"]
    assert "agents_start_at" not in record
    assert run_processes(record["run_id"]) == {}


@pytest.mark.parametrize(
    ("module", "name"),
    [("lab.plan", "make_plan"), ("lab.engine", "check_host")],  # once, and on every host
)
def test_an_unexpected_error_keeps_its_traceback_in_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str
) -> None:
    import importlib

    def broken(*args: Any, **kwargs: Any) -> Any:
        return {}["no such key"]  # a bug, as the engine would meet one

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    folder = run_or_load(TINY, results_dir=tmp_path / "run")
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "failed" and "KeyError" in record["reason"]
    log = (folder / "logs" / "controller.log").read_text()
    assert "Traceback" in log and "def broken" not in log and "in broken" in log
    assert any("logs/controller.log" in n for n in record["notes"])


def test_several_phases_go_to_the_agent_as_a_plan_file(tmp_path: Path) -> None:
    # two ramps with holds between them do not fit the agent's flags: the plan writes a --plan
    # file, the engine puts it into the host's run dir before the agent starts
    folder = run_or_load(ROOT / "tests" / "data" / "phases.yaml", results_dir=tmp_path / "run")
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "completed", record["reason"]
    agent = next(x for x in record["plan"] if x["role"] == "agent")
    assert "--plan" in agent["argv"]
    conns = pd.read_parquet(folder / "connections.parquet")
    assert (conns["outcome"] == "ok").sum() == 300
    # the second ramp starts only after the first ramp (0.5 s) and the hold (1 s)
    started = conns["scheduled"].sort_values().to_numpy()
    assert started[100] - started[99] >= 1.0
    assert run_processes(record["run_id"]) == {}


def test_interrupt_stops_everything(tmp_path: Path) -> None:
    results = tmp_path / "results"
    long_hold = ["-p", "phases.1.hold_s=60", "-p", "max_duration_s=120"]
    proc = start_lab_run([str(TINY), *long_hold], results)
    try:
        record = wait_for(lambda: agents_running(results), 120, "agents to run")
        wait_for(lambda: tables_with_agent_lines(results, record), 30, "agent stream lines")
        proc.send_signal(signal.SIGINT)
        code, folder, err = finish(proc, 90)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "interrupted", err[-3000:]
    assert "SIGINT" in record["reason"]
    assert code == 130
    assert run_processes(record["run_id"]) == {}
    rows = tables_with_rows(folder)
    assert rows.get("server", 0) > 0 and rows.get("monitor_host", 0) > 0, rows


def test_a_worker_killed_mid_run_is_a_restart_and_drops_not_connect_errors(
    tmp_path: Path,
) -> None:
    # SIGKILL the server's only worker while it holds all 200: the supervisor restarts it,
    # and the run must say so, counting the 200 as dropped (they did connect), not as errors
    import urllib.request

    results = tmp_path / "results"
    # the broadcasts come after the kill (at 6 s; the 200 are up at 1 s)
    late = ["-p", "phases.1.hold_s=10", "-p", "publishing.start_after_s=6"]
    proc = start_lab_run([str(TINY), *late], results)

    def stats() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:18190/stats", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    try:
        full = wait_for(lambda: (st := stats()) and st["online"] == 200 and st, 60, "200 online")
        os.kill(full["workers"][0]["pid"], signal.SIGKILL)
        code, folder, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "completed", (record.get("reason"), err[-2000:])
    summary = record["summary"]
    assert summary["server_restarts"] == 1
    assert summary["connect_errors"] == 0 and summary["errors_by_reason"] == {}
    assert summary["connections_dropped"] == 200
    assert any("1 worker restart(s)" in n and "200 dropped" in n for n in record["notes"])
    # connect_errors == 0 passes; what fails is that no message reached anyone after it
    assert [t["name"] for t in record["thresholds"] if not t["passed"]] == ["messages_received"]
    assert code == 1
    assert run_processes(record["run_id"]) == {}


def test_an_agent_killed_mid_run_is_named_with_its_signal(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = start_lab_run([str(TINY), "-p", "phases.1.hold_s=20"], results)
    try:
        record = wait_for(lambda: agents_running(results), 120, "agents to run")
        (pid,) = [
            p
            for p, cmd in run_processes(record["run_id"]).items()
            if "-m lab.agent " in cmd + " " and "lab.agent.proc" not in cmd
        ]
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        code, folder, _ = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "failed" and code == 1
    assert "agent-0 on host 'local'" in record["reason"], record["reason"]
    assert "killed by SIGKILL" in record["reason"], record["reason"]
    assert run_processes(record["run_id"]) == {}


def tables_with_agent_lines(results: Path, record: dict[str, Any]) -> bool:
    folder = results / record["run_id"]
    workdir = Path(record["hosts"][0]["deploy"]["workdir"])
    stream = workdir / "runs" / record["run_id"] / "agent-0.jsonl"
    return folder.is_dir() and stream.is_file() and stream.stat().st_size > 0


# --- OpenSSH hosts in network namespaces -----------------------------------------------------


@pytest.fixture(scope="module")
def lab_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NetnsHost]]:
    require("sshd", "OpenSSH test hosts")
    require("ip", "network namespaces")
    require_root("ip netns")
    with netns_hosts(3, tmp_path_factory.mktemp("netns")) as hosts:
        yield hosts


def netns_experiment(
    hosts: list[NetnsHost], path: Path, *, hold_s: float, max_duration_s: float
) -> Path:
    """A server on the first host and agents on the other two, all reached with OpenSSH."""
    server, agents = hosts[0], hosts[1:]
    data = {
        "name": "netns",
        "hosts": [
            {k: v for k, v in vars_of(h.spec).items() if v is not None} for h in hosts
        ],
        "server": {"kind": "lab.comet", "on_host": server.name, "host": server.address,
                   "port": 18191, "workers": 1, "publish_token": TOKEN},
        "agents": {"hosts": [h.name for h in agents], "procs": 1},
        "session": {"kind": "websocket", "channel": "news"},
        "phases": [{"rate_per_s": 300, "until_connections": 300}, {"hold_s": hold_s},
                   {"close": "all"}],
        "publishing": {"channel": "news", "rate_per_s": 5, "count": 5, "start_after_s": 1.5},
        "monitor": {"interval_s": 0.5},
        "thresholds": [{"metric": "peak_connections", "op": ">=", "value": 300}],
        "max_duration_s": max_duration_s,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def vars_of(spec: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def test_full_run_over_openssh(lab_hosts: list[NetnsHost], tmp_path: Path) -> None:
    exp = netns_experiment(lab_hosts, tmp_path / "netns.yaml", hold_s=2, max_duration_s=60)
    code, folder, err = finish(start_lab_run([str(exp)], tmp_path / "results"), 300)
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "completed", (record["reason"], err[-3000:])
    assert code == 0, err[-3000:]
    names = [h.name for h in lab_hosts]
    assert [h["name"] for h in record["hosts"]] == names
    for host in names:
        assert (folder / "raw" / host / "monitor.jsonl").is_file()
        assert record["hosts"][names.index(host)]["teardown"]["left"] == []
    assert (folder / "raw" / names[0] / "server.jsonl").is_file()
    assert (folder / "raw" / names[1] / "agent-0.jsonl").is_file()
    assert (folder / "raw" / names[2] / "agent-1.jsonl").is_file()
    assert record["summary"]["peak_connections"] >= 300
    assert record["summary"]["connect_errors"] == 0
    assert record["summary"]["messages_received"] == 300 * 5  # across hosts, to everyone
    assert run_processes(record["run_id"]) == {}
    # no secrets in the results: the publish token is masked everywhere
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ".jsonl"):
            assert TOKEN not in path.read_text(errors="replace"), path


def test_host_dropping_out_fails_the_run_and_stops_the_others(
    lab_hosts: list[NetnsHost], tmp_path: Path
) -> None:
    exp = netns_experiment(lab_hosts, tmp_path / "netns.yaml", hold_s=60, max_duration_s=120)
    results = tmp_path / "results"
    proc = start_lab_run([str(exp)], results)
    try:
        record = wait_for(lambda: agents_running(results), 180, "agents to run")
        wait_for(
            lambda: (
                len([c for c in run_processes(record["run_id"]).values() if "lab.agent" in c]) >= 2
            ),
            30,
            "both agents",
        )
        dropped = lab_hosts[2]
        kill_sshd(dropped)
        code, folder, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads((folder / "run.json").read_text())
    assert record["outcome"] == "failed", err[-3000:]
    assert dropped.name in record["reason"] and "dropped out" in record["reason"]
    assert code == 1
    # the other hosts were torn down: whatever of the run is left lives on the dropped host
    left = set(run_processes(record["run_id"]))
    dropped_pids = set(map(int, subprocess.run(
        ["ip", "netns", "pids", dropped.netns], capture_output=True, text=True
    ).stdout.split()))  # fmt: skip
    assert left <= dropped_pids, left - dropped_pids
    # data up to the drop is kept
    rows = tables_with_rows(folder)
    assert rows.get("server", 0) > 0 and rows.get("agent", 0) > 0, rows
    assert (folder / "raw" / lab_hosts[1].name / "agent-0.jsonl").is_file()
