"""Benchmark of lab.comet against the targets of issue 3; prints the figures.

- memory: summed USS of the workers per idle WebSocket at N connections with W workers
  (the growth over the idle server, divided by N; the absolute total is printed too);
- broadcast: one POST /pub to the channel all N subscribe to, median of ``--rounds``:
  * arrival: until the message is in all N client sockets, by the kernel's receive time of
    each client's read (SO_TIMESTAMPNS), i.e. what the server achieved, whenever the client
    process then got the CPU to read it;
  * read: until all N client processes have read it (includes the clients' own CPU time);
  * the server's own fan-out: the slowest worker's time to write the message to all its
    subscribers (``fanout_ms`` in /stats, for the message its ``fanout_id`` names), and
    which loop sent it (``fanout_c``: the workers' C loop, else Python);
- accept: accept + upgrade rate in one worker and the server CPU per new connection, median
  of ``--accept-repeats`` runs (every run printed).

The client side is a bare-epoll WebSocket client in this file (a fixed upgrade request, then
it only notes when data arrives), sharded over processes below the open-file limit, and over
several 127.x source addresses when one would run short of fast ports. Server and clients
share this host's cores: ``--client-mode after`` keeps the clients asleep through a
broadcast (they read afterwards), ``--client-nice 19`` lets the server run first; either way
"arrival" is then the server's figure, as if the clients were on other hosts.

    .venv/bin/python bench/bench_comet.py --connections 15000 --workers 2 --client-mode after
    .venv/bin/python bench/bench_comet.py -n 64000 -w 4 --client-mode after --rounds 10

``--server nchan`` measures nginx + nchan (the C comparator of ../shared/DESIGN.md, from
``apt-get install nginx libnginx-mod-nchan``) with the same clients, in the same way, on the
same box: what this machine allows a C server, beside what lab.comet gets. ``--server bare
--connections 0`` measures the accept floor of any Python server on uvloop here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import multiprocessing as mp
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.agent.capacity import IP_BIND_ADDRESS_NO_PORT
from lab.comet.launch import ServerProcess
from lab.limits import (
    fast_ports_per_pair,
    raise_nofile_soft_limit,
    read_host_limits,
    settle_time_wait,
)
from lab.rawio import ANC_BYTES, SO_TIMESTAMPNS

PER_CLIENT_PROC = 12_000
CONN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP


def upgrade_request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Clients:
    """One client process's WebSockets on a bare epoll loop (no asyncio: the lightest
    Python client there is, so that the server is what gets measured).

    Each connection notes, per broadcast round, the time its process read the message and the
    kernel's receive time of that read (``SO_TIMESTAMPNS``): the moment the message reached
    this host's socket, whenever the process got the CPU to read it.
    """

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.ep = select.epoll()
        self.ep.register(pipe.fileno(), select.EPOLLIN)
        self.conns: dict[int, socket.socket] = {}
        self.round = 0
        self.seen: dict[int, int] = {}  # fd -> last round it read a message in
        self.read_at: list[float] = []
        self.kernel_at: list[float] = []
        self.collect_until = 0.0

    def connect(
        self, n: int, host: str, port: int, path: str, sources: list[str], window: int
    ) -> tuple[int, int, float]:
        """Open ``n`` WebSockets, ``window`` handshakes in flight; (ok, failed, seconds)."""
        request = upgrade_request(host, port, path)
        ep = self.ep
        inflight: dict[int, tuple[socket.socket, bytearray]] = {}
        started = ok = failed = 0
        t0 = time.monotonic()
        deadline = t0 + 120.0
        while (started < n or inflight) and time.monotonic() < deadline:
            while len(inflight) < window and started < n:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                if sources:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((sources[started % len(sources)], 0))
                started += 1
                rc = sock.connect_ex((host, port))
                if rc not in (0, errno.EINPROGRESS):
                    sock.close()
                    failed += 1
                    continue
                inflight[sock.fileno()] = (sock, bytearray())
                ep.register(sock.fileno(), select.EPOLLOUT)
            for fd, ev in ep.poll(1.0):
                entry = inflight.get(fd)
                if entry is None:
                    continue
                sock, head = entry
                try:
                    if ev & select.EPOLLOUT:
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        sock.send(request)
                        ep.modify(fd, select.EPOLLIN)
                        continue
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionResetError
                    head += data
                    if b"\r\n\r\n" not in head:
                        continue
                    if not head.startswith(b"HTTP/1.1 101"):
                        raise ConnectionError(bytes(head[:40]))
                except OSError:
                    del inflight[fd]
                    ep.unregister(fd)
                    sock.close()
                    failed += 1
                    continue
                del inflight[fd]
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                ep.modify(fd, CONN_EVENTS)
                self.conns[fd] = sock
                ok += 1
        for fd, (sock, _) in inflight.items():
            ep.unregister(fd)
            sock.close()
            failed += 1
        return ok, failed, time.monotonic() - t0

    def _read(self, fd: int) -> None:
        sock = self.conns.get(fd)
        if sock is None:
            return
        try:
            data, anc, _, _ = sock.recvmsg(65536, ANC_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        if not data:
            self.ep.unregister(fd)
            del self.conns[fd]
            sock.close()
            return
        if self.seen.get(fd) != self.round:
            self.seen[fd] = self.round
            self.read_at.append(time.time())
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    self.kernel_at.append(sec + nsec * 1e-9)

    def serve(self) -> None:
        pipe_fd = self.pipe.fileno()
        while True:
            timeout = -1.0
            if self.collect_until:
                timeout = max(0.0, self.collect_until - time.monotonic())
            for fd, _ in self.ep.poll(timeout):
                if fd != pipe_fd:
                    self._read(fd)
                elif self._command():
                    return
            if self.collect_until and (
                len(self.read_at) >= len(self.conns) or time.monotonic() >= self.collect_until
            ):
                self.collect_until = 0.0
                self.pipe.send((self.read_at, self.kernel_at))

    def _command(self) -> bool:
        """Run one command from the bench; True when told to stop."""
        cmd, args = self.pipe.recv()
        if cmd == "connect":
            self.pipe.send(self.connect(*args))
        elif cmd == "arm":
            self.round += 1
            self.read_at, self.kernel_at = [], []
            self.pipe.send(True)
            if args and args[0] == "after":
                # wait for the next command outside epoll: no client wakes up or runs while
                # the server fans out (as if the clients were on other hosts); the messages
                # wait in the sockets with their kernel receive times, read at "collect"
                return self._command()
        elif cmd == "collect":
            self.collect_until = time.monotonic() + args[0]
        elif cmd == "close":
            linger = struct.pack("ii", 1, 0)  # reset: no TIME_WAIT left to slow the next run
            for sock in self.conns.values():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                sock.close()
            self.conns.clear()
            self.pipe.send(True)
            return True
        return False


def client_main(pipe: Connection, nice: int) -> None:
    """A client process: obeys commands from the bench over ``pipe``."""
    raise_nofile_soft_limit()
    if nice:
        os.nice(nice)
    Clients(pipe).serve()


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


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


class LabServer:
    """``lab.comet`` under test: its workers, its /stats, its own fan-out figure."""

    name = "lab.comet"
    ws_path = "/ws?channel=bench"

    def __init__(self, workers: int, max_connections: int = 0) -> None:
        extra = ["--quiet"]
        if max_connections:
            extra += ["--max-connections", str(max_connections)]
        self.proc = ServerProcess(workers=workers, extra=extra, start_timeout_s=60)

    def __enter__(self) -> LabServer:
        self.proc.start()
        self.host, self.port = self.proc.host, self.proc.port
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def worker_pids(self) -> list[int]:
        return [int(w["pid"]) for w in get_json(f"{self.proc.url}/stats")["workers"]]

    def online(self) -> int:
        return int(get_json(f"{self.proc.url}/stats")["online"])

    def publish(self, payload: bytes) -> int:
        return self.proc.publish("bench", payload)

    def fanout_ms(self, message_id: int, timeout_s: float = 5.0) -> float:
        """The slowest worker's fan-out of message ``message_id`` (the server's own figure:
        writing the message to all its subscribers), once every worker's entry in /stats
        (refreshed about once a second) is about that message."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # the workers holding subscribers (SO_REUSEPORT may leave one without any)
            workers = [w for w in get_json(f"{self.proc.url}/stats")["workers"] if w["online"]]
            if workers and all(int(w.get("fanout_id", 0)) >= message_id for w in workers):
                return max(float(w["fanout_ms"]) for w in workers)
            time.sleep(0.1)
        return math.nan

    def fanout_c(self) -> list[int]:
        """Per worker holding subscribers, the sends its C broadcast loop has made (0: its
        Python loop served)."""
        workers = get_json(f"{self.proc.url}/stats")["workers"]
        return [int(w.get("fanout_c", 0)) for w in workers if w["online"]]


NCHAN_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
load_module {module};
events {{ worker_connections {conns}; use epoll; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  server {{
    listen {host}:{port} reuseport backlog=4096;
    location = /ws {{ nchan_subscriber websocket; nchan_channel_id $arg_channel; }}
    location ~ ^/pub/(\\w+)$ {{ nchan_publisher; nchan_channel_id $1; }}
    location = /status {{ nchan_stub_status; }}
  }}
}}
"""


class NchanServer:
    """nginx + nchan, the C comparator of ../shared/DESIGN.md, measured the same way
    (``apt-get install nginx libnginx-mod-nchan``). Workers share the port with SO_REUSEPORT
    as lab.comet's do; nchan has no fan-out figure of its own."""

    name = "nginx + nchan"
    ws_path = "/ws?channel=bench"
    MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")

    def __init__(self, workers: int, max_connections: int = 0) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists() or not self.MODULE.exists():
            raise SystemExit(
                "bench_comet --server nchan: nginx or its nchan module is missing; "
                "install them with: apt-get install nginx libnginx-mod-nchan"
            )
        self.nginx, self.workers = nginx, workers
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        (self.dir / "nginx.conf").write_text(
            NCHAN_CONF.format(
                workers=workers,
                nofile=nofile,
                conns=nofile - 100,
                dir=self.dir,
                module=self.MODULE,
                host=self.host,
                port=self.port,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NchanServer:
        self.proc = subprocess.Popen(
            [self.nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if len(self.worker_pids()) == self.workers and self.online() >= 0:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.dir / "error.log").read_text() if (self.dir / "error.log").exists() else ""
        self.__exit__()
        raise SystemExit(f"bench_comet: nginx + nchan did not start: {log[-500:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers close their sockets
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def online(self) -> int:
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/status", timeout=10) as r:
            text = r.read().decode()
        m = re.search(r"^subscribers: (\d+)", text, re.M)
        if m is None:
            raise ValueError(f"nchan status without subscribers: {text[:200]!r}")
        return int(m.group(1))

    def publish(self, payload: bytes) -> int:
        req = urllib.request.Request(
            f"http://{self.host}:{self.port}/pub/bench", data=payload, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
        return 0

    def fanout_ms(self, message_id: int, timeout_s: float = 5.0) -> float:
        return math.nan


class BareServer:
    """The floor: the least a Python server on uvloop does per WebSocket upgrade, i.e.
    bench_agent's minimal independent server (``bench_agent.py --serve``: httptools, the
    ``Sec-WebSocket-Accept``, the 101, no channels, no other state). One process, whatever
    ``workers`` says; for the accept test."""

    name = "bare uvloop (floor)"
    ws_path = "/ws?channel=bench"

    def __init__(self, workers: int = 1, max_connections: int = 0) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> BareServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bench_agent.py")), "--serve", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["ready"])
        # its per-second lines are not needed: drained so that it never blocks on the pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def online(self) -> int:
        assert self.proc is not None
        return sum(
            1
            for c in psutil.Process(self.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED
        )

    def publish(self, payload: bytes) -> int:
        raise SystemExit(
            "bench_comet --server bare is a floor for the accept test only: add --connections 0"
        )

    def fanout_ms(self, message_id: int, timeout_s: float = 5.0) -> float:
        return math.nan


SERVERS: dict[str, type[LabServer] | type[NchanServer] | type[BareServer]] = {
    "lab": LabServer,
    "nchan": NchanServer,
    "bare": BareServer,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_online(server: Any, n: int, timeout_s: float = 30.0, below: bool = False) -> int:
    """Wait until the server counts ``n`` connections or more (``below``: ``n`` or fewer)."""
    deadline = time.monotonic() + timeout_s
    online = 0
    while time.monotonic() < deadline:
        online = server.online()
        if (online <= n) if below else (online >= n):
            break
        time.sleep(0.5)
    return online


def bench_accept(
    n: int, window: int, clients: int = 1, server_kind: str = "lab", repeats: int = 3
) -> dict[str, Any]:
    """Accept + upgrade rate and server CPU per connection in one worker: ``repeats`` times
    ``n`` new connections (closed again in between), the median and every run."""
    runs = []
    with SERVERS[server_kind](workers=1) as server:
        pids = server.worker_pids()
        target: tuple[Any, ...] = (server.host, server.port, "/ws?channel=a", [], window)
        # warm up: the first connections pay for imports and allocator growth
        pool = ClientPool(1)
        pool.all("connect", lambda i: (500, *target))
        pool.close()
        shares = split(n, clients)
        for _ in range(repeats):
            wait_online(server, 0, below=True)  # the previous connections are gone
            pool = ClientPool(clients)
            try:
                cpu0 = cpu_s(pids)
                t0 = time.monotonic()
                results = pool.all("connect", lambda i: (shares[i], *target))
                elapsed = time.monotonic() - t0
                cpu1 = cpu_s(pids)
            finally:
                pool.close()
            ok = max(1, sum(r[0] for r in results))
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            runs.append(
                {
                    "ok": ok,
                    "failed": sum(r[1] for r in results),
                    "rate": ok / elapsed,
                    "cpu": (user + system) / ok * 1e6,
                    "user": user / ok * 1e6,
                    "system": system / ok * 1e6,
                }
            )
    cpus = [r["cpu"] for r in runs]
    return {
        "accept_connections": min(r["ok"] for r in runs),
        "accept_repeats": repeats,
        "accept_failed": sum(r["failed"] for r in runs),
        "accept_rate_per_s": statistics.median(r["rate"] for r in runs),
        "accept_cpu_us_per_conn": statistics.median(cpus),
        "accept_cpu_us_per_conn_runs": cpus,
        "accept_user_us_per_conn": statistics.median(r["user"] for r in runs),
        "accept_system_us_per_conn": statistics.median(r["system"] for r in runs),
    }


def bench_memory_broadcast(
    n: int,
    workers: int,
    rounds: int,
    payload_bytes: int,
    window: int,
    clients: int = 0,
    client_nice: int = 0,
    client_mode: str = "live",
    server_kind: str = "lab",
) -> dict[str, float]:
    procs = clients or max(1, math.ceil(n / PER_CLIENT_PROC))
    # enough 127.x source addresses that connect() stays fast (lab.limits.FAST_PORT_SHARE)
    per_source = fast_ports_per_pair(read_host_limits())
    n_sources = math.ceil(n / per_source) if n > per_source else 0
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n_sources)]
    with SERVERS[server_kind](workers, max_connections=n) as server:
        pids = server.worker_pids()
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
                    server.ws_path,
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
            times: list[tuple[float, float, int, float, float, float]] = []
            payload = b"x" * payload_bytes
            for _ in range(rounds):
                pool.all("arm", lambda i: (client_mode,))
                t_pub = time.time()
                message_id = server.publish(payload)
                fanout = server.fanout_ms(message_id) if client_mode == "after" else 0.0
                got = pool.all("collect", lambda i: (30.0,))
                read_at = sorted(t for r, _ in got for t in r)
                kernel_at = sorted(t for _, k in got for t in k)
                if len(read_at) < ok:
                    print(f"  broadcast round: only {len(read_at)} of {ok} received", flush=True)
                if read_at and kernel_at:
                    times.append(
                        (
                            read_at[-1] - t_pub,
                            read_at[len(read_at) // 2] - t_pub,
                            len(read_at),
                            kernel_at[-1] - t_pub,
                            kernel_at[len(kernel_at) // 2] - t_pub,
                            fanout or server.fanout_ms(message_id),
                        )
                    )
                    read_all, _, _, kernel_all, kernel_p50, fan = times[-1]
                    read = f", read all {read_all * 1e3:.1f} ms" if client_mode == "live" else ""
                    print(
                        f"  round {len(times)}: arrival all {kernel_all * 1e3:.1f} ms "
                        f"(p50 {kernel_p50 * 1e3:.1f}){read}, server fan-out {fan:.1f} ms",
                        flush=True,
                    )
                time.sleep(0.3)
            loop_sends = server.fanout_c() if hasattr(server, "fanout_c") else None
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
        "broadcast_kernel_all_ms": median_ms(t[3] for t in times),
        "broadcast_kernel_p50_ms": median_ms(t[4] for t in times),
        "broadcast_kernel_worst_ms": max(t[3] for t in times) * 1e3 if times else math.nan,
        "fanout_ms": statistics.median(t[5] for t in times) if times else math.nan,
        "fanout_c": sum(loop_sends) if loop_sends is not None else None,
        "fanout_c_workers": loop_sends,
        "client_nice": client_nice,
        "client_mode": client_mode,
        "server": server.name,
    }


def median_ms(values: Any) -> float:
    got = list(values)
    return statistics.median(got) * 1e3 if got else math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--connections",
        "-n",
        type=int,
        default=15_000,
        help="idle WebSockets for the memory and broadcast tests (default 15000; 0 = skip them)",
    )
    p.add_argument("--workers", "-w", type=int, default=2, help="server workers (default 2)")
    p.add_argument(
        "--accept-connections",
        type=int,
        default=10_000,
        help="connections for the one-worker accept test (default 10000; 0 = skip)",
    )
    p.add_argument(
        "--accept-clients",
        type=int,
        default=2,
        help="client processes for the accept test (default 2: the 'fast client' of the "
        "target; one Python client process keeps a worker only partly busy, and an idle "
        "worker pays a wake-up per connection)",
    )
    p.add_argument(
        "--accept-repeats",
        type=int,
        default=3,
        help="times the accept test is run (its connections closed in between); the median "
        "is the figure, every run's CPU is printed (default 3: this VM's speed drifts)",
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
    p.add_argument(
        "--client-mode",
        choices=("live", "after"),
        default="live",
        help="live: clients wait in epoll and read each message as it comes (their wake-ups "
        "and reads share the cores with the server); after: clients stay asleep outside epoll "
        "during a broadcast and read afterwards, arrival from kernel receive times (the "
        "server measured as if its clients were on other hosts) (default live)",
    )
    p.add_argument(
        "--server",
        choices=sorted(SERVERS),
        default="lab",
        help="the server measured: lab (lab.comet); nchan (nginx + nchan, the C comparator "
        "of the design notes, from apt-get install nginx libnginx-mod-nchan), measured by the "
        "same clients in the same way; bare (the floor of a Python server on uvloop: "
        "bench_agent's minimal server; accept test only, with --connections 0) (default lab)",
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
    settle_time_wait()
    out: dict[str, Any] = {}
    if args.accept_connections:
        acc = bench_accept(
            args.accept_connections,
            args.window,
            args.accept_clients,
            args.server,
            args.accept_repeats,
        )
        out.update(acc)
        print(
            f"{SERVERS[args.server].name} accept+upgrade, 1 worker: "
            f"{acc['accept_connections']} connections at "
            f"{acc['accept_rate_per_s']:.0f}/s, server CPU {acc['accept_cpu_us_per_conn']:.1f} us "
            f"per connection (user {acc['accept_user_us_per_conn']:.1f}, system "
            f"{acc['accept_system_us_per_conn']:.1f}; {acc['accept_failed']} failed; median of "
            f"{acc['accept_repeats']} runs: "
            f"{', '.join(f'{c:.0f}' for c in acc['accept_cpu_us_per_conn_runs'])} us)"
            "   [targets >= 7000/s, <= 100 us]",
            flush=True,
        )
    if args.connections:  # 0: the accept test only
        mem = bench_memory_broadcast(
            args.connections,
            args.workers,
            args.rounds,
            args.payload_bytes,
            args.window,
            args.clients,
            args.client_nice,
            args.client_mode,
            args.server,
        )
        out.update(mem)
        loop = ""
        per_worker = mem["fanout_c_workers"]
        if per_worker is not None:  # lab.comet: which broadcast loop its workers ran
            in_c = sum(1 for n in per_worker if n)
            loop = "; its loop in " + (
                "C"
                if in_c == len(per_worker)
                else f"C in {in_c} of {len(per_worker)} workers"
                if in_c
                else "Python"
            )
        print(
            f"{mem['server']} memory, {mem['workers']} workers, {mem['connections']} idle "
            "WebSockets "
            f"({mem['connect_failed']} failed, connected at {mem['connect_rate_per_s']:.0f}/s): "
            f"{mem['uss_per_conn_bytes'] / 1024:.2f} KiB summed worker USS per connection "
            f"(idle server {mem['uss_idle_server_bytes'] / 2**20:.1f} MiB, at N "
            f"{mem['uss_at_n_bytes'] / 2**20:.1f} MiB = "
            f"{mem['uss_total_per_conn_bytes'] / 1024:.2f} KiB "
            f"per connection with the baseline)   [target <= 4.0 KiB]",
            flush=True,
        )
        print(
            f"{mem['server']} broadcast to all {mem['connections']} subscribers, "
            "arrival at the clients' sockets "
            f"(kernel receive time): median {mem['broadcast_kernel_all_ms']:.1f} ms (p50 arrival "
            f"{mem['broadcast_kernel_p50_ms']:.1f} ms, worst round "
            f"{mem['broadcast_kernel_worst_ms']:.1f} ms; the slowest worker's own fan-out "
            f"{mem['fanout_ms']:.1f} ms{loop})   [target <= 200 ms at 15000, <= 600 ms at 64000]",
            flush=True,
        )
        if mem["client_mode"] == "live":  # 'after' clients read when told to: not a latency
            print(
                f"{mem['server']} broadcast to all {mem['connections']} subscribers, "
                "read by the client processes: "
                f"median {mem['broadcast_all_ms']:.1f} ms (p50 {mem['broadcast_p50_ms']:.1f} ms, "
                f"worst round {mem['broadcast_worst_ms']:.1f} ms, min delivered "
                f"{mem['broadcast_delivered_min']}, client nice {mem['client_nice']}, clients "
                f"{mem['client_mode']})",
                flush=True,
            )
    print(json.dumps({"kind": "bench_comet", **out}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
