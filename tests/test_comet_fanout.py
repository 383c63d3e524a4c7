"""The server's C broadcast loop (``lab.comet.fanout``) on loopback TCP sockets: what each
subscriber receives, the list it keeps and when it must rebuild it (a closed socket whose
number is reused, queued bytes, a new subscription), partial and failed sends, and the whole
server broadcasting with it and without it (no compiler, or switched off)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.comet import fanout
from lab.comet.launch import ServerProcess
from lab.comet.protocol import Hub, Message, Outgoing
from lab.comet.websocket import WsConn
from lab.rawio import EPOLLIN, EPOLLOUT, OPEN, Poller, SockTransport

CHANNEL = "all"


@pytest.fixture(scope="module")
def lib() -> Any:
    path, why = fanout.build()
    assert path is not None, f"the C fan-out must build here (gcc is installed by .ci/run): {why}"
    loaded, why = fanout.load()
    assert loaded is not None, why
    return loaded


class Side:
    """Subscribers on real loopback TCP connections: the server end of each is a WsConn on a
    SockTransport in one Poller (as a worker holds them), the client end a blocking socket."""

    def __init__(self, lib: Any, n: int, max_buffer: int = 0) -> None:
        self.loop = asyncio.new_event_loop()  # only for connection_lost's call_soon
        self.poller = Poller(max_buffer=max_buffer)
        self.poller.loop = self.loop
        self.hub: Hub[Any] = Hub(10)
        self.fan = fanout.FanOut(lib, self.hub, self.poller)
        # what a WsConn reads of its worker
        self.worker = SimpleNamespace(errors=0, closes=0, conns=set(), hub=self.hub)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=n + 8)
        self.clients: list[socket.socket] = []
        self.subs: list[WsConn] = []
        for _ in range(n):
            self.add()

    def add(self) -> WsConn:
        client = socket.create_connection(self.listener.getsockname())
        client.settimeout(5)
        conn, _ = self.listener.accept()
        conn.setblocking(False)
        tr = SockTransport(self.poller, conn.detach(), None)
        tr.state = OPEN
        ws = WsConn(self.worker, tr, (CHANNEL,))  # type: ignore[arg-type]
        tr.proto = ws
        self.poller.add(tr, EPOLLIN)
        self.hub.subscribe(ws, CHANNEL)
        self.clients.append(client)
        self.subs.append(ws)
        return ws

    def broadcast(self, frame: bytes, subscribers: list[Any] | None = None) -> list[Any]:
        """What the worker's fan_out does: C first, then the Python loop for the rest."""
        subs = list(self.hub.subscriptions[CHANNEL]) if subscribers is None else subscribers
        rest = self.fan.send(CHANNEL, subs, frame)
        for sub in rest:
            if sub.transport is not None:
                sub.transport.write(frame)
        return rest

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for ws in self.subs:
            if ws.transport is not None:
                ws.transport.abort()
        self.listener.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # the connection_lost calls
        self.loop.close()
        self.poller.ep.close()


@pytest.fixture
def side(lib: Any) -> Iterator[Side]:
    s = Side(lib, 40)
    yield s
    s.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)


def frame_of(data: str) -> bytes:
    return Outgoing(Message(CHANNEL, 1, data)).ws_frame


def test_every_subscriber_gets_the_frame_from_c_and_the_list_is_kept(side: Side) -> None:
    frame = frame_of("one")
    assert side.broadcast(frame) == []
    assert side.fan.sent == 40
    entry = side.fan.lists[CHANNEL]
    frame2 = frame_of("two")
    side.broadcast(frame2)
    assert side.fan.lists[CHANNEL] is entry  # nothing changed: the same list
    assert side.fan.sent == 80
    for client in side.clients:
        assert read_exactly(client, len(frame) + len(frame2)) == frame + frame2
        assert nothing_waiting(client)


def test_a_new_subscription_rebuilds_the_list(side: Side) -> None:
    side.broadcast(frame_of("one"))
    entry = side.fan.lists[CHANNEL]
    late = side.add()
    frame = frame_of("two")
    side.broadcast(frame)
    assert side.fan.lists[CHANNEL] is not entry
    assert late.transport is not None
    client = side.clients[-1]
    assert read_exactly(client, len(frame)) == frame  # the late one only has the second
    assert nothing_waiting(client)


def test_a_closed_socket_whose_number_is_reused_gets_nothing(side: Side) -> None:
    """The kernel gives a closed descriptor's number to the next socket; the subscriber
    leaves the hub only when connection_lost runs (later, from the loop). A kept list that
    still named the number would send the frame to a stranger."""
    side.broadcast(frame_of("one"))  # the list is kept
    victim = side.subs[7]
    subscribers = list(side.hub.subscriptions[CHANNEL])  # still has the victim
    assert victim.transport is not None
    fd = victim.transport.fd  # type: ignore[attr-defined]
    stranger_client = socket.create_connection(side.listener.getsockname())
    stranger, _ = side.listener.accept()
    victim.transport.abort()
    os.dup2(stranger.fileno(), fd)  # a new connection now has the old number
    stranger.close()
    try:
        frame = frame_of("two")
        side.broadcast(frame, subscribers)
        stranger_client.settimeout(0.2)
        with pytest.raises(TimeoutError):
            stranger_client.recv(1)
        both = frame_of("one") + frame
        for k, client in enumerate(side.clients):
            if k != 7:
                assert read_exactly(client, len(both)) == both
    finally:
        os.close(fd)
        stranger_client.close()


def test_a_subscriber_with_queued_bytes_gets_its_frames_after_them(side: Side) -> None:
    ws = side.subs[3]
    tr = ws.transport
    assert isinstance(tr, SockTransport)
    side.broadcast(frame_of("zero"))  # the list is kept, with this socket in it
    tr._keep(b"queued-before")  # what a send the kernel did not take whole leaves
    frame = frame_of("one")
    rest = side.broadcast(frame)
    assert ws in rest  # served by the Python loop, which queues behind
    assert bytes(tr.buf) == b"queued-before" + frame
    tr._flush()
    client = side.clients[3]
    zero = frame_of("zero")
    assert read_exactly(client, len(zero) + 13 + len(frame)) == zero + b"queued-before" + frame


def test_a_partial_send_queues_the_rest_for_epollout(lib: Any) -> None:
    side = Side(lib, 32)
    try:
        slow = side.subs[0]
        tr = slow.transport
        assert isinstance(tr, SockTransport)
        big = frame_of("x" * 8_000_000)  # more than a loopback socket's buffers take at once
        changes = side.poller.changes
        side.broadcast(big)
        assert tr.buf, "the kernel took the whole frame: the test needs a bigger one"
        assert tr.mask == EPOLLIN | EPOLLOUT
        assert side.poller.changes > changes
        client = side.clients[0]
        got = bytearray()
        while len(got) < len(big):  # read, and let EPOLLOUT flush the rest
            got += client.recv(1 << 20)
            for fd, ev in side.poller.ep.poll(0):
                side.poller.fds[fd].ready(ev)
        assert bytes(got) == big
        assert not tr.buf and tr.mask == EPOLLIN
        sent = side.fan.sent
        small = frame_of("after")
        side.broadcast(small)
        # its queue empty again, this one is back in the C loop's list; the 31 others still
        # hold the rest of the big frame (nobody read them) and queue behind it in Python
        assert side.fan.sent == sent + 1
        assert read_exactly(client, len(small)) == small
        others = [ws.transport for ws in side.subs[1:]]
        assert all(isinstance(t, SockTransport) and bytes(t.buf).endswith(small) for t in others)
    finally:
        side.close()


def test_a_failed_send_closes_the_transport(side: Side) -> None:
    side.broadcast(frame_of("one"))
    gone = side.clients[5]
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()  # a reset
    ws = side.subs[5]
    tr = ws.transport
    assert isinstance(tr, SockTransport)
    deadline = time.monotonic() + 5
    while tr.state == OPEN and time.monotonic() < deadline:
        side.broadcast(frame_of("again"))  # the first send after the reset fails
    assert tr.state == SockTransport.CLOSED
    side.loop.run_until_complete(asyncio.sleep(0))
    assert ws.transport is None and ws not in side.hub.subscriptions[CHANNEL]


def test_other_subscribers_are_left_to_the_python_loop(side: Side) -> None:
    class LongPoll:
        transport = None

    lp = LongPoll()
    side.hub.subscribe(lp, CHANNEL)
    rest = side.fan.send(CHANNEL, list(side.hub.subscriptions[CHANNEL]), frame_of("one"))
    assert rest == [lp]
    assert side.fan.sent == 40


def test_few_subscribers_take_the_python_loop(lib: Any) -> None:
    side = Side(lib, fanout.MIN_SUBSCRIBERS - 1)
    try:
        subs = list(side.hub.subscriptions[CHANNEL])
        assert side.fan.send(CHANNEL, subs, frame_of("one")) == subs
        assert side.fan.sent == 0 and not side.fan.lists
    finally:
        side.close()


# ---------------------------------------------------------------- the whole server


def ws_clients(server: ServerProcess, n: int) -> list[socket.socket]:
    """n raw WebSocket clients subscribed to CHANNEL by query; the 101 read (a worker
    subscribes a connection before it answers)."""
    request = (
        f"GET /ws?channel={CHANNEL} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    out = []
    for _ in range(n):
        s = socket.create_connection((server.host, server.port), timeout=10)
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        out.append(s)
    return out


def read_frames(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        b0, b1 = read_exactly(sock, 2)
        assert b0 == 0x81
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", read_exactly(sock, 2))[0]
        out.append(json.loads(read_exactly(sock, n)))
    return out


def worker_after(server: ServerProcess, mid: int) -> dict[str, Any]:
    """The worker's figures in /stats once they count the fan-out of message ``mid``."""
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("GET", "/stats")
        (worker,) = json.loads(conn.getresponse().read())["workers"]
        conn.close()
        if worker["fanout_id"] >= mid:
            return dict(worker)
        assert time.monotonic() < deadline, f"/stats never showed the fan-out of {mid}"
        time.sleep(0.05)  # /stats is the supervisor's snapshot, renewed once a second


@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_server_broadcasts_to_every_subscriber_in_order(
    switch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 WebSockets on one channel, 5 messages: each gets all five in order, with the C loop
    (1) and with the Python loop (0); the history is the same for a long-poll after."""
    monkeypatch.setenv(fanout.ENV_SWITCH, switch)
    with ServerProcess(workers=1, extra=["--quiet"]) as server:
        clients = ws_clients(server, 64)
        ids = [server.publish(CHANNEL, f"m{k}") for k in range(5)]
        for s in clients:
            got = read_frames(s, 5)
            assert [m["id"] for m in got] == ids
            assert [m["data"] for m in got] == [f"m{k}" for k in range(5)]
            s.close()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("GET", f"/lp?channel={CHANNEL}&since={ids[2]}")
        resp = conn.getresponse()
        assert resp.status == 200 and [m["id"] for m in json.loads(resp.read())] == ids[3:]
        conn.close()
        assert not [line for line in server.stderr_lines if "C fan-out is off" in line]
        sent_by_c = worker_after(server, ids[-1])["fanout_c"]
        assert sent_by_c == (64 * 5 if switch == "1" else 0)


def test_without_a_compiler_the_server_says_so_and_broadcasts_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMET_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    with ServerProcess(workers=1, extra=["--quiet"]) as server:
        clients = ws_clients(server, 40)
        mid = server.publish(CHANNEL, "hello")
        for s in clients:
            assert [m["id"] for m in read_frames(s, 1)] == [mid]
            s.close()
        assert worker_after(server, mid)["fanout_c"] == 0
        told = [line for line in server.stderr_lines if "C fan-out is off" in line]
        assert told and "CC=" in told[0] and "Python loop" in told[0], server.stderr_lines


def test_a_full_socket_queues_the_whole_frame(side: Side) -> None:
    """A socket whose send buffer is already full (EAGAIN in C): the frame waits whole."""
    ws = side.subs[9]
    tr = ws.transport
    assert isinstance(tr, SockTransport)
    filler = b"f" * 65536
    with contextlib.suppress(BlockingIOError):
        while True:  # behind the transport's back: the kernel's buffers fill up
            os.write(tr.fd, filler)
    frame = frame_of("one")
    side.broadcast(frame)
    assert bytes(tr.buf) == frame and tr.mask == EPOLLIN | EPOLLOUT
    assert side.fan.sent == 39


def test_lists_kept_for_a_changed_state_are_dropped_once_a_second(side: Side) -> None:
    side.broadcast(frame_of("one"))
    side.fan.forget_stale()  # nothing changed: kept
    assert CHANNEL in side.fan.lists
    side.add()
    side.fan.forget_stale()  # a subscription since: dropped (it holds old subscribers)
    assert CHANNEL not in side.fan.lists
