"""Connection I/O on raw file descriptors, for the load agent's processes and the comet
server's workers: one epoll set (``Poller``) for all of a process's sockets and a
``SockTransport`` per connection, which gives the protocols (``lab.agent.session``'s clients,
``lab.comet``'s ``WsConn``) the few asyncio transport calls they make, with no task,
coroutine, event-loop transport or (unless kernel receive times are wanted) socket object per
connection.

What it is for: at thousands of new connections a second in one Python process, asyncio's
per-connection machinery (a task, ``create_connection``'s coroutine and futures, a uvloop
transport) cost more CPU and memory than the connection's own syscalls; this keeps a
connection to a file descriptor, seven slots and one ``epoll_ctl``.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
import time
from typing import Any

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
OPEN = 1  # SockTransport.OPEN
EPOLL_FAULT = select.EPOLLERR | select.EPOLLHUP
READ_BYTES = 65536
SO_TIMESTAMPNS = 35  # Linux: the kernel's receive time of each read, as ancillary data
ANC_BYTES = _socket.CMSG_SPACE(16)
MAX_EVENTS = 1024  # events taken per epoll_wait; the rest wait for the next turn


def kernel_timestamps_on(timeout_s: float = 1.0) -> Any:
    """Turn the kernel's receive timestamps on before any connection needs them, and keep them
    on: Linux starts timestamping packets only some time after the first socket asks for it
    (the switch is deferred to a work queue), so the first connections' packets would carry no
    receive time. A loopback TCP pair with SO_TIMESTAMPNS is probed until a read brings one
    (bounded by ``timeout_s``); its socket is returned, to be kept open while they are wanted."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        keeper = socket.socket()
        keeper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        keeper.connect(listener.getsockname())
        peer, _ = listener.accept()
    with peer:
        keeper.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            peer.send(b".")
            _, anc, _, _ = keeper.recvmsg(16, ANC_BYTES)
            if any(kind == SO_TIMESTAMPNS for _, kind, _ in anc):
                break
            time.sleep(0.001)
    return keeper


class Poller:
    """One epoll set for every connection of the process, registered once with the event loop
    (``start``): a connection costs one ``epoll_ctl`` and no event-loop handle, and one loop
    wake-up serves every socket that became ready meanwhile. ``fds[fd]`` is the
    ``SockTransport`` on ``fd``. ``sh`` (optional) is where a read's kernel receive time goes
    (``Shared.rx_time``) while the protocol handles it, for sockets read with SO_TIMESTAMPNS;
    ``sh.read_done()`` is called after.

    ``start(loop, tick_s)`` with ``tick_s > 0``: the set is polled every ``tick_s`` instead of
    waking the process at each arrival. Meant for sockets read with kernel receive times, whose
    measurements do not depend on when they are read: on a host shared with the server, a
    broadcast to thousands of sockets then wakes no agent process per message (each wake-up
    is paid inside the server's send()), and the agent reads in batches.

    ``max_buffer`` (0: none): the bytes a transport may hold for a slow peer before its
    protocol's ``pause_writing()`` is called (a server cuts such a client). ``fds`` may also
    hold other entries with ``state``, ``ready(ev)`` and ``_read()`` (a server's connection
    waiting for its first bytes)."""

    __slots__ = ("also", "also_fd", "changes", "ep", "fds", "loop", "max_buffer", "sh", "tick_s")

    loop: asyncio.AbstractEventLoop

    def __init__(self, sh: Any = None, max_buffer: int = 0) -> None:
        self.ep = select.epoll()
        self.fds: list[Any] = []
        self.sh = sh
        self.max_buffer = max_buffer
        self.tick_s = 0.0  # set by start(); the load process may change it between ticks
        # another epoll set served alongside (the agent's C fast path): ``also()`` serves it
        # and returns how many events it took; ``also_fd`` is its epoll fd. Set before start()
        self.also: Any = None
        self.also_fd = -1
        # counts every transport that closed, started queueing bytes or emptied its queue:
        # what a list of "open sockets with nothing queued" kept elsewhere depends on
        # (the server's C fan-out, lab.comet.fanout)
        self.changes = 0

    def start(self, loop: asyncio.AbstractEventLoop, tick_s: float = 0.0) -> None:
        self.loop = loop
        self.tick_s = tick_s
        if tick_s > 0:
            loop.call_later(tick_s, self._tick)
        else:
            loop.add_reader(self.ep.fileno(), self.poll)
            if self.also is not None:
                loop.add_reader(self.also_fd, self.also)

    def _tick(self) -> None:
        also = self.also
        while True:
            busy = self.poll() == MAX_EVENTS
            if also is not None and also() == MAX_EVENTS:
                busy = True
            if not busy:
                break
        self.loop.call_later(self.tick_s, self._tick)

    def add(self, tr: Any, mask: int) -> None:
        """Watch ``tr.fd`` for ``mask``; ``fds[fd]`` is ``tr`` until it is closed."""
        fd = tr.fd
        fds = self.fds
        if fd >= len(fds):
            fds.extend([None] * (fd + 4096 - len(fds)))
        fds[fd] = tr
        tr.mask = mask
        self.ep.register(fd, mask)

    def poll(self) -> int:
        """Serve every ready socket (the common case, bytes to read on an open connection,
        straight to its read), at most ``MAX_EVENTS``; return how many were ready."""
        fds = self.fds
        events = self.ep.poll(0, MAX_EVENTS)
        for fd, ev in events:
            tr = fds[fd]
            if tr is None:
                continue
            if ev == EPOLLIN and tr.state == OPEN:
                tr._read()
            else:
                tr.ready(ev)
        return len(events)


class SockTransport:
    """The few asyncio transport calls the session protocols make (``write``, ``close``,
    ``abort``; ``connection_made`` / ``data_received`` / ``connection_lost`` on the protocol),
    over a raw non-blocking socket fd in the process's ``Poller``. Writes go straight to the
    socket; only what the kernel did not take waits for EPOLLOUT. ``connection_lost`` comes
    from the loop, as in asyncio, once the fd is closed. ``sock``: the socket object, kept
    only when reads need ``recvmsg`` (SO_TIMESTAMPNS on); else None and ``fd`` is all there
    is (the object was detached: an idle connection costs no socket object)."""

    __slots__ = ("buf", "fd", "mask", "poller", "proto", "sock", "state")

    CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3  # CLOSING: flush, then close

    def __init__(self, poller: Poller, fd: int, proto: Any) -> None:
        self.poller = poller
        self.fd = fd
        self.proto = proto
        self.buf: bytes | bytearray = b""  # what waits for EPOLLOUT (a bytearray once any)
        self.mask = 0  # the epoll events asked for; 0 until registered
        self.state = SockTransport.CONNECTING
        self.sock: Any = None

    def write(self, data: bytes) -> None:
        if self.state >= SockTransport.CLOSING:
            return
        if self.buf or self.state == SockTransport.CONNECTING:
            self._keep(data)
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(exc)
            return
        if n < len(data):
            self.sent_part(n, data)

    def sent_part(self, n: int, data: bytes) -> None:
        """The kernel took only ``n`` bytes of ``data`` (written here or by a C loop, with
        nothing queued before): queue the rest for EPOLLOUT."""
        if self.mask:
            self._want(EPOLLIN | EPOLLOUT)
        self._keep(memoryview(data)[n:])

    def fail(self, exc: OSError) -> None:
        """A write failed with ``exc`` (here or in a C loop): the connection is lost."""
        if self.state != SockTransport.CLOSED:  # (its fd number may be another's by now)
            self._close_fd(exc)

    def _keep(self, data: bytes | memoryview) -> None:
        """Buffer ``data`` for EPOLLOUT (appending in place); past the poller's
        ``max_buffer``, tell the protocol (``pause_writing``)."""
        buf = self.buf
        if buf:
            buf += data  # a bytearray: in place
        else:
            buf = self.buf = bytearray(data)
            self.poller.changes += 1
        limit = self.poller.max_buffer
        if limit and len(buf) > limit:
            self.proto.pause_writing()

    def close(self) -> None:
        if self.state >= SockTransport.CLOSING:
            return
        if self.buf:
            self.state = SockTransport.CLOSING
        else:
            self._close_fd(None)

    def abort(self) -> None:
        if self.state != SockTransport.CLOSED:
            self._close_fd(None)

    def is_closing(self) -> bool:
        return self.state >= SockTransport.CLOSING

    def ready(self, ev: int) -> None:
        """Events ``ev`` from the poller."""
        if self.state == SockTransport.CONNECTING:  # waiting for the TCP handshake
            if ev & EPOLL_FAULT:
                self._read()  # a failed connect: the read reports why
                return
            self.state = SockTransport.OPEN
            self._want(EPOLLIN | (EPOLLOUT if self.buf else 0))
            self.proto.connection_made(self)
            return
        if ev & EPOLLOUT:
            self._flush()
        if ev & (EPOLLIN | EPOLL_FAULT) and self.state != SockTransport.CLOSED:
            self._read()

    def _read(self) -> None:
        sock = self.sock
        try:
            if sock is None:
                data = os.read(self.fd, READ_BYTES)
            else:
                data, anc, _, _ = sock.recvmsg(READ_BYTES, ANC_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_fd(exc)
            return
        if data:
            sh = self.poller.sh
            if sock is None or sh is None:
                self.proto.data_received(data)
                return
            for level, kind, raw in anc:
                if level == _socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack_from("qq", raw)
                    sh.rx_time = sec + nsec * 1e-9
            try:
                self.proto.data_received(data)
            finally:
                sh.read_done()
        elif self.state == SockTransport.CONNECTING:
            self._close_fd(ConnectionResetError(errno.ECONNRESET, "connection closed"))
        else:  # end of stream: as asyncio does when eof_received() returns None
            self._close_fd(None)

    def _flush(self) -> None:
        buf = self.buf
        if buf:
            try:
                n = os.write(self.fd, buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close_fd(exc)
                return
            del buf[:n]  # type: ignore[union-attr]  # a bytearray whenever not empty
            if not buf:
                self.poller.changes += 1
        if not buf:
            self.buf = b""
            if self.state == SockTransport.CLOSING:
                self._close_fd(None)
            else:
                self._want(EPOLLIN)

    def _want(self, mask: int) -> None:
        if mask != self.mask:
            self.mask = mask
            self.poller.ep.modify(self.fd, mask)

    def _close_fd(self, exc: BaseException | None) -> None:
        self.state = SockTransport.CLOSED
        self.poller.changes += 1
        self.buf = b""
        if self.mask:  # registered: closing the fd also leaves the epoll set
            self.poller.fds[self.fd] = None
            self.mask = 0
        with contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.close()
            else:
                os.close(self.fd)
        self.poller.loop.call_soon(self.proto.connection_lost, exc)
