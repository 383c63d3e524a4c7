"""The comet server's parent process: starts the workers (each listens on the shared port
with SO_REUSEPORT), restarts any that dies, sequences every publish (per-channel ids) and sends
it to all workers in order, and prints the once-a-second figures.

Why the parent sequences: a publish that arrives at any worker must reach the subscribers on
every worker in the same order with nothing lost. One sequencer with one ordered stream to
each worker gives that without an external service; the publishing worker answers the client
``{"id": N}`` when its own copy comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import lab
from lab import cbuild
from lab.comet import fanout
from lab.comet.config import ConfigError, ServerConfig, build_parser, resolve
from lab.comet.console import ServerLine, console_text, server_line, worker_figures
from lab.comet.ipc import Decoder, IpcError, encode
from lab.comet.protocol import Sequencer
from lab.limits import HostLimits, read_host_limits

log = logging.getLogger("lab.comet")

# Seconds a stopping worker gets before SIGTERM, then before SIGKILL.
STOP_GRACE_S = 6.0
KILL_GRACE_S = 3.0
# Restart backoff for a worker that keeps dying right after start.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


class Slot:
    """A worker position: the current process, its control link, and what it reported."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.link: asyncio.Transport | None = None
        self.ready = False
        self.ever_ready = False
        self.restarts = 0
        self.reported: dict[str, Any] | None = None
        self.reported_at = 0.0  # unix time the worker sent those figures (it measured them then)


class ParentLink(asyncio.Protocol):
    """The supervisor's end of one worker's control link."""

    def __init__(self, sup: Supervisor, slot: Slot) -> None:
        self.sup = sup
        self.slot = slot
        self.decoder = Decoder()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except IpcError as exc:
            log.error("worker %d sent garbage on its control link: %s", self.slot.index, exc)
            return
        for message in messages:
            self.sup.on_worker_message(self.slot, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot.link is self.transport:  # not a newer worker's link in the same slot
            self.slot.ready = False
            self.slot.link = None


class ConsoleWriter:
    """Writes stdout/stderr lines from a thread: a stalled reader (an SSH stream) must never
    block the event loop that sequences publishes. Lines past ``limit`` queued are dropped
    (the --out file has them all)."""

    def __init__(self, limit: int = 600) -> None:
        self._queue: queue.Queue[tuple[IO[str], str] | None] = queue.Queue(limit)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def put(self, stream: IO[str], text: str) -> None:
        try:
            self._queue.put_nowait((stream, text))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        broken: set[int] = set()
        while (item := self._queue.get()) is not None:
            stream, text = item
            if id(stream) in broken:
                continue
            try:
                stream.write(text + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                broken.add(id(stream))

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)


class Supervisor:
    """The parent process: worker slots, the sequencer, the console; ``run()`` until stopped."""

    def __init__(self, config: ServerConfig, limits: HostLimits | None = None) -> None:
        self.config = config
        self.limits = limits or read_host_limits()
        self.sequencer = Sequencer(config.history)
        self.slots = [Slot(i) for i in range(config.workers)]
        self.port = config.port
        self.stopping = False
        self.failed: str | None = None
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._out: IO[str] | None = None
        self._console = ConsoleWriter()

    # ------------------------------------------------------------------ control messages

    def on_worker_message(self, slot: Slot, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "pub":
            msg = self.sequencer.sequence(message["ch"], message["data"])
            data = encode(
                {
                    "op": "msg",
                    "ch": msg.channel,
                    "id": msg.id,
                    "data": msg.data,
                    "w": slot.pid,
                    "req": message["req"],
                }
            )
            for s in self.slots:
                if s.link is not None:
                    s.link.write(data)
        elif op == "stats":
            slot.reported = message
            slot.reported_at = time.time()
        elif op == "ready":
            slot.ready = slot.ever_ready = True
            if all(s.ready for s in self.slots):
                self._all_ready.set()
                self._send_snapshot(self._line())

    def _send_snapshot(self, line: ServerLine) -> None:
        stats = {k: v for k, v in line.items() if k != "kind"}
        data = encode(
            {"op": "snapshot", "stats": stats, "healthy": all(s.ready for s in self.slots)}
        )
        for s in self.slots:
            if s.link is not None:
                s.link.write(data)

    # ------------------------------------------------------------------ workers

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        root = str(Path(lab.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lab.comet.worker",
                "--control-fd",
                str(child_sock.fileno()),
                pass_fds=(child_sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),
                env=env,
            )
        finally:
            child_sock.close()
        slot.proc = proc
        slot.pid = proc.pid
        slot.reported = None
        transport, _ = await loop.create_unix_connection(
            lambda: ParentLink(self, slot), sock=parent_sock
        )
        # Config, then the history, then (from the moment the link is registered) every new
        # message: nothing sequenced meanwhile is missed, since no await separates these.
        config = self.config.worker_config(slot.index, self.port, self.limits)
        parts = [encode(config.to_dict())]
        for m in self.sequencer.replay():
            parts.append(encode({"op": "msg", "ch": m.channel, "id": m.id, "data": m.data}))
        transport.write(b"".join(parts))
        slot.link = transport
        return proc

    async def _keep_running(self, slot: Slot) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stopping:
            started = time.monotonic()
            try:
                proc = await self._spawn(slot)
            except OSError as exc:
                if not slot.ever_ready:
                    self.failed = f"cannot start worker {slot.index}: {exc}"
                    self.begin_stop()
                    return
                log.error("cannot restart worker %d: %s; retrying", slot.index, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), BACKOFF_MAX_S)
                continue
            rc = await proc.wait()
            slot.ready = False
            if slot.link is not None:
                slot.link.close()
                slot.link = None
            if self.stopping:
                return
            how = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit code {rc}"
            if not slot.ever_ready:
                self.failed = f"worker {slot.index} (pid {proc.pid}) failed at start: {how}"
                self.begin_stop()
                return
            slot.restarts += 1
            log.warning(
                "worker %d (pid %d) died: %s; restarting (restart %d)",
                slot.index,
                proc.pid,
                how,
                slot.restarts,
            )
            backoff = backoff * 2 if time.monotonic() - started < 2.0 else BACKOFF_MIN_S
            backoff = min(backoff, BACKOFF_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)

    async def _stop_workers(self, tasks: list[asyncio.Task[None]]) -> None:
        stop = encode({"op": "stop"})
        for s in self.slots:
            if s.link is not None:
                s.link.write(stop)
        for grace, sig in ((STOP_GRACE_S, signal.SIGTERM), (KILL_GRACE_S, signal.SIGKILL)):
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if not pending:
                return
            for s in self.slots:
                if s.proc is not None and s.proc.returncode is None:
                    log.warning("worker %d (pid %d) still running: %s", s.index, s.pid, sig.name)
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.send_signal(sig)
        await asyncio.wait(tasks, timeout=KILL_GRACE_S)

    # ------------------------------------------------------------------ console

    def _line(self) -> ServerLine:
        figures = [worker_figures(s.index, s.pid, s.reported, s.restarts) for s in self.slots]
        # the line's time is when its figures were measured (the oldest worker report), not
        # when it is printed: up to a second later, which would shift it against the agents'
        measured = [s.reported_at for s in self.slots if s.reported is not None]
        return server_line(
            min(measured) if measured else time.time(),
            time.monotonic() - self.started,
            figures,
            self.sequencer.published,
            len(self.sequencer.channels),
        )

    def _emit(self, line: ServerLine) -> None:
        text = json.dumps(line, separators=(",", ":"))
        if self._out is not None:
            self._out.write(text + "\n")
            self._out.flush()
        self._console.put(sys.stdout, text)
        if not self.config.quiet:
            self._console.put(sys.stderr, console_text(line))

    # ------------------------------------------------------------------ lifecycle

    def begin_stop(self) -> None:
        self.stopping = True
        self._stop.set()

    def _reserve_port(self) -> socket.socket:
        """Bind (without listening) to hold the port and learn it when --port is 0; the
        workers' listeners join it with SO_REUSEPORT."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        if self.config.port and _something_listens(self.config.host, self.port):
            sock.close()
            raise OSError(
                errno.EADDRINUSE,
                "another server already listens there (SO_REUSEPORT would share the port "
                "silently); stop it (`pgrep -af 'lab[. ](comet|serve)'` lists it: stop its "
                "supervisor, not a worker, which it would restart)",
            )
        return sock

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_stop)
        try:
            reserved = self._reserve_port()
        except OSError as exc:
            print(
                f"lab.comet: cannot bind {self.config.host}:{self.config.port}: {exc.strerror}; "
                "pick a free --port (or 0) or another --host",
                file=sys.stderr,
            )
            return 2
        if self.config.out:
            self._out = open(self.config.out, "w", encoding="utf-8")  # noqa: SIM115
        # built here, once, rather than by each worker at once (off the loop: signals)
        path, why = await loop.run_in_executor(None, fanout.build)
        if path is None and not cbuild.switched_off(fanout.ENV_SWITCH):
            print(
                f"lab.comet: the C fan-out is off: {why}. Broadcasts take the Python loop, "
                "with ~1 us more CPU per WebSocket subscriber",
                file=sys.stderr,
                flush=True,
            )
        tasks = [asyncio.create_task(self._keep_running(s)) for s in self.slots]
        ready = asyncio.create_task(self._all_ready.wait())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([ready, stop], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._all_ready.is_set() and not self.stopping:
            pids = ", ".join(str(s.pid) for s in self.slots)
            print(
                f"lab.comet: serving http://{self.config.host}:{self.port} with "
                f"{len(self.slots)} worker(s) (pids {pids})",
                file=sys.stderr,
                flush=True,
            )
            if self.config.token_generated:
                print(
                    f"lab.comet: publish token: {self.config.publish_token}",
                    file=sys.stderr,
                    flush=True,
                )
        next_t = loop.time() + 1.0
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop), max(0.0, next_t - loop.time()))
            if self.stopping:
                break
            next_t += 1.0
            line = self._line()
            self._emit(line)
            self._send_snapshot(line)
        await self._stop_workers(tasks)
        reserved.close()
        self._emit(self._line())
        self._console.close()
        if self._out is not None:
            self._out.close()
        if self.failed:
            print(f"lab.comet: {self.failed}", file=sys.stderr, flush=True)
            return 2
        print("lab.comet: stopped", file=sys.stderr, flush=True)
        return 0


def _something_listens(host: str, port: int) -> bool:
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m lab.comet`` / ``lab serve``."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = resolve(args)
    except ConfigError as exc:
        print(f"{prog or 'lab.comet'}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import uvloop

    return int(uvloop.run(Supervisor(config).run()))
