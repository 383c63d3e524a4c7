"""One worker process of the comet server: its own SO_REUSEPORT listener on uvloop, the
connections it accepted, its copy of every channel's history, and the control link to the
supervisor, which sequences every publish and sends it to every worker in order.

Started by the supervisor as ``python -m lab.comet.worker --control-fd N``; the first control
message is its ``WorkerConfig``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import Any, cast

from lab.comet import fanout
from lab.comet.config import WorkerConfig
from lab.comet.connection import HttpConn
from lab.comet.fdio import Acceptor, Waiting
from lab.comet.ipc import Decoder, IpcError, encode
from lab.comet.protocol import CLOSE_GOING_AWAY, Hub, Message, Outgoing, ws_ping_frame
from lab.comet.websocket import WsConn
from lab.limits import raise_nofile_soft_limit

log = logging.getLogger("lab.comet.worker")

# Seconds a stopping worker waits for clients to finish their closing handshakes.
DRAIN_S = 3.0
# GC: the connections are long-lived and acyclic once set up; collect young objects rarely.
GC_THRESHOLDS = (50_000, 50, 100)

Conn = HttpConn | WsConn | Waiting


class ControlLink(asyncio.Protocol):
    """The worker's end of the control link (a Unix socket to the supervisor)."""

    def __init__(self, worker: Worker, decoder: Decoder) -> None:
        self.worker = worker
        self.decoder = decoder
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except IpcError as exc:
            log.error("control link broken: %s", exc)
            self.worker.begin_stop()
            return
        for message in messages:
            self.worker.on_control(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.worker.begin_stop()

    def send(self, message: dict[str, Any]) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(message))
        return True


class Worker:
    """A worker's state: connections, subscriptions (``hub``), counters, control link."""

    def __init__(
        self,
        config: WorkerConfig,
        control_sock: socket.socket,
        decoder: Decoder,
        early: list[dict[str, Any]],
    ) -> None:
        self.config = config
        self.decoder = decoder
        self.early = early
        self.index = config.index
        self.pid = os.getpid()
        self.control_sock = control_sock
        self.hub: Hub[Any] = Hub(config.history)
        self.conns: set[Conn] = set()
        self.max_conns = config.max_conns
        self.max_message_bytes = config.max_message_bytes
        self.max_head_bytes = config.max_head_bytes
        # Unsent bytes a WebSocket may queue before it counts as too slow and is cut.
        self.max_buffer_bytes = max(4 << 20, 4 * config.max_message_bytes)
        token = config.publish_token
        self.token = token.encode() if token else None
        self.request_timeout_s = config.request_timeout_s
        # HTTP connections (not yet upgraded): swept once a second for --request-timeout
        self.http_conns: set[Any] = set()
        self.ticks = 0  # seconds (ticks) since the worker started
        self.connects = 0
        self.messages = 0
        self.closes = 0
        self.errors = 0
        self._events_last = 0
        self.fanout_ms = 0.0  # the latest fan-out: writing one message to all subscribers here
        self.fanout_subscribers = 0
        self.fanout_id = 0  # the (per-channel) id of the message of that fan-out
        self.pending: dict[int, HttpConn] = {}
        self._next_req = 0
        self._channel_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.snapshot: dict[str, Any] | None = None
        self._healthy = False
        self.stopping = False
        self.started = time.monotonic()
        self.link: ControlLink | None = None
        self.acceptor: Acceptor | None = None
        self.fast_fanout: fanout.FanOut | None = None  # the C broadcast loop, once serving
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ sharing

    def intern_channel(self, channel: str) -> str:
        return sys.intern(channel)

    def channel_tuple(self, channels: tuple[str, ...]) -> tuple[str, ...]:
        """One shared tuple per distinct channel set: thousands of subscribers of the same
        channels hold references, not copies."""
        if not channels:
            return ()
        shared = self._channel_tuples.get(channels)
        if shared is None:
            if len(self._channel_tuples) > 10_000:
                self._channel_tuples.clear()
            shared = tuple(sys.intern(c) for c in channels)
            self._channel_tuples[shared] = shared
        return shared

    # ------------------------------------------------------------------ publishing

    def publish(self, channel: str, data: str, conn: HttpConn) -> bool:
        """Forward a publish to the supervisor; ``conn.published(id)`` once it is sequenced."""
        if self.link is None:
            return False
        self._next_req += 1
        req = self._next_req
        if not self.link.send({"op": "pub", "ch": channel, "data": data, "req": req}):
            return False
        self.pending[req] = conn
        return True

    def on_control(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "msg":
            msg = Message(message["ch"], message["id"], message["data"])
            subscribers = self.hub.record(msg)
            if subscribers:
                t0 = time.perf_counter()
                self.fan_out(Outgoing(msg), subscribers, msg.channel)
                self.fanout_ms = (time.perf_counter() - t0) * 1e3
                self.fanout_subscribers = len(subscribers)
                self.fanout_id = msg.id
            if message.get("w") == self.pid:
                conn = self.pending.pop(message["req"], None)
                if conn is not None:
                    conn.published(msg.id)
        elif op == "snapshot":
            self.snapshot = message["stats"]
            self._healthy = bool(message.get("healthy"))
        elif op == "stop":
            self.begin_stop()

    def fan_out(self, out: Outgoing, subscribers: list[Any], channel: str) -> None:
        """Write one message to every subscriber of this worker: the hot loop of a broadcast.
        A WebSocket gets the same frame bytes (serialized once): in C where it can
        (``lab.comet.fanout``), else here; long-polls and SSE streams format their own
        answer."""
        frame = out.ws_frame
        fast = self.fast_fanout
        if fast is not None:
            subscribers = fast.send(channel, subscribers, frame)
        for sub in subscribers:
            if type(sub) is WsConn:
                transport = sub.transport
                if transport is not None:
                    transport.write(frame)
            else:
                sub.deliver(out)

    # ------------------------------------------------------------------ figures

    def events(self) -> int:
        return self.connects + self.messages + self.closes

    def own_figures(self, pcs: int | None = None) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": self.pid,
            "online": len(self.conns),
            "events": self.events(),
            "connects": self.connects,
            "messages": self.messages,
            "closes": self.closes,
            "errors": self.errors,
            "pcs": pcs if pcs is not None else 0,
            "fanout_ms": round(self.fanout_ms, 3),
            "fanout_subscribers": self.fanout_subscribers,
            "fanout_id": self.fanout_id,
            # sends made by the C loop so far (lab.comet.fanout); 0: the Python loop serves
            "fanout_c": self.fast_fanout.sent if self.fast_fanout is not None else 0,
        }

    def stats_json(self) -> bytes:
        """The /stats body: the supervisor's latest all-worker figures (at most a second old)."""
        stats = self.snapshot
        if stats is None:
            own = self.own_figures()
            stats = {
                "online": own["online"],
                "uptime_s": int(time.monotonic() - self.started),
                "workers": [own],
            }
        return json.dumps(stats, separators=(",", ":")).encode() + b"\n"

    def healthy(self) -> bool:
        return self._healthy and not self.stopping

    def _tick(self) -> None:
        self.ticks += 1
        if self.fast_fanout is not None:
            self.fast_fanout.forget_stale()
        if self.request_timeout_s > 0:
            # idle since tick t = since some time in (t - 1, t]: at least the timeout has passed
            # once t <= ticks - ceil(timeout) - 1
            self._sweep(self.ticks - math.ceil(self.request_timeout_s) - 1)
        events = self.events()
        pcs = events - self._events_last
        self._events_last = events
        if self.link is not None:
            self.link.send({"op": "stats", **self.own_figures(pcs)})

    def _sweep(self, before: int) -> None:
        """End the HTTP connections that have waited for a request since tick ``before``."""
        late = [c for c in self.http_conns if 0 <= c.idle_tick <= before]
        for conn in late:
            conn.timed_out()

    def _ping(self) -> None:
        frame = ws_ping_frame()
        for conn in list(self.conns):
            if type(conn) is WsConn and conn.transport is not None and conn.reader is None:
                conn.transport.write(frame)

    # ------------------------------------------------------------------ lifecycle

    def _listen_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind((self.config.host, self.config.port))
        sock.setblocking(False)
        return sock

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        raise_nofile_soft_limit()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_stop)
        for message in self.early:
            self.on_control(message)
        self.early = []
        _, link = await loop.create_unix_connection(
            lambda: ControlLink(self, self.decoder), sock=self.control_sock
        )
        self.link = link
        sock = self._listen_socket()
        sock.listen(self.config.backlog)
        self.acceptor = Acceptor(self, sock, loop)
        lib, _ = fanout.load()  # built by the supervisor (which said why not)
        if lib is not None:
            self.fast_fanout = fanout.FanOut(lib, self.hub, self.acceptor.poller)
        link.send({"op": "ready", "pid": self.pid, "worker": self.index})
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        ticker = asyncio.create_task(self._every(1.0, self._tick))
        pinger = None
        if self.config.ping_interval_s > 0:
            pinger = asyncio.create_task(self._every(self.config.ping_interval_s, self._ping))
        await self._stop.wait()
        ticker.cancel()
        if pinger is not None:
            pinger.cancel()
        await self._drain()
        self._tick()
        if self.link is not None and self.link.transport is not None:
            self.link.transport.close()
        return 0

    async def _every(self, interval_s: float, fn: Any) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time() + interval_s
        while True:
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            next_t += interval_s
            try:
                fn()
            except Exception:  # a bug here must not stop the figures and sweeps for good
                log.exception("worker %d: %s failed; going on", self.index, fn.__name__)

    def begin_stop(self) -> None:
        """Stop accepting; send every WebSocket close 1001; end long-polls and SSE streams."""
        if self.stopping:
            return
        self.stopping = True
        if self.acceptor is not None:
            self.acceptor.close()
        for conn in list(self.conns):
            if isinstance(conn, WsConn):
                conn.close(CLOSE_GOING_AWAY, "server shutting down")
            else:
                conn.shutdown()
        self._stop.set()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while self.conns and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


def _read_config(sock: socket.socket) -> tuple[WorkerConfig, Decoder, list[dict[str, Any]]]:
    """Block for the first control message (the config); return it, the decoder (it may hold
    a partial message) and the messages that came with it."""
    decoder = Decoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("lab.comet.worker: the supervisor closed the control link at start")
        messages = decoder.feed(data)
        if messages:
            if messages[0]["op"] != "config":
                raise SystemExit("lab.comet.worker: expected the config message first")
            return WorkerConfig.from_dict(messages[0]), decoder, messages[1:]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lab.comet.worker",
        description="A comet server worker; started by the lab.comet supervisor, not by hand.",
    )
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s[%(process)d]: %(message)s")
    sock = socket.socket(fileno=args.control_fd)
    sock.setblocking(True)
    config, decoder, early = _read_config(sock)
    sock.setblocking(False)
    import uvloop

    async def run() -> int:
        return await Worker(config, sock, decoder, early).serve()

    profile_to = os.environ.get("LAB_COMET_PROFILE")  # developer aid: cProfile a worker
    if profile_to:
        import cProfile

        with cProfile.Profile() as prof:
            rc = uvloop.run(run())
        prof.dump_stats(f"{profile_to}.{os.getpid()}")
        return rc
    try:
        return uvloop.run(run())
    except OSError as exc:
        print(
            f"lab.comet worker {config.index}: cannot listen on {config.host}:{config.port}: "
            f"{exc}; pick a free --port or another --host",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
