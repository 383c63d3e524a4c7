"""lab.agent as a program: signals, records, several processes, plan files, refusals."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab.agent.records import read_records

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_mid_ramp_flushes_lines_and_records(comet: int, tmp_path: Path) -> None:
    rec, out = tmp_path / "a.rec", tmp_path / "a.jsonl"
    p = subprocess.Popen(
        [
            PY,
            "-m",
            "lab.agent",
            "--url",
            f"ws://127.0.0.1:{comet}/ws?channel=s",
            "--rate",
            "200",
            "--connections",
            "3000",
            "--hold",
            "5",
            "--procs",
            "2",
            "--records",
            str(rec),
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout is not None and p.stderr is not None
    first = json.loads(p.stdout.readline())  # one second into the ramp
    assert first["kind"] == "agent" and first["started"] > 0
    p.send_signal(signal.SIGTERM)
    rest = [json.loads(x) for x in p.stdout]
    assert p.wait(30) == 0
    end = rest[-1]
    assert end["kind"] == "agent_end"
    assert (end["outcome"], end["reason"]) == ("interrupted", "SIGTERM")
    err = p.stderr.read().splitlines()
    assert [x for x in err if "stopped by" in x] == [
        f"lab.agent: stopped by SIGTERM: connections closed, records flushed to {rec}"
    ], err
    assert end["open"] == 0 and end["closed"] == end["connected"]
    assert len(out.read_text().splitlines()) == 1 + len(rest)
    r = read_records(rec)
    assert len(r["conn"]) == 3000  # every scheduled connection has a row
    assert sorted(r["conn"]) == list(range(3000))
    assert set(r["proc"]) == {0, 1}
    outcomes = Counter(r["outcome"])
    assert outcomes["ok"] == end["connected"]
    assert outcomes["not_started"] == 3000 - end["started"]
    assert outcomes["ok"] + outcomes["not_started"] + outcomes["pending"] == 3000
    for i, o in enumerate(r["outcome"]):
        if o == "ok":
            assert r["scheduled"][i] <= r["started"][i] <= r["connected"][i] <= r["closed"][i]
        if o == "not_started":
            assert math.isnan(r["started"][i]) and not math.isnan(r["scheduled"][i])
    assert not list(tmp_path.glob("a.rec.p*"))  # the parts were joined


def test_plan_file_with_two_processes_and_poisson(comet: int, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "arrival": "poisson",
                "seed": 3,
                "phases": [
                    {"kind": "ramp", "rate_per_s": 300, "until": 150},
                    {"kind": "hold", "duration_s": 0.5},
                    {"kind": "close", "rate_per_s": 300, "count": 50},
                    {"kind": "ramp", "rate_per_s": 300, "duration_s": 0.2},
                    {"kind": "close"},
                ],
            }
        )
    )
    rec = tmp_path / "p.rec"
    p = subprocess.run(
        [
            PY,
            "-m",
            "lab.agent",
            "--url",
            f"ws://127.0.0.1:{comet}/ws?channel=p",
            "--plan",
            str(plan),
            "--procs",
            "2",
            "--records",
            str(rec),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    end = json.loads(p.stdout.splitlines()[-1])
    assert end["outcome"] == "completed", end
    assert len(end["procs"]) == 3, end  # two load processes and the coordinator
    r = read_records(rec)
    n = len(r["conn"])
    assert n > 150 and end["started"] == n, (n, end)
    # under a loaded machine a connection may still be connecting when its close is due
    assert end["connected"] + sum(end["failed"].values()) == n, (n, end)
    assert end["closed"] == end["connected"] > n // 2, (n, end)
    assert Counter(r["proc"]) == {0: (n + 1) // 2, 1: n // 2}


def test_processes_open_in_turn_at_a_rate_one_keeps(comet: int, tmp_path: Path) -> None:
    """At 400/s two processes take turns: the first opens connections 0..79, then the second
    80..159; the records map every row back to its place in the schedule (arrival order)."""
    rec = tmp_path / "t.rec"
    p = subprocess.run(
        [PY, "-m", "lab.agent", "--url", f"ws://127.0.0.1:{comet}/ws?channel=t", "--rate", "400",
         "--connections", "160", "--hold", "0.2", "--procs", "2", "--records", str(rec)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "over 2 process(es) (opening in turn)" in p.stderr
    end = json.loads(p.stdout.splitlines()[-1])
    assert end["outcome"] == "completed" and end["connected"] == 160, end
    r = read_records(rec)
    by_proc = {k: sorted(c for c, q in zip(r["conn"], r["proc"], strict=True) if q == k)
               for k in (0, 1)}  # fmt: skip
    assert by_proc == {0: list(range(80)), 1: list(range(80, 160))}
    order = sorted(range(160), key=r["conn"].__getitem__)
    scheduled = [r["scheduled"][i] for i in order]
    assert scheduled == sorted(scheduled)  # conn is the arrival order


def test_record_blocks_map_rows_to_connections_old_and_new(tmp_path: Path) -> None:
    """A block says which connections its rows are (first + row * step); a block written
    before processes took turns has neither and means interleaving (proc + row * procs)."""
    import struct

    from lab.agent.records import MAGIC, Records

    path = tmp_path / "x.rec"
    turn = Records(3, proc=1, procs=2, first=3, step=1)
    turn.save(path)
    old = Records(2, proc=1, procs=2)
    old_path = tmp_path / "old.rec"
    old.save(old_path)
    data = old_path.read_bytes()
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen])
    assert (header["first"], header["step"]) == (1, 2)  # interleaved unless told otherwise
    del header["first"], header["step"]
    raw = json.dumps(header).encode()
    with open(path, "ab") as f:  # the old block, as written before first/step existed
        f.write(MAGIC + struct.pack("<I", len(raw)) + raw + data[len(MAGIC) + 4 + hlen :])
    r = read_records(path)
    assert r["conn"] == [3, 4, 5, 1, 3] and r["proc"] == [1] * 5


def test_max_duration_bounds_the_run(comet: int) -> None:
    p = subprocess.run(
        [
            PY,
            "-m",
            "lab.agent",
            "--url",
            f"ws://127.0.0.1:{comet}/ws",
            "--rate",
            "100",
            "--connections",
            "100",
            "--hold",
            "600",
            "--max-duration",
            "1.5",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    end = json.loads(p.stdout.splitlines()[-1])
    assert (end["outcome"], end["reason"]) == ("interrupted", "max_duration")
    assert end["open"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connections", "200000", "--procs", "1", "--rate", "1000"], "use --procs"),
        (["--source-ips", "198.18.255.254"], "ip addr add 198.18.255.254/32"),
        (["--source-ips", "x-y"], "give auto, a list"),
        (["--session", "sse"], "needs a http:// URL"),
        (["--plan", "/nonexistent/plan.json"], "cannot read it"),
        (["--rate", "0"], "--rate 0: give new connections per second > 0"),
        (["--hold", "-1", "--connections", "-2"], "--connections -2: give a count >= 0; --hold -1"),
        (["--max-duration", "0"], "--max-duration 0: give seconds > 0"),
        (["--connect-timeout", "-1"], "--connect-timeout -1: give seconds > 0"),
        (["--url", "ws://127.0.0.1:99999/ws"], "99999/ws': Port out of range 0-65535; give a port"),
        (["--url", "ws://no-such-host.invalid/ws"], "cannot resolve host 'no-such-host.invalid'"),
        (["--publish-url", "http://127.0.0.1:1/nopub"], "/pub/<channel>"),
    ],
)
def test_refusals_name_the_problem_and_the_fix(args: list[str], message: str) -> None:
    p = subprocess.run(
        [PY, "-m", "lab.agent", "--url", "ws://127.0.0.1:9/ws", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 2
    assert message in p.stderr
    assert p.stdout == ""


def test_failed_connections_are_summed_up_with_their_likely_cause() -> None:
    """Connect errors are data (exit 0), but a run whose connections failed ends with one
    line saying how many, why, and what to check, even with --quiet."""
    port = free_port()  # nothing listens there
    url = f"ws://127.0.0.1:{port}/ws"
    p = subprocess.run(
        [PY, "-m", "lab.agent", "--url", url, "--rate", "50", "--connections", "5", "--hold",
         "0", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["failed"]["refused"] == 5
    assert p.stderr.splitlines() == [
        f"lab.agent: 5 of 5 connections failed (refused 5): nothing accepted connections at "
        f"{url}: is the server running there?"
    ]


def test_bad_plan_file(tmp_path: Path) -> None:
    plan = tmp_path / "bad.json"

    def run_plan(doc: dict) -> subprocess.CompletedProcess[str]:
        plan.write_text(json.dumps(doc))
        return subprocess.run(
            [PY, "-m", "lab.agent", "--url", "ws://127.0.0.1:9/ws", "--plan", str(plan)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    p = run_plan({"phases": [{"kind": "ramp", "rate_per_s": 10}]})
    assert p.returncode == 2 and "phases[0] (ramp): give exactly one of until" in p.stderr
    # phases count from 0 as everywhere else (phases.0.rate_per_s); a typo gets the closest key
    for doc, message in [
        (
            {"phases": [{"kind": "ramp", "rate_per_s": 1, "until": 3}, {"kind": "hold", "s": 1}]},
            "phases[1]: unknown key `s`: known keys: kind, rate_per_s, until, duration_s, count",
        ),
        (
            {"phases": [{"kind": "ramp", "rate": 10, "until": 3}]},
            "phases[0]: unknown key `rate`: did you mean `rate_per_s`?",
        ),
        ({"phases": [{"kind": "rmap"}]}, "phases[0]: kind 'rmap': did you mean `ramp`?"),
        ({"phases": [], "arival": "poisson"}, "unknown key `arival`: did you mean `arrival`?"),
    ]:
        p = run_plan(doc)
        assert p.returncode == 2 and f"--plan {plan}: {message}" in p.stderr, p.stderr


def test_help_needs_only_core_dependencies() -> None:
    p = subprocess.run([PY, "-m", "lab.agent", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "--source-ips" in p.stdout
    # every option says what it is and its default; argparse wraps lines: compare words
    options = {
        "-" + block.split()[0]: " ".join(block.split())
        for block in p.stdout.split("options:", 1)[1].split("\n  -")
        if block.strip()
    }
    for flag, text in [
        ("--session", "websocket (upgrade, comet envelopes counted"),
        ("--session", "(default websocket)"),
        ("--arrival", "poisson (exponential gaps"),
        ("--arrival", "(default uniform)"),
        ("--rate", "(ramp; default 100)"),
        ("--connections", "(default 100)"),
        ("--hold", "(default 10)"),
        ("--connect-timeout", "(default 10)"),
        ("--lp-timeout", "(default 25)"),
        ("--publish-rate", "(default 1)"),
        ("--publish-count", "(default 100)"),
        ("--seed", "(default 0)"),
        ("--agent-id", "(default a0)"),
        ("--start-at", "(default now + 0.5 s)"),
        ("--max-duration", "(default the plan's end + 3600 s)"),
    ]:
        assert text in options[flag], (flag, options.get(flag))
    p = subprocess.run(
        [PY, "-m", "lab", "agent", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 0 and "usage: lab agent" in p.stdout


def cpu_cgroup(pid: int) -> str:
    """The cgroup of ``pid`` in the hierarchy with the cpu controller ("" if none)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") or controllers == "":
            return path
    return ""


@pytest.mark.parametrize("cgroup", ["1", "0"])
def test_nice_applies_to_the_load_processes_only(
    comet: int, cgroup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--nice 7: every load process runs at nice 7; the coordinator (and its publisher) not.
    Where a cpu cgroup can be made (root here), the load processes share one, idle; it is
    removed when they have exited. LAB_AGENT_CGROUP=0: nice values and autogroups only."""
    import psutil

    from lab.agent.giveway import PREFIX, IdleGroup, cpu_hierarchy

    monkeypatch.setenv("LAB_AGENT_CGROUP", cgroup)
    probe, why = IdleGroup.create()  # can this host make one? (as the coordinator will)
    if probe is not None:
        probe.remove()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.agent", "--quiet", "--url", f"ws://127.0.0.1:{comet}/ws",
         "--rate", "100", "--connections", "20", "--hold", "2", "--procs", "2", "--nice", "7"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    ours = f"/{PREFIX}{proc.pid}-"  # the coordinator's group: its pid and a random token
    group = ""
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # a load process's line: they are running
        assert first["kind"] == "agent"
        me = psutil.Process(proc.pid)
        loads = [c for c in me.children() if "lab.agent.proc" in " ".join(c.cmdline())]
        assert len(loads) == 2
        want = min(19, psutil.Process().nice() + 7)  # (an increment: pytest may be niced)
        assert [c.nice() for c in loads] == [want, want]
        assert me.nice() == psutil.Process().nice()
        autogroup = Path(f"/proc/{loads[0].pid}/autogroup")
        if autogroup.exists():  # the scheduler's autogroups: the nice must hold across them
            assert autogroup.read_text().split()[-1] == "7"  # (set, not incremented)
            # The coordinator's group is untouched: its own at nice 0, or (no setsid since boot,
            # as under some CI runners) the root group, whose file is empty.
            assert Path(f"/proc/{proc.pid}/autogroup").read_text().split()[-1:] in ([], ["0"])
        if cgroup == "1" and probe is not None:
            group = cpu_cgroup(loads[0].pid)
            assert group.startswith(ours) and cpu_cgroup(loads[1].pid) == group
            base = cpu_hierarchy()
            assert base is not None
            knob, value = probe.how.split()
            assert (base / group[1:] / knob).read_text().strip() == value
        else:
            assert why  # (turned off, or this host makes none)
            assert not any(cpu_cgroup(c.pid).startswith(ours) for c in loads)
        assert not cpu_cgroup(proc.pid).startswith(ours)
        proc.stdout.read()
    finally:
        proc.wait(30)
    assert proc.returncode == 0
    base = cpu_hierarchy()
    assert base is None or not group or not (base / group[1:]).exists()  # removed


def test_failed_publishes_are_explained_once_then_counted(tmp_path: Path) -> None:
    """A server that needs a publish token the agent was not given: one line naming the
    status and the fix at the first error, a count at the end, the JSON field as before."""
    from lab.comet.launch import ServerProcess

    with ServerProcess(workers=1, extra=["--quiet", "--publish-token", "sec"]) as server:
        pub = f"http://127.0.0.1:{server.port}/pub/t1"
        p = subprocess.run(
            [PY, "-m", "lab.agent", "--quiet", "--url", f"ws://127.0.0.1:{server.port}/ws",
             "--rate", "100", "--connections", "2", "--hold", "1", "--publish-url", pub,
             "--publish-rate", "20", "--publish-count", "4"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert p.returncode == 0, p.stderr
    end = json.loads(p.stdout.splitlines()[-1])
    assert end["publish_errors"] == 4 and end["msgs_out"] == 0
    lines = [x for x in p.stderr.splitlines() if "publish" in x]
    assert lines == [
        f"lab.agent: publish: HTTP 401 from {pub}: the server needs a publish token: "
        "give --publish-token (the server's)",
        "lab.agent: publish: 4 of 4 messages failed (the first error is above)",
    ], p.stderr


def test_progress_line_shows_failures_by_reason(comet: int) -> None:
    p = subprocess.run(
        [PY, "-m", "lab.agent", "--url", f"ws://127.0.0.1:{comet}/nope", "--rate", "100",
         "--connections", "5", "--hold", "1.5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    progress = [x for x in p.stderr.splitlines() if x.startswith("[agent a0]")]
    # the five fail within 50 ms of the start, before the first line
    assert progress and all(" failed=5 (http 5) " in x for x in progress), p.stderr


def test_a_holding_load_process_wakes_rarely(comet: int) -> None:
    """While no connection opens or closes (a hold), the sockets are read every 50 ms, not
    every 2 ms: agents sharing cores with a server cost its fan-out less, and an idle process
    costs less CPU (see proc.py)."""
    import psutil

    proc = subprocess.Popen(
        [PY, "-m", "lab.agent", "--quiet", "--url", f"ws://127.0.0.1:{comet}/ws",
         "--rate", "400", "--connections", "40", "--hold", "4"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # 1 s in: the ramp (0.1 s) is over, the hold is on
        (load,) = [
            c
            for c in psutil.Process(proc.pid).children()
            if "lab.agent.proc" in " ".join(c.cmdline())
        ]
        before = load.num_ctx_switches().voluntary
        line = json.loads(proc.stdout.readline())  # one second of the hold later
        woke = load.num_ctx_switches().voluntary - before
        assert line["open"] == 40
        # a 50 ms tick and the once-a-second line: ~20; a 2 ms tick would be ~500
        assert woke < 60, woke
        proc.stdout.read()
    finally:
        proc.wait(30)
    assert proc.returncode == 0


def test_groups_of_coordinators_that_are_gone_are_swept(tmp_path: Path) -> None:
    """Only an empty group whose coordinator is gone and that was made over STALE_S ago is
    removed: not a live coordinator's, not one just made (empty until its processes join)."""
    import os
    import time

    from lab.agent.giveway import PREFIX, STALE_S, sweep_stale

    dead = 2**22 + 12345  # above pid_max's default: no such process
    old = time.time() - STALE_S - 10
    paths = {
        "gone": tmp_path / f"{PREFIX}{dead}-aa",
        "fresh": tmp_path / f"{PREFIX}{dead}-bb",
        "alive": tmp_path / f"{PREFIX}{os.getpid()}-cc",
        "other": tmp_path / "somebody-else",
    }
    for name, path in paths.items():
        path.mkdir()
        if name != "fresh":
            os.utime(path, (old, old))
    sweep_stale(tmp_path)
    assert {name for name, path in paths.items() if path.exists()} == {"fresh", "alive", "other"}
