"""A worker's own socket layer for its hot path: accepting connections, and serving upgraded
WebSockets over raw non-blocking file descriptors in one epoll set, with no event-loop
transport per connection.

Why: the accept + upgrade is the server's busiest path (2,500 new connections a second and
more). Measured here, one worker spent ~120 µs of CPU per new connection through uvloop's
server, transport and the full ``HttpConn`` path; a bare uvloop server doing only the upgrade
~65 µs, and raw sockets in one epoll set ~50 µs. An idle WebSocket also costs less memory as
a file descriptor and a five-slot ``FdTransport`` than as a uvloop transport.

How: ``Acceptor`` accepts in batches and reads each new connection's first bytes at once
(they are usually there). If they are exactly one complete, valid WebSocket upgrade request
(``fast_upgrade``), the worker answers 101 itself and the connection becomes a ``WsConn`` on
an ``FdTransport``. Anything else (long-poll, SSE, publish, stats, a partial request, any
error) is handed to ``HttpConn`` on a uvloop transport together with the bytes read, and is
served exactly as before. A connection that has sent nothing yet waits in the epoll set as a
``Waiting`` entry (counted online, and closed by the request-timeout sweep like an idle HTTP
connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
from typing import TYPE_CHECKING, Any

from lab.comet.connection import HttpConn, fast_upgrade
from lab.comet.websocket import WsConn

if TYPE_CHECKING:
    from lab.comet.worker import Worker

log = logging.getLogger("lab.comet.worker")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
READ_BYTES = 65536
ACCEPT_BATCH = 256  # connections accepted per wake-up before other work gets a turn
MAX_EVENTS = 1024  # events taken per epoll_wait; the rest come at the loop's next turn
ACCEPT_PAUSE_S = 0.1  # after accept() fails for want of files or memory
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class FdTransport:
    """The asyncio transport calls a ``WsConn`` makes (``write``, ``close``, ``abort``,
    ``is_closing``) over a non-blocking socket fd in the worker's epoll set. Writes go straight
    to the socket; only what the kernel does not take waits (for EPOLLOUT), and past the
    worker's ``max_buffer_bytes`` the protocol's ``pause_writing`` is called (a ``WsConn``
    then cuts the client). ``connection_lost`` comes from the loop once the fd is closed."""

    __slots__ = ("buf", "fd", "io", "proto", "state")

    OPEN, CLOSING, CLOSED = 0, 1, 2  # CLOSING: flushing what is buffered, then close

    def __init__(self, io: Acceptor, fd: int, proto: Any = None) -> None:
        self.io = io
        self.fd = fd
        self.proto = proto
        self.buf: bytearray | None = None
        self.state = FdTransport.OPEN

    def write(self, data: bytes) -> None:
        if self.state:  # closing or closed
            return
        buf = self.buf
        if buf is not None:
            buf += data
        else:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._lost(exc)
                return
            if n == len(data):
                return
            buf = self.buf = bytearray(memoryview(data)[n:])
            self.io.watch(self.fd, EPOLLIN | EPOLLOUT)
        if len(buf) > self.io.worker.max_buffer_bytes:
            self.proto.pause_writing()

    def close(self) -> None:
        """Stop reading; flush what is buffered, then close (as asyncio's ``close``)."""
        if self.state:
            return
        if self.buf:
            self.state = FdTransport.CLOSING
            self.io.watch(self.fd, EPOLLOUT)
        else:
            self._lost(None)

    def abort(self) -> None:
        if self.state != FdTransport.CLOSED:
            self._lost(None)

    def is_closing(self) -> bool:
        return self.state != FdTransport.OPEN

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def ready(self, ev: int) -> None:
        """Events ``ev`` from the epoll set."""
        if ev & EPOLLOUT:
            self._flush()
        if ev & ~EPOLLOUT and self.state == FdTransport.OPEN:  # EPOLLIN, ERR or HUP
            try:
                data = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:  # reset by the peer
                self._lost(exc)
                return
            if data:
                self.proto.data_received(data)
            else:  # end of stream: closed, as asyncio does when eof_received() returns None
                self._lost(None)

    def _flush(self) -> None:
        buf = self.buf
        if buf:
            try:
                n = os.write(self.fd, buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(exc)
                return
            del buf[:n]
            if buf:
                return
        self.buf = None
        if self.state == FdTransport.CLOSING:
            self._lost(None)
        elif self.state == FdTransport.OPEN:
            self.io.watch(self.fd, EPOLLIN)

    def _lost(self, exc: Exception | None) -> None:
        self.state = FdTransport.CLOSED
        self.buf = None
        self.io.forget(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)  # also leaves the epoll set
        self.io.loop.call_soon(self.proto.connection_lost, exc)


class Waiting:
    """A connection accepted before its first bytes came: it waits in the epoll set, counted
    online, and is closed by the request-timeout sweep (as an idle HTTP connection is) or
    when the server stops."""

    __slots__ = ("fd", "idle_tick", "io")

    transport = None  # for the worker's drain: nothing to abort but the fd (shutdown)

    def __init__(self, io: Acceptor, fd: int) -> None:
        self.io = io
        self.fd = fd
        self.idle_tick = io.worker.ticks

    def ready(self, ev: int) -> None:
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._leave()
        if data:
            self.io.first_bytes(self.fd, data)
        else:
            self.io.close_fd(self.fd)

    def timed_out(self) -> None:
        """Nothing sent within --request-timeout: closed without a word."""
        self.shutdown()

    def shutdown(self) -> None:
        if self.io.fds[self.fd] is self:
            self._leave()
            self.io.close_fd(self.fd)

    def _leave(self) -> None:
        worker = self.io.worker
        worker.conns.discard(self)
        worker.http_conns.discard(self)
        self.io.forget(self.fd)
        self.io.ep.unregister(self.fd)


class Acceptor:
    """The worker's listening socket and its epoll set of WebSockets (see the module doc)."""

    def __init__(self, worker: Worker, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.sock = sock
        self.family = sock.family
        self.loop = loop
        self.ep = select.epoll()
        self.fds: list[Any] = []  # fd -> FdTransport or Waiting
        self.accepting = False
        self._resume: asyncio.TimerHandle | None = None
        loop.add_reader(self.ep.fileno(), self.poll)
        self.resume()

    # -- accepting ----------------------------------------------------------------------------
    def resume(self) -> None:
        self._resume = None
        if not self.accepting and self.sock.fileno() >= 0:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self.accept)

    def close(self) -> None:
        """Stop accepting (the server is stopping); connections already open go on."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def accept(self) -> None:
        worker = self.worker
        accept = self.sock._accept  # type: ignore[attr-defined]  # (fd, address): no socket object
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error(
                        "worker %d: accept() failed: %s; pausing %g s (raise the open-file "
                        "limit, or lower --max-connections)",
                        worker.index,
                        exc,
                        ACCEPT_PAUSE_S,
                    )
                    self.accepting = False
                    self.loop.remove_reader(self.sock.fileno())
                    self._resume = self.loop.call_later(ACCEPT_PAUSE_S, self.resume)
                return  # ECONNABORTED and the like: the next wake-up goes on
            worker.connects += 1
            if len(worker.conns) >= worker.max_conns or worker.stopping:
                self.close_fd(fd)
                continue
            os.set_blocking(fd, False)
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:  # nothing sent yet: wait for it
                waiting = Waiting(self, fd)
                self._keep(fd, waiting)
                self.ep.register(fd, EPOLLIN)
                worker.conns.add(waiting)
                worker.http_conns.add(waiting)
                continue
            except OSError:
                data = b""
            if data:
                self.first_bytes(fd, data)
            else:
                self.close_fd(fd)

    def first_bytes(self, fd: int, data: bytes) -> None:
        """A new connection's first bytes: a WebSocket upgrade done here, or ``HttpConn``."""
        worker = self.worker
        upgrade = fast_upgrade(data, worker.max_head_bytes)
        if upgrade is None:
            self.hand_over(fd, data)
            return
        target, answer = upgrade
        tr = FdTransport(self, fd)
        ws = tr.proto = WsConn(worker, tr, worker.channel_tuple(target.channels))  # type: ignore[arg-type]
        self._keep(fd, tr)
        self.ep.register(fd, EPOLLIN)
        worker.conns.add(ws)
        for channel in ws.channels:
            worker.hub.subscribe(ws, channel)
        tr.write(answer)

    def hand_over(self, fd: int, data: bytes) -> None:
        """Serve the connection with ``HttpConn`` on a uvloop transport; ``data`` (already
        read) is parsed first."""
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        conn = HttpConn(self.worker, data)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(_log_failure)

    def close_fd(self, fd: int) -> None:
        """A connection that ends before it was served (counted as a close)."""
        self.worker.closes += 1
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- the epoll set ------------------------------------------------------------------------
    def poll(self) -> None:
        fds = self.fds
        for fd, ev in self.ep.poll(0, MAX_EVENTS):
            entry = fds[fd] if fd < len(fds) else None
            if entry is not None:
                entry.ready(ev)

    def watch(self, fd: int, events: int) -> None:
        self.ep.modify(fd, events)

    def forget(self, fd: int) -> None:
        if fd < len(self.fds):
            self.fds[fd] = None

    def _keep(self, fd: int, entry: Any) -> None:
        fds = self.fds
        if fd >= len(fds):
            fds.extend([None] * (fd + 4096 - len(fds)))
        fds[fd] = entry


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("handing a connection to HttpConn failed: %s", task.exception())
