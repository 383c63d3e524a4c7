"""lab.rawio on loopback sockets: the Poller (one epoll set for every
connection) and SockTransport (the transport calls the session protocols make)."""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
import struct
import time
from typing import Any

from lab.agent.proc import SOCK_STREAM_NONBLOCK
from lab.rawio import EPOLLIN, EPOLLOUT, Poller, SockTransport


class Recorder:
    """A protocol that records what the transport tells it."""

    def __init__(self) -> None:
        self.made = 0
        self.data = bytearray()
        self.lost: list[BaseException | None] = []
        self.up = asyncio.Event()
        self.done = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.made += 1
        self.up.set()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.done.set()


def connect(port: int) -> int:
    """A non-blocking connect to 127.0.0.1:port, as the load process makes it: the raw fd."""
    sock = _socket.socket(_socket.AF_INET, SOCK_STREAM_NONBLOCK)
    rc = sock.connect_ex(("127.0.0.1", port))
    assert rc in (0, errno.EINPROGRESS), errno.errorcode.get(rc)
    return int(sock.detach())


def listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv


def started_poller(sh: Any = None) -> Poller:
    poller = Poller(sh)
    poller.start(asyncio.get_running_loop())
    return poller


def open_transport(
    poller: Poller, srv: socket.socket, mask: int = EPOLLIN
) -> tuple[SockTransport, Recorder, socket.socket]:
    """An open transport to ``srv`` in ``poller`` (as the load process makes one), its
    recording protocol, and the server's end of the connection."""
    proto = Recorder()
    tr = SockTransport(poller, connect(srv.getsockname()[1]), proto)
    tr.state = SockTransport.OPEN
    poller.add(tr, mask)
    peer, _ = srv.accept()
    return tr, proto, peer


def test_writes_flush_through_epollout_then_close_once_everything_is_sent() -> None:
    async def main() -> None:
        poller = started_poller()
        with listener() as srv:
            proto = Recorder()
            tr = SockTransport(poller, connect(srv.getsockname()[1]), proto)
            tr.state = SockTransport.OPEN
            peer, _ = srv.accept()
            payload = bytes(range(256)) * 32768  # 8 MiB: more than the socket buffers take
            tr.write(payload[:100])
            tr.write(payload[100:])
            assert tr.buf  # the kernel took part of it; the rest waits for EPOLLOUT
            poller.add(tr, EPOLLIN | EPOLLOUT)
            tr.close()  # closes once flushed
            assert tr.is_closing()
            tr.write(b"ignored after close")
            got = bytearray()
            peer.setblocking(False)
            loop = asyncio.get_running_loop()
            while True:
                chunk = await loop.sock_recv(peer, 1 << 20)
                if not chunk:
                    break
                got += chunk
            peer.close()
            await asyncio.wait_for(proto.done.wait(), 10)
        assert bytes(got) == payload
        assert proto.lost == [None] and proto.made == 0
        assert tr.state == SockTransport.CLOSED and poller.fds[tr.fd] is None

    asyncio.run(main())


def test_reads_reach_the_protocol_and_the_end_of_stream_is_a_clean_loss() -> None:
    async def main() -> None:
        poller = started_poller()
        with listener() as srv:
            tr, proto, peer = open_transport(poller, srv)
            peer.sendall(b"hello ")
            peer.sendall(b"world")
            peer.close()
            await asyncio.wait_for(proto.done.wait(), 10)
        assert bytes(proto.data) == b"hello world"
        assert proto.lost == [None]
        tr.abort()  # after the loss: a no-op
        assert proto.lost == [None]

    asyncio.run(main())


def test_a_reset_is_reported_with_its_error() -> None:
    async def main() -> None:
        poller = started_poller()
        with listener() as srv:
            _, proto, peer = open_transport(poller, srv)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # linger 0: RST
            await asyncio.wait_for(proto.done.wait(), 10)
        assert len(proto.lost) == 1 and isinstance(proto.lost[0], ConnectionResetError)

    asyncio.run(main())


def test_connecting_waits_for_the_handshake_and_reports_a_refusal() -> None:
    async def main() -> None:
        poller = started_poller()
        with listener() as srv:
            up = Recorder()
            tr = SockTransport(poller, connect(srv.getsockname()[1]), up)
            tr.write(b"queued before the handshake")
            poller.add(tr, EPOLLOUT)  # CONNECTING: connection_made once writable
            peer, _ = srv.accept()
            await asyncio.wait_for(up.up.wait(), 10)
            assert up.made == 1 and tr.state == SockTransport.OPEN
            peer.settimeout(5)
            assert peer.recv(100) == b"queued before the handshake"
            tr.abort()
            peer.close()
            await asyncio.wait_for(up.done.wait(), 10)
            assert up.lost == [None]
            port = srv.getsockname()[1]
        # nothing listens on that port any more
        refused = Recorder()
        tr = SockTransport(poller, connect(port), refused)
        poller.add(tr, EPOLLOUT)
        await asyncio.wait_for(refused.done.wait(), 10)
        assert refused.made == 0
        assert len(refused.lost) == 1 and isinstance(refused.lost[0], ConnectionRefusedError)

    asyncio.run(main())


def test_reads_with_kernel_timestamps_carry_the_receive_time_while_handled() -> None:
    from lab.rawio import SO_TIMESTAMPNS, kernel_timestamps_on

    class Shared:
        rx_time = 0.0

        def read_done(self) -> None:
            self.rx_time = 0.0

    class Stamped(Recorder):
        def __init__(self, sh: Shared) -> None:
            super().__init__()
            self.sh = sh
            self.seen: list[float] = []

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.seen.append(self.sh.rx_time)

    async def main() -> None:
        stamps = kernel_timestamps_on()  # as a load process does before its first connection
        sh = Shared()
        poller = started_poller(sh)
        with listener() as srv:
            proto = Stamped(sh)
            sock = _socket.socket(_socket.AF_INET, SOCK_STREAM_NONBLOCK)
            sock.setsockopt(_socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.connect_ex(srv.getsockname())
            tr = SockTransport(poller, sock.fileno(), proto)
            tr.sock = sock
            tr.state = SockTransport.OPEN
            poller.add(tr, EPOLLIN)
            peer, _ = srv.accept()
            sent = time.time()
            peer.sendall(b"stamped")
            peer.close()
            # the loop is kept busy: the bytes wait in the socket, then are read late
            time.sleep(0.2)
            read_after = time.time()
            await asyncio.wait_for(proto.done.wait(), 10)
        assert bytes(proto.data) == b"stamped"
        # the receive time is the arrival, not the (later) read
        figures = (sent, proto.seen, read_after)
        assert len(proto.seen) == 1 and sent - 0.01 <= proto.seen[0] <= sent + 0.1, figures
        assert proto.seen[0] < read_after - 0.1, figures
        assert sh.rx_time == 0.0  # only while the protocol handles the read
        assert sock.fileno() == -1  # closed through the socket object, not twice
        stamps.close()

    asyncio.run(main())


def test_a_ticking_poller_reads_without_being_woken_by_arrivals() -> None:
    """start(loop, tick_s): the epoll set is not registered with the loop; ticks read it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        poller = Poller()
        poller.start(loop, tick_s=0.01)
        with listener() as srv:
            tr, proto, peer = open_transport(poller, srv)
            assert not loop.remove_reader(poller.ep.fileno())  # no reader on the loop
            peer.sendall(b"ticked")
            peer.close()
            await asyncio.wait_for(proto.done.wait(), 10)
        assert bytes(proto.data) == b"ticked" and proto.lost == [None]
        tr.abort()

    asyncio.run(main())
