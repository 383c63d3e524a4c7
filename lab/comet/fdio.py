"""A worker's own socket layer for its hot path: accepting connections, and serving upgraded
WebSockets over raw non-blocking file descriptors in one epoll set (``lab.rawio``, as the load
agent does), with no event-loop transport per connection.

Why: the accept + upgrade is the server's busiest path (2,500 new connections a second and
more). Measured here, one worker spent ~120 µs of CPU per new connection through uvloop's
server, transport and the full ``HttpConn`` path; a bare uvloop server doing only the upgrade
~65 µs, and raw sockets in one epoll set ~50 µs. An idle WebSocket also costs less memory as
a file descriptor and a seven-slot ``SockTransport`` than as a uvloop transport.

How: ``Acceptor`` accepts in batches and reads each new connection's first bytes at once
(they are usually there). If they are exactly one complete, valid WebSocket upgrade request
(``fast_upgrade``), the worker answers 101 itself and the connection becomes a ``WsConn`` on
a ``SockTransport``. Anything else (long-poll, SSE, publish, stats, a partial request, any
error) is handed to ``HttpConn`` on a uvloop transport together with the bytes read, and is
served exactly as before. A connection that has sent nothing yet waits in the epoll set as a
``Waiting`` entry (counted online, and closed by the request-timeout sweep like an idle HTTP
connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from lab.comet.connection import HttpConn, fast_upgrade
from lab.comet.websocket import WsConn
from lab.rawio import EPOLLIN, OPEN, READ_BYTES, Poller, SockTransport

if TYPE_CHECKING:
    from lab.comet.worker import Worker

log = logging.getLogger("lab.comet.worker")

ACCEPT_BATCH = 256  # connections accepted per wake-up before other work gets a turn
ACCEPT_PAUSE_S = 0.1  # after accept() fails for want of files or memory
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Waiting:
    """A connection accepted before its first bytes came: it waits in the epoll set, counted
    online, and is closed by the request-timeout sweep (as an idle HTTP connection is) or
    when the server stops."""

    __slots__ = ("acceptor", "fd", "idle_tick", "mask")

    transport = None  # for the worker's drain: nothing to abort but the fd (shutdown)
    state = OPEN  # for the Poller: read when readable

    def __init__(self, acceptor: Acceptor, fd: int) -> None:
        self.acceptor = acceptor
        self.fd = fd
        self.mask = 0
        self.idle_tick = acceptor.worker.ticks

    def ready(self, ev: int) -> None:
        self._read()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._leave()
        if data:
            self.acceptor.first_bytes(self.fd, data)
        else:
            self.acceptor.close_fd(self.fd)

    def timed_out(self) -> None:
        """Nothing sent within --request-timeout: closed without a word."""
        self.shutdown()

    def shutdown(self) -> None:
        if self.acceptor.poller.fds[self.fd] is self:
            self._leave()
            self.acceptor.close_fd(self.fd)

    def _leave(self) -> None:
        worker = self.acceptor.worker
        worker.conns.discard(self)
        worker.http_conns.discard(self)
        poller = self.acceptor.poller
        poller.fds[self.fd] = None
        poller.ep.unregister(self.fd)


class Acceptor:
    """The worker's listening socket, and the epoll set (``poller``) of its WebSockets and of
    the connections waiting for their first bytes (see the module doc)."""

    def __init__(self, worker: Worker, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.sock = sock
        self.family = sock.family
        self.loop = loop
        self.poller = Poller(max_buffer=worker.max_buffer_bytes)
        self.poller.start(loop)
        self.accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self.resume()

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
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)  # one syscall (set_blocking: two)
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:  # nothing sent yet: wait for it
                waiting = Waiting(self, fd)
                self.poller.add(waiting, EPOLLIN)
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
        try:
            upgrade = fast_upgrade(data, worker.max_head_bytes)
        except Exception:  # a bug: HttpConn answers (or closes) the request instead
            log.exception("worker %d: the fast path failed on a request", worker.index)
            upgrade = None
        if upgrade is None:
            self.hand_over(fd, data)
            return
        target, answer = upgrade
        tr = SockTransport(self.poller, fd, None)
        tr.state = OPEN
        ws = tr.proto = WsConn(worker, tr, worker.channel_tuple(target.channels))  # type: ignore[arg-type]
        self.poller.add(tr, EPOLLIN)
        worker.conns.add(ws)
        for channel in ws.channels:
            worker.hub.subscribe(ws, channel)
        tr.write(answer)

    def hand_over(self, fd: int, data: bytes) -> None:
        """Serve the connection with ``HttpConn`` on a uvloop transport; ``data`` (already
        read) is parsed first."""
        worker = self.worker
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        conn = HttpConn(worker, data)
        # counted at once, so that the next accept sees the worker's connection limit
        worker.conns.add(conn)
        worker.http_conns.add(conn)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(lambda t: self._handed(t, conn, sock))

    def _handed(self, task: asyncio.Task[Any], conn: HttpConn, sock: socket.socket) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.warning(
            "worker %d: handing a connection over failed: %s", self.worker.index, task.exception()
        )
        if conn.transport is None and conn in self.worker.conns:
            self.worker.conns.discard(conn)
            self.worker.http_conns.discard(conn)
            self.worker.closes += 1
            sock.close()

    def close_fd(self, fd: int) -> None:
        """A connection that ends before it was served (counted as a close)."""
        self.worker.closes += 1
        with contextlib.suppress(OSError):
            os.close(fd)
