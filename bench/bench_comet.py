"""Benchmark of lab.comet against the targets of issue 3; prints the figures.

- memory: summed USS of the workers per idle WebSocket at N connections with W workers
  (the growth over the idle server, divided by N; the absolute total is printed too);
- broadcast: time from POST /pub until all N subscribers have the message (median of rounds);
- accept: accept + upgrade rate in one worker and the server CPU per new connection.

The client side is a lean raw-asyncio WebSocket client in this file (a fixed upgrade request,
then it only notes when data arrives), sharded over processes below the open-file limit, and
over several 127.x source addresses when N > 25,000. Server and clients share this host's
cores: ``--client-nice 10`` lets the server run first, as if the clients were elsewhere.

    .venv/bin/python bench/bench_comet.py --connections 15000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.comet.launch import ServerProcess
from lab.limits import raise_nofile_soft_limit

PER_CLIENT_PROC = 12_000
PER_SOURCE_IP = 25_000
IP_BIND_ADDRESS_NO_PORT = 24


class Bench:
    """One client process's shared state."""

    def __init__(self) -> None:
        self.round = 0
        self.arrivals: list[float] = []
        self.conns: list[Client] = []


class Client(asyncio.Protocol):
    __slots__ = ("bench", "done", "head", "round", "transport", "upgraded")

    def __init__(self, bench: Bench, request: bytes, done: asyncio.Future[bool]) -> None:
        self.bench = bench
        self.head = request
        self.done: asyncio.Future[bool] | None = done
        self.upgraded = False
        self.round = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.head)  # type: ignore[attr-defined]
        self.head = b""

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            if b"\r\n\r\n" in self.head:
                ok = self.head.startswith(b"HTTP/1.1 101")
                self.upgraded = ok
                self.head = b""
                if ok:
                    self.bench.conns.append(self)
                if self.done is not None and not self.done.done():
                    self.done.set_result(ok)
                self.done = None
            return
        bench = self.bench
        if self.round != bench.round:
            self.round = bench.round
            bench.arrivals.append(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(False)
        self.transport = None


def upgrade_request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_many(
    bench: Bench, n: int, host: str, port: int, path: str, sources: list[str], window: int
) -> tuple[int, int, float]:
    """Open ``n`` WebSockets keeping ``window`` handshakes in flight; (ok, failed, seconds)."""
    loop = asyncio.get_running_loop()
    request = upgrade_request(host, port, path)
    finished = loop.create_future()
    state = {"started": 0, "inflight": 0, "ok": 0, "failed": 0}

    def settle(fut: asyncio.Future[bool]) -> None:
        state["inflight"] -= 1
        if not fut.cancelled() and fut.exception() is None and fut.result():
            state["ok"] += 1
        else:
            state["failed"] += 1
        launch()

    async def connect_from(source: str, done: asyncio.Future[bool]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
        await loop.create_connection(lambda: Client(bench, request, done), sock=sock)

    def failed_connect(done: asyncio.Future[bool], task: asyncio.Task[Any]) -> None:
        if (task.cancelled() or task.exception() is not None) and not done.done():
            done.set_result(False)

    def launch() -> None:
        while state["inflight"] < window and state["started"] < n:
            i = state["started"]
            state["started"] += 1
            state["inflight"] += 1
            done: asyncio.Future[bool] = loop.create_future()
            done.add_done_callback(settle)
            if sources:
                coro: Any = connect_from(sources[i % len(sources)], done)
            else:
                coro = loop.create_connection(
                    functools.partial(Client, bench, request, done), host, port
                )
            task = loop.create_task(coro)
            task.add_done_callback(functools.partial(failed_connect, done))
        if state["inflight"] == 0 and not finished.done():
            finished.set_result(None)

    t0 = time.monotonic()
    launch()
    await finished
    bench.conns = [c for c in bench.conns if c.transport is not None]
    return state["ok"], state["failed"], time.monotonic() - t0


def client_main(pipe: Connection, nice: int) -> None:
    """A client process: obeys commands from the bench over ``pipe``."""
    import uvloop

    raise_nofile_soft_limit()
    if nice:
        os.nice(nice)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        bench = Bench()
        while True:
            cmd, args = await loop.run_in_executor(None, pipe.recv)
            if cmd == "connect":
                pipe.send(await open_many(bench, *args))
            elif cmd == "arm":
                bench.round += 1
                bench.arrivals = []
                pipe.send(True)
            elif cmd == "collect":
                deadline = loop.time() + args[0]
                while len(bench.arrivals) < len(bench.conns) and loop.time() < deadline:
                    await asyncio.sleep(0.005)
                pipe.send(list(bench.arrivals))
            elif cmd == "close":
                for c in bench.conns:
                    if c.transport is not None:
                        c.transport.abort()
                bench.conns = []
                await asyncio.sleep(0.1)
                pipe.send(True)
                return

    uvloop.run(serve())


class ClientPool:
    """Client processes driven over pipes (``all(cmd, args_for)`` runs a command in each)."""

    def __init__(self, procs: int, nice: int = 0) -> None:
        ctx = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, nice), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def all(self, cmd: str, args_for: Any) -> list[Any]:
        for i, pipe in enumerate(self.pipes):
            pipe.send((cmd, args_for(i)))
        return [pipe.recv() for pipe in self.pipes]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.all("close", lambda i: ())
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def worker_pids(server: ServerProcess) -> list[int]:
    with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as resp:
        return [int(w["pid"]) for w in json.load(resp)["workers"]]


def uss(pids: list[int]) -> int:
    return sum(psutil.Process(p).memory_full_info().uss for p in pids)


def cpu_s(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes."""
    user = system = 0.0
    for p in pids:
        t = psutil.Process(p).cpu_times()
        user += t.user
        system += t.system
    return user, system


def wait_online(server: ServerProcess, n: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    online = 0
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as resp:
            online = int(json.load(resp)["online"])
        if online >= n:
            break
        time.sleep(0.5)
    return online


def bench_accept(n: int, window: int, clients: int = 1) -> dict[str, float]:
    """Accept + upgrade rate and server CPU per connection in one worker."""
    with ServerProcess(workers=1, extra=["--quiet"]) as server:
        pids = worker_pids(server)
        target: tuple[Any, ...] = (server.host, server.port, "/ws?channel=a", [], window)
        # warm up: the first connections pay for imports and allocator growth
        pool = ClientPool(1)
        pool.all("connect", lambda i: (500, *target))
        pool.close()
        pool = ClientPool(clients)
        try:
            shares = split(n, clients)
            cpu0 = cpu_s(pids)
            t0 = time.monotonic()
            results = pool.all("connect", lambda i: (shares[i], *target))
            elapsed = time.monotonic() - t0
            cpu1 = cpu_s(pids)
        finally:
            pool.close()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "accept_connections": ok,
        "accept_failed": failed,
        "accept_rate_per_s": ok / elapsed,
        "accept_cpu_us_per_conn": (user + system) / max(ok, 1) * 1e6,
        "accept_user_us_per_conn": user / max(ok, 1) * 1e6,
        "accept_system_us_per_conn": system / max(ok, 1) * 1e6,
    }


def bench_memory_broadcast(
    n: int,
    workers: int,
    rounds: int,
    payload_bytes: int,
    window: int,
    clients: int = 0,
    client_nice: int = 0,
) -> dict[str, float]:
    procs = clients or max(1, math.ceil(n / PER_CLIENT_PROC))
    n_sources = math.ceil(n / PER_SOURCE_IP) if n > PER_SOURCE_IP else 0
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n_sources)]
    with ServerProcess(
        workers=workers, extra=["--quiet", "--max-connections", str(n)], start_timeout_s=60
    ) as server:
        pids = worker_pids(server)
        time.sleep(1.0)
        uss0 = uss(pids)
        pool = ClientPool(procs, client_nice)
        try:
            shares = split(n, procs)
            t0 = time.monotonic()
            results = pool.all(
                "connect",
                lambda i: (
                    shares[i],
                    server.host,
                    server.port,
                    "/ws?channel=bench",
                    sources,
                    window,
                ),
            )
            connect_s = time.monotonic() - t0
            ok = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            online = wait_online(server, ok)
            time.sleep(2.0)  # let the figures settle (stats ticks, allocator)
            uss_n = uss(pids)
            times = []
            payload = "x" * payload_bytes
            for _ in range(rounds):
                pool.all("arm", lambda i: ())
                req = urllib.request.Request(
                    f"{server.url}/pub/bench", data=payload.encode(), method="POST"
                )
                t_pub = time.monotonic()
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                arrivals = [t for got in pool.all("collect", lambda i: (30.0,)) for t in got]
                if len(arrivals) < ok:
                    print(f"  broadcast round: only {len(arrivals)} of {ok} received", flush=True)
                if arrivals:
                    arrivals.sort()
                    times.append(
                        (arrivals[-1] - t_pub, arrivals[len(arrivals) // 2] - t_pub, len(arrivals))
                    )
                time.sleep(0.3)
        finally:
            pool.close()
    return {
        "connections": ok,
        "connect_failed": failed,
        "online_seen": online,
        "connect_rate_per_s": ok / connect_s,
        "workers": workers,
        "uss_idle_server_bytes": uss0,
        "uss_at_n_bytes": uss_n,
        "uss_per_conn_bytes": (uss_n - uss0) / max(ok, 1),
        "uss_total_per_conn_bytes": uss_n / max(ok, 1),
        "broadcast_all_ms": statistics.median(t[0] for t in times) * 1e3 if times else math.nan,
        "broadcast_p50_ms": statistics.median(t[1] for t in times) * 1e3 if times else math.nan,
        "broadcast_worst_ms": max(t[0] for t in times) * 1e3 if times else math.nan,
        "broadcast_delivered_min": min(t[2] for t in times) if times else 0,
        "client_nice": client_nice,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--connections", "-n", type=int, default=15_000, help="idle WebSockets (default 15000)"
    )
    p.add_argument("--workers", "-w", type=int, default=2, help="server workers (default 2)")
    p.add_argument(
        "--accept-connections",
        type=int,
        default=10_000,
        help="connections for the one-worker accept test (default 10000; 0 = skip)",
    )
    p.add_argument(
        "--accept-clients", type=int, default=1, help="client processes for the accept test"
    )
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help=f"client processes holding the N connections (default: one per {PER_CLIENT_PROC})",
    )
    p.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="nice increment for the broadcast test's client processes: on a shared box, "
        "lets the server run first, as if the clients were on other hosts (default 0)",
    )
    p.add_argument("--rounds", type=int, default=5, help="broadcast rounds (default 5)")
    p.add_argument(
        "--payload-bytes", type=int, default=64, help="broadcast message size (default 64)"
    )
    p.add_argument(
        "--window", type=int, default=256, help="handshakes in flight per client process"
    )
    args = p.parse_args(argv)
    raise_nofile_soft_limit()
    out: dict[str, Any] = {}
    if args.accept_connections:
        acc = bench_accept(args.accept_connections, args.window, args.accept_clients)
        out.update(acc)
        print(
            f"accept+upgrade, 1 worker: {acc['accept_connections']} connections at "
            f"{acc['accept_rate_per_s']:.0f}/s, server CPU {acc['accept_cpu_us_per_conn']:.1f} us "
            f"per connection (user {acc['accept_user_us_per_conn']:.1f}, system "
            f"{acc['accept_system_us_per_conn']:.1f}; {acc['accept_failed']} failed)"
            "   [targets >= 7000/s, <= 100 us]",
            flush=True,
        )
    mem = bench_memory_broadcast(
        args.connections,
        args.workers,
        args.rounds,
        args.payload_bytes,
        args.window,
        args.clients,
        args.client_nice,
    )
    out.update(mem)
    print(
        f"memory, {mem['workers']} workers, {mem['connections']} idle WebSockets "
        f"({mem['connect_failed']} failed, connected at {mem['connect_rate_per_s']:.0f}/s): "
        f"{mem['uss_per_conn_bytes'] / 1024:.2f} KiB summed worker USS per connection "
        f"(idle server {mem['uss_idle_server_bytes'] / 2**20:.1f} MiB, at N "
        f"{mem['uss_at_n_bytes'] / 2**20:.1f} MiB = "
        f"{mem['uss_total_per_conn_bytes'] / 1024:.2f} KiB "
        f"per connection with the baseline)   [target <= 4.0 KiB]",
        flush=True,
    )
    print(
        f"broadcast to all {mem['connections']} subscribers: "
        f"median {mem['broadcast_all_ms']:.1f} ms (p50 arrival {mem['broadcast_p50_ms']:.1f} ms, "
        f"worst round {mem['broadcast_worst_ms']:.1f} ms, "
        f"min delivered {mem['broadcast_delivered_min']}, client nice {mem['client_nice']})"
        "   [target <= 200 ms at 15000]",
        flush=True,
    )
    print(json.dumps({"kind": "bench_comet", **out}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
