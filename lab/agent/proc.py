"""One load process: follows its shard of the schedule, reports a JSON line per second.

What it is for: the coordinator (``lab.agent.coordinator``) starts ``--procs`` of these as
``python -m lab.agent.proc``. Protocol on the pipes (one JSON object per line):

- stdin, line 1: the ``ProcConfig`` (``ProcConfigJSON``); the process builds its schedule
  shard, preallocates its records and answers ``{"ready": pid}`` on stdout;
- stdin, line 2: ``{"start_at": unix_s}``, the common start (may be in the future);
- stdin, later lines: ``{"expected": {channel: last_id}}`` once the publisher is done (a
  connection closing before it saw that id counts the missing ones as lost); EOF means the
  coordinator is gone: stop cleanly;
- stdout: ``{"tick": k, ...}`` once a second at ``start_at + k`` with the cumulative counters,
  the histograms of the interval, lag, CPU and USS; the last one has ``"final": true`` and
  ``"reason"`` (completed, max_duration, coordinator_gone, or the signal: SIGTERM / SIGINT);
  the first line after an HTTP answer failed a session carries ``"http_error": {"status",
  "url"}`` (status 0: not HTTP). Then the process writes its records to ``records_path`` and
  exits 0.

SIGTERM / SIGINT (or ``max_duration_s``): stop launching, close every connection cleanly
(the server closes first for WebSockets), flush the last line and the records, exit 0.

I/O: the event loop (uvloop) keeps the timers, signals and stdin; every connection's socket
lives in the process's own epoll set (``Poller``) behind a ``SockTransport``, which gives the
session protocols the asyncio calls they use, with no task, coroutine, loop transport or
socket object per connection. WebSocket sessions go faster still through the C fast path
(``lab.agent.fastpath``, unless ``fastpath`` is false in the config): it starts and upgrades
connections and holds idle ones with no Python object, in an epoll set of its own served
beside the ``Poller``'s, and hands a connection to the Python session objects ("adopts" it)
the moment anything else happens to it.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import gc
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, TypedDict

import psutil

from lab.agent import fastpath
from lab.agent.capacity import IP_BIND_ADDRESS_NO_PORT, is_loopback_host
from lab.agent.records import Outcome, Records
from lab.agent.schedule import Arrival, Phase, PhaseKind, build_schedule
from lab.agent.session import (
    CLIENTS,
    SessionKind,
    Shared,
    State,
    Target,
    classify,
    make_target,
)
from lab.limits import raise_nofile_soft_limit
from lab.rawio import (
    EPOLLIN,
    EPOLLOUT,
    OPEN,
    SO_TIMESTAMPNS,
    Poller,
    SockTransport,
    kernel_timestamps_on,
)

BATCH = 256  # opens/closes per scheduler turn before yielding to I/O
CLOSE_GRACE_S = 3.0  # how long a clean close may take at the end before aborting
TIMER_SLACK_S = 0.001  # timers fire up to 1 ms early: arm them this late
# the schedule timer wakes the process at most once per LAUNCH_WINDOW_S while arrivals are
# due: everything due by then starts together. A wake-up from idle costs a VM tens of µs of
# CPU and a lone connect() wakes the server into preempting us; at 2,500/s batches of ~5 cut
# wake-ups per connection 0.41 -> 0.31, preemptions 0.19 -> 0.02 and CPU per connection
# ~8%, for +0.6 ms of start delay (p50). The records keep each connection's own scheduled
# and started times, latency counts from the scheduled time and the lag is reported.
LAUNCH_WINDOW_S = 0.002
SOCK_STREAM_NONBLOCK = _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK
# how often the sockets are read (unless --read-on-arrival): the upgrade's connected time and
# each message's arrival come from the kernel's receive time, not from the read, so reading
# in ticks changes no time and saves a wake-up per arrival (half the agent's CPU per new
# connection at 2,500/s was wake-ups on this VM; inside a broadcast each one is paid in the
# server's send()). A read that brings a message with later bytes (another message within a
# tick) times only the last: the others are counted untimed (Shared.rx_time)
READ_TICK_S = 0.002
# ... and while no connection opens or closes for a while (a hold: connections idle, or
# receiving broadcasts), every IDLE_READ_TICK_S: four agent processes waking every 2 ms on a
# box shared with the server slowed its 64,000-subscriber fan-out by ~14% (bench_comet with
# such tickers beside it: median 530 ms against 465); and an idle uvloop process waking every
# 20 ms costs this VM 8-14 ms of CPU a second (~160-280 us a wake-up, cold caches), which in
# c64k's 4 load processes was ~20 us of agent CPU per new connection. With the C fast path
# the launcher thread starts the rows, so a whole ramp reads at this pace. Messages and the
# 101 are timed by the kernel; what waits for the tick: read_hist, and the close time of a
# connection the server dropped. Not for long-polls: their next poll waits for the read of
# the last answer
IDLE_READ_TICK_S = 0.05
IDLE_AFTER_S = 0.1  # a gap in the schedule this long or longer counts as a hold
PENDING = int(Outcome.PENDING)
# the process's USS is read every USS_EVERY lines (and in the last): reading it walks the page
# tables (/proc/self/smaps_rollup), ~3-6 ms of CPU for a process of 100-150 MB here, which
# every second in 4 load processes was ~5 us of agent CPU per new connection at 2,500/s
USS_EVERY = 5


def max_fds() -> int:
    """The highest file descriptor number this process can have, plus one."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < (1 << 22) else 1 << 22


def presize_fd_table(count: int) -> None:
    """Grow this process's file-descriptor table now to hold ``count`` descriptors. Linux
    doubles the table as descriptors are opened, and in a process with more than one thread
    each doubling waits for an RCU grace period (``expand_fdtable``: ``synchronize_rcu``):
    measured here, the launcher thread's ``socket()`` then stalled for up to 70 ms at 512,
    1,024 ... 8,192 descriptors, which showed as connect-latency spikes. Done while the
    process is single-threaded, the growth costs nothing. The table never shrinks."""
    top = min(max_fds(), count) - 1
    if top < 1024:
        return
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(fd, top, inheritable=False)
        os.close(top)
    finally:
        os.close(fd)


class ProcConfigJSON(TypedDict, total=False):
    """What the coordinator sends a load process (first stdin line)."""

    proc: int
    procs: int
    lanes: int  # processes opening side by side (Schedule.lanes); absent: procs
    agent: str
    session: str
    urls: list[str]
    source_ips: list[str | None]
    phases: list[dict[str, Any]]
    arrival: str
    seed: int
    max_duration_s: float | None
    connect_timeout_s: float
    subscribe: list[str]
    records_path: str | None
    lp_timeout_s: float
    kernel_timestamps: bool
    fastpath: bool  # WebSocket sessions through the C fast path (absent: true)


def phases_from_json(items: list[dict[str, Any]]) -> list[Phase]:
    return [
        Phase(
            PhaseKind(p["kind"]),
            rate_per_s=p.get("rate_per_s"),
            until=p.get("until"),
            duration_s=p.get("duration_s"),
            count=p.get("count"),
        )
        for p in items
    ]


def phases_to_json(phases: list[Phase]) -> list[dict[str, Any]]:
    out = []
    for p in phases:
        d: dict[str, Any] = {"kind": p.kind.value}
        for k in ("rate_per_s", "until", "duration_s", "count"):
            if getattr(p, k) is not None:
                d[k] = getattr(p, k)
        out.append(d)
    return out


class LoadProcess:
    """The event-loop side of one load process (thin adapter over the pure schedule)."""

    def __init__(self, cfg: ProcConfigJSON) -> None:
        self.cfg = cfg
        self.proc = int(cfg.get("proc", 0))
        self.procs = int(cfg.get("procs", 1))
        full = build_schedule(
            phases_from_json(cfg["phases"]),
            arrival=Arrival(cfg.get("arrival", "uniform")),
            seed=int(cfg.get("seed", 0)),
        )
        lanes = cfg.get("lanes")
        self.sched = full.shard(self.proc, self.procs, None if lanes is None else int(lanes))
        n = len(self.sched)
        # row i is the agent's connection first + i * step
        self.first, self.step = self.sched.first, self.sched.step
        self.records = Records(
            n,
            proc=self.proc,
            procs=self.procs,
            agent=str(cfg.get("agent", "")),
            first=self.first,
            step=self.step,
        )
        kind = SessionKind(cfg.get("session", "websocket"))
        self.targets: list[Target] = [
            make_target(u, kind, lp_timeout_s=float(cfg.get("lp_timeout_s", 25.0)))
            for u in cfg["urls"]
        ]
        self.sources: list[str | None] = list(cfg.get("source_ips") or [None])
        self.client_cls = CLIENTS[kind]
        self.slow_connect = kind is SessionKind.LONGPOLL
        self.n_sources = len(self.sources)
        self.pairs = self.n_sources * len(self.targets)
        # (source, target, address) per pair: connection g uses pair g % pairs
        self.dests = [
            (self.sources[p % self.n_sources], t, t.addr)
            for p in range(self.pairs)
            for t in (self.targets[p // self.n_sources],)
        ]
        self.sh = Shared(self.records, tuple(cfg.get("subscribe") or ()))
        self.sh.rx_split = kind is not SessionKind.LONGPOLL  # (see Shared.rx_time)
        self.http_error_sent = False
        self.close_order = sorted(range(n), key=self.sched.close_s.__getitem__)
        self.connect_timeout_s = float(cfg.get("connect_timeout_s", 10.0))
        self.max_duration_s = cfg.get("max_duration_s")
        self.next_open = 0
        self.next_close = 0
        self.stopping = False
        self.reason = ""
        self.tick = 0
        self.start_at = 0.0
        self.t0 = 0.0  # loop.time() at start_at
        self.mono0 = 0.0  # time.monotonic() at start_at
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Event | None = None
        self.ps = psutil.Process()
        self.uss: int | None = None  # the last USS read (every USS_EVERY lines)
        # read with SO_TIMESTAMPNS: messages are timed by their arrival at this host
        self.kernel_timestamps = bool(cfg.get("kernel_timestamps", True))
        self.stamps_on = kernel_timestamps_on() if self.kernel_timestamps else None
        self.poller = Poller(self.sh)
        self.fast: fastpath.FastPath | None = None
        if cfg.get("fastpath", True) and kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC):
            lib, _ = fastpath.load()  # (the coordinator said why not)
            if lib is not None:
                n_src = self.n_sources
                self.fast = fastpath.FastPath(
                    lib,
                    self.records,
                    self.dests,
                    [p // n_src for p in range(self.pairs)],
                    len(self.targets),
                    timestamps=self.kernel_timestamps,
                    maxfd=max_fds(),
                    after=self.sh.subscribe_frames,
                )
                self.poller.also = self._fast_poll
                self.poller.also_fd = self.fast.ep_fd
        # the C fast path's launcher thread starts the rows when no row closes before the last
        # one opens (no churn: closes stay with the event loop, after every open)
        close_s = self.sched.close_s
        self.threaded = self.fast is not None and n > 0 and min(close_s) > self.sched.open_s[-1]
        self.launcher: threading.Thread | None = None
        self.loopback = all(is_loopback_host(t.addr[0]) for t in self.targets)
        if self.threaded:
            presize_fd_table(n + 256)

    # -- schedule ---------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self.mono0

    def _unix(self) -> float:
        """Now in unix seconds on the start's scale (monotonic since the start: records are
        never earlier than their scheduled time through clock noise)."""
        return self.start_at + (time.monotonic() - self.mono0)

    def _pump(self) -> None:
        """Open and close everything that is due, then arm the timer for the next event."""
        if self.stopping:
            return
        loop = self.loop
        assert loop is not None
        el = self._elapsed()
        opens = self.sched.open_s
        n = len(opens)
        budget = BATCH
        k = self.next_open
        c = self.sh.counters
        if k < n and opens[k] <= el:
            lag = el - opens[k]  # the earliest due is the latest
            if lag > c.lag_max_s:
                c.lag_max_s = lag
        fast = self.fast
        if self.threaded:
            pass  # the launcher thread starts them
        elif fast is not None:
            k0 = k
            while k < n and opens[k] <= el and budget:
                k += 1
                budget -= 1
            if k > k0:
                fast.launch(k0, k)
                self._fast_fails()
        else:
            while k < n and opens[k] <= el and budget:
                self._launch(k)
                k += 1
                budget -= 1
        self.next_open = k
        closes = self.sched.close_s
        order = self.close_order
        j = self.next_close
        if self.launcher is not None and j < n and closes[order[j]] <= el:
            self._join_launcher(stop=False)  # every open before the first close
        while j < n and closes[order[j]] <= el and budget:
            self._close(order[j])
            j += 1
            budget -= 1
        self.next_close = j
        if not budget:
            loop.call_soon(self._pump)
            return
        nxt = min(opens[k] if k < n else math.inf, closes[order[j]] if j < n else math.inf)
        if self.poller.tick_s > 0 and not self.slow_connect:
            self.poller.tick_s = IDLE_READ_TICK_S if nxt - el >= IDLE_AFTER_S else READ_TICK_S
            if self.launcher is not None and not self.loopback:
                # elsewhere than on loopback a request waits for EPOLLOUT, which the tick
                # serves: the launcher's ramp is read at the ramp's pace
                self.poller.tick_s = READ_TICK_S
            elif self.launcher is not None and n and opens[0] - el >= IDLE_AFTER_S:
                # nothing to read before the launcher opens this process's first row (its
                # turn): one tick then, and the hold's pace from there
                self.poller.tick_s = opens[0] - el
                loop.call_at(self.t0 + opens[0], self._idle_tick)
        if nxt == math.inf:
            end = self.sched.end_s
            if el >= end:
                self._finish("completed")
            else:
                loop.call_at(self.t0 + end, self._pump)
            return
        # the loop's timers have 1 ms resolution and may fire up to 1 ms early: arm 1 ms late
        # rather than spin on early wake-ups; and wake at most once per LAUNCH_WINDOW_S
        loop.call_at(max(self.t0 + nxt + TIMER_SLACK_S, loop.time() + LAUNCH_WINDOW_S), self._pump)

    def _launch(self, i: int) -> None:
        """Start connection ``i``: a raw socket bound to its source address without a port
        (IP_BIND_ADDRESS_NO_PORT: the kernel picks the port per 4-tuple at connect time), a
        non-blocking connect, and the session's first request written at once: on loopback
        the handshake is done when connect() returns; elsewhere the kernel refuses the write
        and the request waits for EPOLLOUT. No task, coroutine or event-loop handle per
        connection: the socket joins the process's epoll set (``Poller``)."""
        sh = self.sh
        # the agent-wide index spreads connections over (source, destination) pairs
        src, tgt, addr = self.dests[(self.first + i * self.step) % self.pairs]
        rec = self.records
        rec.started[i] = self.start_at + (time.monotonic() - self.mono0)  # = self._unix()
        rec.outcome[i] = PENDING
        sh.counters.started += 1
        try:
            # non-blocking from the start: one syscall, not three
            sock = _socket.socket(tgt.family, SOCK_STREAM_NONBLOCK)
        except OSError as exc:
            sh.fail(i, classify(exc))
            return
        try:
            if src is not None:
                sock.setsockopt(_socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            if self.kernel_timestamps:
                sock.setsockopt(_socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            rc = sock.connect_ex(addr)
            if rc and rc != errno.EINPROGRESS:
                raise OSError(rc, os.strerror(rc))
        except OSError as exc:
            sock.close()
            sh.fail(i, classify(exc))
            return
        client = self.client_cls(sh, i, tgt)
        if self.kernel_timestamps:
            tr = client.tr = SockTransport(self.poller, sock.fileno(), client)
            tr.sock = sock
        else:
            tr = client.tr = SockTransport(self.poller, sock.detach(), client)
        sh.conns[i] = client
        if self.slow_connect:  # long-poll: "connected" means the TCP handshake is done
            sh.pending[i] = client
            self.poller.add(tr, EPOLLOUT)
            return
        tr.state = OPEN
        client.connection_made(tr)
        if tr.state == OPEN:
            self.poller.add(tr, EPOLLIN | EPOLLOUT if tr.buf else EPOLLIN)

    def _close(self, i: int) -> None:
        client = self.sh.conns[i]
        if client is None and self.fast is not None:
            client = self._take(i)
        if client is not None:
            client.close()

    def _sweep_timeouts(self) -> None:
        limit = self._unix() - self.connect_timeout_s
        started = self.records.started
        for i, client in list(self.sh.pending.items()):
            if started[i] < limit:
                client.fail(Outcome.TIMEOUT)
        if self.fast is not None:
            for i in self.fast.expired(limit):
                client = self._take(i)
                if client is not None:
                    client.fail(Outcome.TIMEOUT)

    # -- the C fast path's hand-overs --------------------------------------------------------
    def _adopt(self, i: int, fd: int, state: int) -> Any:
        """Row ``i``'s connection on ``fd``, until now the C fast path's, as Python session
        objects in the ``Poller``'s set, in the state C had it in (``fastpath.ST_*``)."""
        sh = self.sh
        tgt = self.dests[self._pair(i)][1]
        client = self.client_cls(sh, i, tgt)
        tr = client.tr = SockTransport(self.poller, fd, client)
        if self.kernel_timestamps:
            tr.sock = _socket.socket(tgt.family, _socket.SOCK_STREAM, 0, fd)
        sh.conns[i] = client
        tr.state = OPEN
        if state == fastpath.ST_HELD:
            client.st = State.OPEN
        else:  # the request is out (or C gave up on it): the response is due
            client.st = State.HANDSHAKE
            sh.pending[i] = client
        self.poller.add(tr, EPOLLIN)
        return client

    def _pair(self, i: int) -> int:
        """The (source, destination) pair of row ``i`` (``_launch`` inlines it: hot path)."""
        return (self.first + i * self.step) % self.pairs

    def _take(self, i: int) -> Any:
        """Row ``i``'s session objects, taking the connection from C if C holds it."""
        assert self.fast is not None
        fd, state = self.fast.release(i)
        return self._adopt(i, fd, state) if fd >= 0 else None

    def _idle_tick(self) -> None:
        self.poller.tick_s = IDLE_READ_TICK_S

    def _start_launcher(self) -> None:
        fast = self.fast
        assert fast is not None
        self.next_open = len(self.sched)  # the launcher's now (the event loop keeps the closes)
        loop = self.loop
        assert loop is not None

        def launch() -> None:
            fast.run(self.sched.open_s, 0, LAUNCH_WINDOW_S)
            with contextlib.suppress(RuntimeError):  # (the loop is closed: the run is over)
                loop.call_soon_threadsafe(self._launcher_done)

        self.launcher = threading.Thread(target=launch, name="launcher", daemon=True)
        self.launcher.start()

    def _launcher_done(self) -> None:
        """Every row is started: the hold's pace (the ramp's, off loopback, till now)."""
        if self.poller.tick_s > 0 and not self.stopping and self.next_close == 0:
            self.poller.tick_s = IDLE_READ_TICK_S

    def _join_launcher(self, stop: bool) -> None:
        """Wait for the launcher thread to end (``stop``: now, else once every row started)."""
        if self.launcher is None:
            return
        assert self.fast is not None
        if stop:
            self.fast.stop()
        self.launcher.join()
        self.launcher = None
        self._fast_fails()

    def _fast_fails(self) -> None:
        assert self.fast is not None
        for i, err in self.fast.fails():
            self.sh.fail(i, classify(OSError(err, os.strerror(err))))

    def _fast_poll(self) -> int:
        """Serve the C fast path's set; adopt what it hands over. Returns the events served."""
        fast = self.fast
        assert fast is not None
        handed, served = fast.poll()
        sh = self.sh
        for kind, fd, i, arg, data, ts in handed:
            if kind == fastpath.EV_FAIL:  # C closed it
                sh.fail(i, classify(OSError(arg, os.strerror(arg))))
            elif kind == fastpath.EV_ADOPT_DATA:  # a response C does not know: Python's check
                client = self._adopt(i, fd, fastpath.ST_HANDSHAKE)
                sh.rx_time = ts
                try:
                    client.data_received(data)
                finally:
                    sh.read_done()
                known = sh.upgrades.get(client.tgt.accept)
                if known is not None:
                    t = self._pair(i) // self.n_sources
                    fast.expect(t, known)
            else:  # EV_ADOPT_HELD: something happened on it (arg: its epoll events)
                client = self._adopt(i, fd, fastpath.ST_HELD if arg >= 0 else fastpath.ST_HANDSHAKE)
                if data:  # the subscribe frames C could not write whole
                    client.tr.write(data)
                    sh.counters.bytes_out += len(data)
                if arg != 0:
                    client.tr.ready(EPOLLIN if arg < 0 else arg)
        return served

    # -- reporting --------------------------------------------------------------------------
    def _line(self, final: bool = False) -> dict[str, Any]:
        c = self.sh.counters
        opened = self.next_open
        if self.fast is not None:
            c.lag_max_s = max(c.lag_max_s, self.fast.take(c, self.sh.connect_hist))
            if self.threaded:
                opened = self.fast.launched
        lag = c.lag_max_s
        if not self.stopping and opened < len(self.sched):
            lag = max(lag, self._elapsed() - self.sched.open_s[opened])
        try:
            cpu = self.ps.cpu_percent(None)
            if final or self.uss is None or self.tick % USS_EVERY == 1:
                self.uss = self.ps.memory_full_info().uss
            uss = self.uss
        except psutil.Error:
            cpu, uss = 0.0, 0
        line = {
            "tick": self.tick,
            "t": time.time(),
            "pid": os.getpid(),
            "proc": self.proc,
            "started": c.started,
            "connected": c.connected,
            "open": c.open,
            "closed": c.closed,
            "dropped": c.dropped,
            "failed": dict(
                zip(
                    ("refused", "timeout", "reset", "no_port", "no_files", "http", "other"),
                    c.failed,
                    strict=True,
                )
            ),
            "msgs_in": c.msgs_in,
            "msgs_out": c.msgs_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "lost": c.lost,
            "dup": c.dup,
            "reordered": c.reordered,
            "untimed": c.untimed,
            "lag_ms": round(max(0.0, lag) * 1000.0, 3),
            "cpu_percent": cpu,
            "uss": uss,
            "connect_hist": self.sh.connect_hist.to_json(),
            "delivery_hist": self.sh.delivery_hist.to_json(),
            "read_hist": self.sh.read_hist.to_json(),
        }
        if self.sh.http_error is not None and not self.http_error_sent:
            # once: the coordinator prints the first one it gets (the line's fields stay as is)
            status, tgt = self.sh.http_error
            line["http_error"] = {"status": status, "url": tgt.url}
            self.http_error_sent = True
        if final:
            line["final"] = True
            line["reason"] = self.reason
        c.lag_max_s = 0.0
        self.sh.connect_hist.reset()
        self.sh.delivery_hist.reset()
        self.sh.read_hist.reset()
        return line

    def _emit(self, line: dict[str, Any]) -> None:
        try:
            sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # the coordinator is gone; records still flush
            pass

    def _on_tick(self) -> None:
        if self.done is None or self.done.is_set():
            return
        self.tick += 1
        if self.launcher is not None:
            self._fast_fails()  # the launcher's failed starts, before the line counts them
        self._sweep_timeouts()
        self._emit(self._line())
        assert self.loop is not None
        self.loop.call_at(self.t0 + self.tick + 1, self._on_tick)

    # -- stop -------------------------------------------------------------------------------
    def _finish(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.reason = reason
        assert self.loop is not None
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        sh = self.sh
        unconnected = Outcome.TIMEOUT if self.reason == "completed" else Outcome.PENDING
        self._join_launcher(stop=self.reason != "completed")
        for i, client in enumerate(sh.conns):
            if client is None and self.fast is not None:
                client = self._take(i)
            if client is not None:
                client.close(unconnected)
            if i % 2048 == 2047:
                await asyncio.sleep(0)
        deadline = time.monotonic() + CLOSE_GRACE_S
        while any(c is not None for c in sh.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in sh.conns:
            if client is not None and client.tr is not None:
                client.tr.abort()
        await asyncio.sleep(0)
        assert self.done is not None
        self.done.set()

    async def run(self, start_at: float) -> str:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.done = asyncio.Event()
        now = time.time()
        self.start_at = start_at
        self.t0 = loop.time() + (start_at - now)
        self.mono0 = time.monotonic() + (start_at - now)
        self.sh.clock = self._unix
        if self.fast is not None:
            self.fast.set_clock(start_at, self.mono0)
        # with kernel receive times the sockets are read in ticks (their figures do not
        # depend on when they are read), else at each arrival
        # (until the first _pump sets the pace: at the hold's, not every 2 ms before the start;
        # long-polls always every 2 ms)
        tick = READ_TICK_S if self.slow_connect else IDLE_READ_TICK_S
        self.poller.start(loop, tick if self.kernel_timestamps else 0.0)
        sched = self.sched
        for i in range(len(sched)):
            self.records.scheduled[i] = start_at + sched.open_s[i]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._finish, sig.name)
        if self.max_duration_s:
            loop.call_at(self.t0 + float(self.max_duration_s), self._finish, "max_duration")
        self.ps.cpu_percent(None)
        self._watch_stdin()
        loop.call_at(self.t0, self._pump)
        if self.threaded:
            self._start_launcher()
        loop.call_at(self.t0 + 1, self._on_tick)
        await self.done.wait()
        self.tick += 1
        self._emit(self._line(final=True))
        return self.reason

    def _watch_stdin(self) -> None:
        """Commands from the coordinator after the start: ``{"expected": {channel: last_id}}``."""
        assert self.loop is not None
        fd = sys.stdin.fileno()
        buf = bytearray()

        def readable() -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # the coordinator is gone: stop cleanly rather than run orphaned
                assert self.loop is not None
                self.loop.remove_reader(fd)
                self._finish("coordinator_gone")
                return
            buf.extend(chunk)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                try:
                    cmd = json.loads(line)
                except ValueError:
                    continue
                if isinstance(cmd, dict) and isinstance(cmd.get("expected"), dict):
                    self.sh.expected.update({str(k): int(v) for k, v in cmd["expected"].items()})

        try:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, readable)
        except OSError:  # not a pipe (run by hand): no commands
            pass

    def save_records(self) -> None:
        path = self.cfg.get("records_path")
        if path:
            self.records.save(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one load process (started by the coordinator, configured on stdin)."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator forwards it as SIGTERM
    raise_nofile_soft_limit()
    cfg: ProcConfigJSON = json.loads(sys.stdin.readline())
    lp = LoadProcess(cfg)
    gc.collect()
    gc.freeze()  # the setup's objects never need scanning again
    # held connections are long-lived: collect young objects rarely, old ones almost never
    gc.set_threshold(50_000, 50, 1000)
    try:
        # stopped before the start: every row is written as not_started
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0  # the coordinator went away before the start
        start_at = float(json.loads(line)["start_at"])
        uvloop.run(lp.run(start_at))
    finally:
        lp.save_records()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
