"""Benchmark of the load agent (issue 4): prints the targets and the "Must show" checks.

Run: ``.venv/bin/python bench/bench_agent.py`` (about a minute; loopback only). It starts its
own fast minimal WebSocket server in a subprocess (``--serve``: uvloop + asyncio.Protocol,
upgrade parsed with httptools, answered with websockets.utils.accept_key; it counts accepted
upgrades per second and prints them as JSON lines), then runs ``python -m lab.agent``:

1. 15,000 connections at 2,500/s, held: every whole ramp second as counted by the SERVER
   within ±5% of 2,500 (and by the agent's records within ±2%), all held, agent USS per held
   connection (load process delta <= 2.5 KiB; total USS of all agent processes, interpreter
   included, <= 5 KiB), agent CPU per new connection <= 100 µs, JSON lines, exit 0.
   CPU per connection = user + sys CPU time of the load process(es) from ready (idle, before
   the start) to the first JSON line after the ramp, / connections; printed as user and sys
   separately; the median of ``--cpu-repeats`` such ramps (default 3: the first is the one
   above; every run is printed), as this VM's speed drifts by a quarter within minutes. On
   loopback the sys part includes much of the server's TCP work (the handshake and the
   request's receive run in the connecting process's syscalls), so it is compared with a bare
   uvloop client measured the same way on the same server (the floor).
   Then the same ramp once on the agent's Python path (``LAB_AGENT_FASTPATH=0``: without the
   C fast path of ``lab/agent/fastpath.c``), and once more with ``--turn-procs`` (default 4)
   load processes, which open in turn as c64k's agent does (both printed, not checked).
2. One load process asked for 8,400/s (5% over the target), 16,000 connections: connections
   completed per second, first to last, must be >= 8,000; then the same at 10,000/s
   (printed, not checked).

Server and agent run on separate cores (``taskset``: server CPU 1, agent and floor client
CPU 0), as on two hosts, so that neither preempts the other at every connect(); ``--no-pin``
lets them share the cores (the agent then pays ~0.24 preemptions and ~30 µs more CPU per
connection on this VM). Options: ``--quick`` runs smaller counts (a smoke test of the
benchmark itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# --- the fast minimal server (runs in its own process with --serve) ------------------------
def serve(host: str, port: int) -> None:
    import gc

    import httptools
    import uvloop
    from websockets.frames import Close, Frame, Opcode
    from websockets.utils import accept_key

    from lab.limits import raise_nofile_soft_limit

    raise_nofile_soft_limit()
    close_frame = Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=False)
    counts: dict[int, int] = {}
    state = {"online": 0}

    class Conn(asyncio.Protocol):
        __slots__ = ("key", "parser", "tr", "up")

        def connection_made(self, tr: Any) -> None:
            self.tr = tr
            self.parser = httptools.HttpRequestParser(self)
            self.key = b""
            self.up = False

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"sec-websocket-key":
                self.key = value

        def data_received(self, data: bytes) -> None:
            if self.up:  # any frame from the client here is its close frame
                self.tr.write(close_frame)
                self.tr.close()
                return
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.up = True
                self.parser = None  # type: ignore[assignment]
                self.tr.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                    + accept_key(self.key.decode()).encode()
                    + b"\r\n\r\n"
                )
                sec = int(time.time())
                counts[sec] = counts.get(sec, 0) + 1
                state["online"] += 1
            except httptools.HttpParserError:
                self.tr.close()

        def connection_lost(self, exc: Any) -> None:
            if self.up:
                state["online"] -= 1
            self.tr = None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, host, port, backlog=4096, reuse_port=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps({"ready": server.sockets[0].getsockname()[1]}), flush=True)
        gc.freeze()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            print(
                json.dumps({"t": time.time(), "online": state["online"], "upgrades": counts}),
                flush=True,
            )
        print(
            json.dumps(
                {"t": time.time(), "online": state["online"], "upgrades": counts, "final": True}
            ),
            flush=True,
        )

    uvloop.run(main())


# --- the floor: a raw asyncio client (runs in its own process with --raw) --------------------
def raw_client(port: int, n: int, rate: float) -> None:
    """Open ``n`` WebSocket upgrades at ``rate`` with the least code possible (one protocol
    object, ``create_connection``, a fixed request, count the 101s); print CPU per connection.
    The same machine, kernel and server: what the agent's figure should be compared with."""
    import resource

    import uvloop

    from lab.limits import raise_nofile_soft_limit

    raise_nofile_soft_limit()
    req = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    state = {"done": 0}
    held: list[Any] = []
    box: dict[str, asyncio.Event] = {}

    class Raw(asyncio.Protocol):
        __slots__ = ("tr",)

        def connection_made(self, tr: Any) -> None:
            self.tr = tr
            tr.write(req)

        def data_received(self, data: bytes) -> None:
            if data.startswith(b"HTTP/1.1 101"):
                state["done"] += 1
                if state["done"] == n:
                    box["finished"].set()

    async def main() -> None:
        box["finished"] = asyncio.Event()
        loop = asyncio.get_running_loop()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = loop.time()
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0.001:
                await asyncio.sleep(delay)
            held.append(loop.create_task(loop.create_connection(Raw, "127.0.0.1", port)))
        await asyncio.wait_for(box["finished"].wait(), 60)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user = (r1.ru_utime - r0.ru_utime) / n * 1e6
        system = (r1.ru_stime - r0.ru_stime) / n * 1e6
        print(json.dumps({"user_us": user, "sys_us": system}), flush=True)
        # reset (after the measure): exiting with them open would leave a TIME_WAIT socket per
        # connection on this side, which slows the next runs' connect()s
        linger = struct.pack("ii", 1, 0)
        for fut in held:
            with contextlib.suppress(Exception):
                tr = fut.result()[0]
                tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                tr.abort()
        await asyncio.sleep(0)

    uvloop.run(main())


# Pinned (the default; --no-pin to share): the server on one core, the agent (or the floor
# client) on the other, as if on two hosts: neither preempts the other at each connect(). On
# shared cores the server, woken by the agent's SYN, preempts the agent about once per
# connection (measured: 0.24 preemptions and +30 µs of agent CPU per connection).
PIN = False
SERVER_CPU, AGENT_CPU = 1, 0


def pinned(cpu: int) -> list[str]:
    """``taskset`` prefix for a command when --pin is on (children inherit the affinity)."""
    return ["taskset", "-c", str(cpu)] if PIN else []


def raw_floor(rate: float, n: int) -> dict:
    srv = Server()
    try:
        out = subprocess.run(
            [*pinned(AGENT_CPU), sys.executable, __file__, "--raw", str(srv.port), str(n),
             str(rate)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        return dict(json.loads(out.stdout.splitlines()[-1]))
    finally:
        srv.stop()


# --- the benchmark ---------------------------------------------------------------------------
class Server:
    """The --serve subprocess; its last JSON line holds the upgrades per whole second."""

    def __init__(self) -> None:
        self.p = subprocess.Popen(
            [*pinned(SERVER_CPU), sys.executable, __file__, "--serve", "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.p.stdout is not None
        self.port = int(json.loads(self.p.stdout.readline())["ready"])
        self.last: dict = {}
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.last = json.loads(line)

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)
        self.t.join(5)
        return self.last


def uss_of(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().uss
    return total


def run_agent(
    port: int,
    rate: int,
    conns: int,
    hold: float,
    tmp: Path,
    *,
    procs: int = 1,
    sample_at_hold: bool = True,
    env: dict[str, str] | None = None,
) -> dict:
    """Run the agent; sample its processes' USS and CPU before the start and during the hold."""
    import psutil

    rec = tmp / f"bench-{rate}.rec"
    cmd = [
        *pinned(AGENT_CPU),
        sys.executable,
        "-m",
        "lab.agent",
        "--url",
        f"ws://127.0.0.1:{port}/ws",
        "--rate",
        str(rate),
        "--connections",
        str(conns),
        "--hold",
        str(hold),
        "--procs",
        str(procs),
        "--records",
        str(rec),
        "--quiet",
        "--max-duration",
        "120",
    ]
    t_launch = time.time()
    start_at = t_launch + 3.0  # the load processes are ready well before: sample them idle
    cmd += ["--start-at", str(start_at)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    me = psutil.Process(p.pid)
    time.sleep(max(0.0, start_at - 0.4 - time.time()))
    kids = me.children()
    assert len(kids) == procs, f"expected {procs} load processes, found {len(kids)}"
    base_uss = uss_of([k.pid for k in kids])
    base_user = sum(k.cpu_times().user for k in kids)
    base_sys = sum(k.cpu_times().system for k in kids)
    base_vcsw = sum(k.num_ctx_switches().voluntary for k in kids)
    base_icsw = sum(k.num_ctx_switches().involuntary for k in kids)
    lines = []
    hold_sample: dict = {}
    assert p.stdout is not None
    ramp_s = conns / rate
    for line in p.stdout:
        d = json.loads(line)
        lines.append(d)
        if d["kind"] != "agent" or d["elapsed_s"] < ramp_s:
            continue
        # CPU: at the first line after the end of the ramp; memory: once every connection is
        # held (or nearly)
        with contextlib.suppress(psutil.Error):
            if "user" not in hold_sample:
                hold_sample["user"] = sum(k.cpu_times().user for k in kids)
                hold_sample["sys"] = sum(k.cpu_times().system for k in kids)
                hold_sample["vcsw"] = sum(k.num_ctx_switches().voluntary for k in kids)
                hold_sample["icsw"] = sum(k.num_ctx_switches().involuntary for k in kids)
            if sample_at_hold and "open" not in hold_sample and d["open"] >= conns * 0.99:
                hold_sample["open"] = d["open"]
                hold_sample["proc_uss"] = uss_of([k.pid for k in kids])
                hold_sample["total_uss"] = uss_of([k.pid for k in kids] + [p.pid])
        hold_sample["max_open"] = max(hold_sample.get("max_open", 0), d["open"])
    rc = p.wait()
    from lab.agent.records import read_records

    r = read_records(rec)
    rec.unlink(missing_ok=True)
    return {
        "rc": rc,
        "lines": lines,
        "records": r,
        "base_uss": base_uss,
        "base_user": base_user,
        "base_sys": base_sys,
        "base_vcsw": base_vcsw,
        "base_icsw": base_icsw,
        "hold": hold_sample,
        "t_launch": t_launch,
    }


def cpu_per_conn(res: dict, conns: int) -> tuple[float, float]:
    """User and sys CPU µs per connection of the load processes over the ramp (see bench)."""
    hs = res["hold"]
    if "user" not in hs:
        return math.nan, math.nan
    user = (hs["user"] - res["base_user"]) / conns * 1e6
    return user, (hs["sys"] - res["base_sys"]) / conns * 1e6


def switches_per_conn(res: dict, conns: int) -> tuple[float, float]:
    """Voluntary (sleeps: wake-ups) and involuntary (preemptions) context switches of the load
    processes per connection, over the same window as ``cpu_per_conn``."""
    hs = res["hold"]
    if "vcsw" not in hs:
        return math.nan, math.nan
    return (hs["vcsw"] - res["base_vcsw"]) / conns, (hs["icsw"] - res["base_icsw"]) / conns


def whole_seconds(times: list[float], start: float, ramp_s: float) -> list[int]:
    """Counts per whole second [start+k, start+k+1) for the whole seconds of the ramp."""
    counts = [0] * int(ramp_s)
    for t in times:
        k = int(t - start) if t == t and t >= start else -1
        if 0 <= k < len(counts):
            counts[k] += 1
    return counts


def check(name: str, ok: bool, figure: str) -> bool:
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {figure}")
    return ok


def bench(quick: bool, cpu_repeats: int = 3, turn_procs: int = 4) -> int:
    from lab.limits import settle_time_wait

    results = []
    settle_time_wait()
    rate, conns, hold = (500, 1500, 3.0) if quick else (2500, 15000, 4.0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        srv = Server()
        res = run_agent(srv.port, rate, conns, hold, tmp)
        s = srv.stop()
        recs = res["records"]
        start = min(recs["scheduled"])
        ramp_s = conns / rate
        server_counts = [s["upgrades"].get(str(int(start) + k), 0) for k in range(int(ramp_s) + 2)]
        # the server counts in calendar seconds; the agent starts at start (fractional): align by
        # taking whole calendar seconds fully inside the ramp
        first_full = int(start) + 1
        full = [s["upgrades"].get(str(sec), 0) for sec in range(first_full, int(start + ramp_s))]
        agent_counts = whole_seconds(recs["started"], start, ramp_s)
        held = sum(1 for o in recs["outcome"] if o == "ok")
        hs = res["hold"]
        lines = res["lines"]
        kinds = [x["kind"] for x in lines]
        user_us, sys_us = cpu_per_conn(res, conns)
        ramp_cpu_us = user_us + sys_us
        per_conn_uss = (hs["proc_uss"] - res["base_uss"]) / hs["open"] if "open" in hs else math.nan
        total_uss = hs["total_uss"] / hs["open"] if "open" in hs else math.nan
        print(f"Must show ({conns} connections at {rate}/s against an independent minimal server):")
        results.append(
            check(
                "all held",
                held == conns and hs.get("max_open") == conns,
                f"{held}/{conns} ok, {hs.get('max_open')} open at once in the hold",
            )
        )
        results.append(
            check(
                "every whole ramp second as counted by the SERVER within ±5%",
                bool(full) and all(abs(c - rate) <= 0.05 * rate for c in full),
                f"{full} (calendar seconds fully inside the ramp; "
                f"edges {server_counts[0]}, {server_counts[-1]})",
            )
        )
        results.append(
            check(
                "agent total USS per held connection <= 5 KiB (interpreter included)",
                total_uss <= 5 * 1024,
                f"{total_uss / 1024:.2f} KiB",
            )
        )
        results.append(
            check(
                "JSON lines on stdout",
                len(kinds) >= 3 and kinds[-1] == "agent_end",
                f"{len(kinds)} lines, last {kinds[-1] if kinds else None}",
            )
        )
        results.append(
            check(
                "exit 0",
                res["rc"] == 0,
                f"exit {res['rc']}, outcome {lines[-1].get('outcome') if lines else None}",
            )
        )
        print("Targets:")
        results.append(
            check(
                "agent USS per held idle WS connection <= 2.5 KiB (load process, delta)",
                per_conn_uss <= 2.5 * 1024,
                f"{per_conn_uss / 1024:.2f} KiB",
            )
        )
        # this VM's speed drifts by a quarter within minutes: the same ramp again, median
        runs = [(ramp_cpu_us, user_us, sys_us)]
        for _ in range(cpu_repeats - 1):
            srv_again = Server()
            again = run_agent(srv_again.port, rate, conns, hold, tmp)
            srv_again.stop()
            u, k = cpu_per_conn(again, conns)
            runs.append((u + k, u, k))
        mid = sorted(runs)[len(runs) // 2]
        # measured before the check is printed, so that the line can say where the agent stands
        floor = raw_floor(rate, min(conns, 7500))
        floor_us = floor["user_us"] + floor["sys_us"]
        results.append(
            check(
                "agent CPU per new connection <= 100 µs",
                mid[0] <= 100,
                f"{mid[0]:.0f} µs = user {mid[1]:.0f} µs + sys {mid[2]:.0f} µs (median of "
                f"{len(runs)} ramps: {', '.join(f'{r[0]:.0f}' for r in runs)} µs; "
                f"{mid[0] / floor_us:.2f} × the bare uvloop client below)",
            )
        )
        print(
            "  (measured as: user and sys CPU time (psutil cpu_times) of the load process(es), "
            "from idle-and-ready\n   before the start to the first JSON line after the ramp, "
            "divided by the connections opened.\n   sys is the kernel: on loopback the "
            "connecting process also runs much of the SERVER's TCP work\n   (the SYN, the "
            "handshake and the request's receive are processed in its connect()/write())"
        )
        vcsw, icsw = switches_per_conn(res, conns)
        print(
            f"  (over that window: {vcsw:.2f} event-loop wake-ups (voluntary context switches; "
            f"not the C launcher thread's 2 ms sleeps) and {icsw:.2f} preemptions per connection)"
        )
        print(
            f"  (floor on this machine now: a bare uvloop client doing only the upgrade "
            f"at {rate}/s (create_connection + one protocol; same measure, getrusage): "
            f"{floor_us:.0f} µs per connection = "
            f"user {floor['user_us']:.0f} µs + sys {floor['sys_us']:.0f} µs)"
        )
        # the same ramp on the agent's Python path (no C fast path), for comparison; printed
        srv_py = Server()
        py = run_agent(srv_py.port, rate, conns, hold, tmp, env={"LAB_AGENT_FASTPATH": "0"})
        srv_py.stop()
        u, k = cpu_per_conn(py, conns)
        print(
            f"  (the Python path, LAB_AGENT_FASTPATH=0, one ramp: {u + k:.0f} µs per connection "
            f"= user {u:.0f} + sys {k:.0f} µs)"
        )
        if turn_procs > 1:
            # what c64k's agent does: several processes (for the open-file limit) at a rate one
            # keeps, opening in turn (Schedule.lanes); printed, not checked
            srv_turns = Server()
            turns = run_agent(srv_turns.port, rate, conns, hold, tmp, procs=turn_procs)
            srv_turns.stop()
            u, k = cpu_per_conn(turns, conns)
            v, _ = switches_per_conn(turns, conns)
            print(
                f"  ({turn_procs} load processes at {rate}/s, opening in turn: {u + k:.0f} µs "
                f"per connection = user {u:.0f} + sys {k:.0f} µs, {v:.2f} wake-ups per "
                "connection)"
            )
        results.append(
            check(
                f"every whole ramp second within ±2% of {rate} (agent started)",
                all(abs(c - rate) <= 0.02 * rate for c in agent_counts),
                f"{agent_counts}",
            )
        )
        lag = max(x["lag_ms"] for x in lines)
        print(
            f"  (max schedule lag {lag:.1f} ms; connect p99 by second: "
            f"{[round(_p99(x), 1) for x in lines if x['connect_hist']['buckets']]} ms)"
        )

        # asked for 5% more than the target, so that the target is not at the edge of what is
        # asked: the check is the rate achieved, not the rate asked
        target2, conns2 = (2000, 2000) if quick else (8000, 16000)
        rate2 = int(target2 * 1.05)
        fig = sustained(rate2, conns2, tmp)
        results.append(
            check(
                f"one load process >= {target2} new WS connections/s",
                fig["achieved"] >= target2 and fig["connected"] == conns2,
                f"asked for {rate2}/s: {fig['text']}",
            )
        )
        rate3 = 3000 if quick else 10000
        fig = sustained(rate3, conns2, tmp)
        print(f"  (asked for {rate3}/s: {fig['text']})")
    print(f"{sum(results)}/{len(results)} checks passed")
    return 0 if all(results) else 1


def sustained(rate: int, conns: int, tmp: Path) -> dict:
    """One load process opening ``conns`` at ``rate`` against a fresh minimal server: the
    rate achieved (connections completed per second, from the first completed upgrade to the
    last: (n - 1) / span, so that neither end's connect latency counts) and a line of
    figures."""
    srv = Server()
    res = run_agent(srv.port, rate, conns, 1.0, tmp, sample_at_hold=False)
    s = srv.stop()
    r = res["records"]
    start = min(r["scheduled"])
    conn_times = sorted(t for t in r["connected"] if t == t)
    span = (conn_times[-1] - conn_times[0]) if len(conn_times) > 1 else float("inf")
    achieved = (len(conn_times) - 1) / span if span > 0 else 0.0
    per_sec = whole_seconds(r["connected"], start, conns / rate)
    srv_full = [
        s["upgrades"].get(str(sec), 0) for sec in range(int(start) + 1, int(start + conns / rate))
    ]
    user, system = cpu_per_conn(res, conns)
    vcsw, _ = switches_per_conn(res, conns)
    text = (
        f"{achieved:.0f}/s ({len(conn_times)}/{conns} connected in {span:.2f}s, first to last; "
        f"agent per second {per_sec}, server {srv_full}; max lag "
        f"{max(x['lag_ms'] for x in res['lines']):.1f} ms; CPU per connection "
        f"user {user:.0f} µs + sys {system:.0f} µs; {vcsw:.2f} wake-ups per connection)"
    )
    return {"achieved": achieved, "connected": len(conn_times), "text": text}


def _p99(line: dict) -> float:
    from lab.histogram import Histogram

    return (Histogram.from_json(line["connect_hist"]).percentile(99) or 0.0) / 1000.0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, metavar="PORT", help="run only the minimal server")
    ap.add_argument("--raw", nargs=3, metavar=("PORT", "N", "RATE"), help="run only the raw client")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke-test the benchmark)")
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="let server and agent share every core (by default, on a machine with 2 or more "
        "cores, the server runs on CPU 1 and the agent and the floor client on CPU 0)",
    )
    ap.add_argument(
        "--cpu-repeats",
        type=int,
        default=3,
        help="ramps whose median is the CPU-per-connection figure (default 3; each printed)",
    )
    ap.add_argument(
        "--turn-procs",
        type=int,
        default=4,
        help="after the CPU ramps, one more with this many load processes, which open in turn "
        "as c64k's 4 do (printed, not checked; default 4, 0 or 1 = skip)",
    )
    a = ap.parse_args()
    PIN = not a.no_pin and (os.cpu_count() or 1) >= 2
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    if a.raw:
        raw_client(int(a.raw[0]), int(a.raw[1]), float(a.raw[2]))
        raise SystemExit(0)
    if a.serve is not None:
        serve("127.0.0.1", a.serve)
        raise SystemExit(0)
    raise SystemExit(bench(a.quick, max(1, a.cpu_repeats), a.turn_procs))
