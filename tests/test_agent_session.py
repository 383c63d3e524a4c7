"""lab.agent sessions on loopback: each kind against lab.comet, lost/dup/reordered detection
against a server that drops, repeats and swaps messages on purpose, generic mode, failures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lab.agent.records import Outcome, Records, read_records
from lab.agent.session import Shared
from tests.loopthread import LoopThread

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_agent(*args: str, timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    p = subprocess.run(
        [PY, "-m", "lab.agent", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
    return p.returncode, lines, p.stderr


@pytest.mark.parametrize(
    ("session", "path"), [("websocket", "ws"), ("longpoll", "lp"), ("sse", "sse")]
)
def test_each_session_receives_every_message_from_lab_comet(
    comet: int, session: str, path: str, tmp_path: Path
) -> None:
    ch = f"t-{session}"
    scheme = "ws" if session == "websocket" else "http"
    rec = tmp_path / "a.rec"
    rc, lines, err = run_agent(
        "--url",
        f"{scheme}://127.0.0.1:{comet}/{path}?channel={ch}",
        "--session",
        session,
        "--rate",
        "200",
        "--connections",
        "20",
        "--hold",
        "3",
        "--records",
        str(rec),
        "--publish-url",
        f"http://127.0.0.1:{comet}/pub/{ch}",
        "--publish-rate",
        "20",
        "--publish-count",
        "10",
        "--publish-delay",
        "1.0",
    )
    assert rc == 0, err
    end = lines[-1]
    assert end["kind"] == "agent_end" and end["outcome"] == "completed"
    assert all(x["kind"] == "agent" for x in lines[:-1])
    assert end["msgs_out"] == 10 and end.get("publish_errors") == 0
    assert end["connected"] == 20 and end["closed"] == 20 and end["open"] == 0
    assert end["msgs_in"] == 20 * 10
    assert (end["lost"], end["dup"], end["reordered"]) == (0, 0, 0)
    assert sum(end["failed"].values()) == 0
    delivered = sum(c for x in lines for _, c in x["delivery_hist"]["buckets"])
    read = sum(c for x in lines for _, c in x["read_hist"]["buckets"])
    # every message is read; each has an arrival time unless one read brought it with a later
    # one (20 a second against a 50 ms read tick: it happens), and then it is counted untimed
    assert read == 200
    assert delivered + end["untimed"] == 200
    if session == "longpoll":  # an answer is one write: its messages arrived together
        assert end["untimed"] == 0
    r = read_records(rec)
    assert Counter(r["outcome"]) == {"ok": 20}
    assert sorted(r["conn"]) == list(range(20))
    for s, st, c, cl in zip(r["scheduled"], r["started"], r["connected"], r["closed"], strict=True):
        assert s <= st <= c <= cl


def test_websocket_subscribe_frame_and_http_failure(comet: int) -> None:
    rc, lines, err = run_agent(
        "--url",
        f"ws://127.0.0.1:{comet}/ws",
        "--subscribe",
        "sub1",
        "--rate",
        "100",
        "--connections",
        "5",
        "--hold",
        "2.5",
        "--publish-url",
        f"http://127.0.0.1:{comet}/pub/sub1",
        "--publish-rate",
        "10",
        "--publish-count",
        "3",
        "--publish-delay",
        "1.0",
    )
    assert rc == 0, err
    assert lines[-1]["msgs_in"] == 15


@pytest.mark.parametrize(
    ("session", "url", "hint"),
    [
        ("websocket", "ws://127.0.0.1:{port}/nope", "not a WebSocket endpoint (lab serve: /ws)"),
        ("sse", "http://127.0.0.1:{port}/nope?channel=c", "not an SSE endpoint (lab serve: /sse)"),
        (
            "longpoll",
            "http://127.0.0.1:{port}/nope?channel=c",
            "not a long-poll endpoint (lab serve: /lp)",
        ),
    ],
)
def test_a_refused_first_request_is_an_http_failure_named_once(
    comet: int, session: str, url: str, hint: str, tmp_path: Path
) -> None:
    """An unknown path: the server answers 404. Every session kind counts the connections as
    failed (reason http; a long-poll too, though its TCP connection was up: it never worked),
    none as dropped, the records agree, and stderr says once which status came from where."""
    url = url.format(port=comet)
    rec = tmp_path / "f.rec"
    rc, lines, err = run_agent(
        "--url", url, "--session", session, "--rate", "100", "--connections", "5",
        "--hold", "0.5", "--records", str(rec),
    )  # fmt: skip
    assert rc == 0, err
    end = lines[-1]
    assert end["failed"]["http"] == 5 and sum(end["failed"].values()) == 5, end
    assert (end["connected"], end["open"], end["closed"], end["dropped"]) == (0, 0, 0, 0), end
    r = read_records(rec)
    assert Counter(r["outcome"]) == {"http": 5}
    assert all(math.isnan(c) for c in r["connected"])  # failed to connect, not dropped
    assert err.splitlines() == [
        f"lab.agent: HTTP 404 from {url}: {hint}",
        "lab.agent: 5 of 5 connections failed (http 5): the server answered HTTP with an error "
        "(the line above names it)",
    ], err


def test_http_failure_hints() -> None:
    from lab.agent.target import SessionKind, describe_http_failure

    ws, lp = SessionKind.WEBSOCKET, SessionKind.LONGPOLL
    assert describe_http_failure(ws, 200, "ws://h:1/") == (
        "HTTP 200 from ws://h:1/: not a WebSocket endpoint (lab serve: /ws)"
    )
    assert "Sec-WebSocket-Accept is missing or wrong" in describe_http_failure(ws, 101, "ws://h/")
    assert describe_http_failure(lp, 0, "http://h:1/lp?channel=c") == (
        "no HTTP answer from http://h:1/lp?channel=c: is an HTTP server listening on that port?"
    )
    assert describe_http_failure(lp, 503, "u") == (
        "HTTP 503 from u: the server is shedding load: see its log, or lower --rate"
    )


def test_longpoll_error_after_a_good_poll_is_a_drop() -> None:
    """Bytes in, counters out: a long-poll refused on its first poll never worked (failed);
    one refused after a good poll had worked (dropped, outcome http)."""
    from lab.agent.session import LongPollClient, State
    from lab.agent.target import SessionKind, make_target

    class Transport:
        def write(self, data: bytes) -> None:
            pass

        def abort(self) -> None:
            pass

    tgt = make_target("http://127.0.0.1:1/lp?channel=c", SessionKind.LONGPOLL)
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    for answers, failed, dropped in [([not_found], 1, 0), ([no_content, not_found], 0, 1)]:
        sh = Shared(Records(1))
        sh.records.scheduled[0] = time.time()
        client = LongPollClient(sh, 0, tgt)
        client.connection_made(Transport())
        for data in answers:
            client.data_received(data)
        c = sh.counters
        assert (c.failed[Outcome.HTTP - Outcome.REFUSED], c.dropped) == (failed, dropped)
        assert (c.connected, c.open, c.closed) == (dropped, 0, dropped)
        assert sh.records.outcome[0] == Outcome.HTTP and client.st == State.DONE
        assert math.isnan(sh.records.connected[0]) == bool(failed)
        assert sh.http_error is not None and sh.http_error[0] == 404


class ScriptedServer(LoopThread):
    """A websockets (library) server in a thread that sends a fixed sequence of envelopes
    on channel "x": ids that skip, repeat and swap, each with a send time."""

    def __init__(self, ids: list[int], published_id: int = 0) -> None:
        self.ids = ids
        self.published_id = published_id
        self.port = free_port()
        self.pub_port = free_port()
        self.peers: list[str] = []
        self.start()

    async def _handler(self, ws: Any) -> None:
        self.peers.append(ws.remote_address[0])
        if ws.request.path.startswith("/script"):
            for mid in self.ids:
                data = json.dumps({"ts": time.time(), "seq": mid})
                await ws.send(json.dumps({"channel": "x", "id": mid, "data": data}))
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async def _publish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """POST /pub/x: answers {"id": published_id} (as if the server had published it)."""
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                body = json.dumps({"id": self.published_id}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()

    async def serve(self) -> None:
        from websockets.asyncio.server import serve

        pub = await asyncio.start_server(self._publish, "127.0.0.1", self.pub_port)
        async with pub, serve(self._handler, "127.0.0.1", self.port, ping_interval=None):
            self.ready.set()
            await self.stop.wait()


def test_lost_duplicated_reordered_against_a_faulty_server() -> None:
    # 3 is dropped then arrives late (reordered, not lost); 4 repeated (dup); 7 dropped (lost)
    srv = ScriptedServer([1, 2, 4, 4, 3, 5, 6, 8, 9])
    try:
        rc, lines, err = run_agent(
            "--url",
            f"ws://127.0.0.1:{srv.port}/script",
            "--rate",
            "50",
            "--connections",
            "4",
            "--hold",
            "1.5",
        )
    finally:
        srv.close()
    assert rc == 0, err
    end = lines[-1]
    assert end["msgs_in"] == 4 * 9
    assert (end["lost"], end["dup"], end["reordered"]) == (4 * 1, 4 * 1, 4 * 1)
    delivered = sum(c for x in lines for _, c in x["delivery_hist"]["buckets"])
    assert sum(c for x in lines for _, c in x["read_hist"]["buckets"]) == 4 * 9
    assert delivered + end["untimed"] == 4 * 9  # back to back: some reads bring several


class Stopped(LoopThread):
    """A server for the untimed tests, on WebSocket (the websockets library) or SSE (raw
    HTTP, chunked): once all ``n`` connections are in and the test has stopped the load
    processes (``go``), it writes each connection ``first()``, then 0.3 s later the first
    part of ``later()``, and its second part once they are continued (``cont``)."""

    def __init__(self, kind: str, n: int, first: Any, later: Any) -> None:
        import threading

        self.kind, self.n = kind, n
        self.first, self.later = first, later
        self.port = free_port()
        self.all_in = threading.Event()
        self.written = threading.Event()
        self.start()

    async def _script(self, write: Any) -> None:
        self.count += 1
        if self.count == self.n:
            self.all_in.set()
        await self.go.wait()
        write(self.first())
        await asyncio.sleep(0.3)  # the scenario: the next bytes come later
        now, after = self.later()
        write(now)
        self.done += 1
        if self.done == self.n:
            self.written.set()
        await self.cont.wait()
        write(after)

    async def _ws(self, ws: Any) -> None:
        await self._script(ws.transport.write)
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async def _sse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )

            def chunk(data: bytes) -> None:
                if data:
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))

            await self._script(chunk)
            await reader.read()
        writer.close()

    async def serve(self) -> None:
        from websockets.asyncio.server import serve

        self.go, self.cont, self.count, self.done = asyncio.Event(), asyncio.Event(), 0, 0
        if self.kind == "websocket":
            async with serve(self._ws, "127.0.0.1", self.port, ping_interval=None):
                self.ready.set()
                await self.stop.wait()
        else:
            async with await asyncio.start_server(self._sse, "127.0.0.1", self.port):
                self.ready.set()
                await self.stop.wait()


def run_stopped(srv: Stopped, url: str, session: str) -> list[dict[str, Any]]:
    """The agent against ``srv``, its load processes stopped (SIGSTOP) while the server
    writes ``first`` and ``later``: continued, each reads both at once."""
    import signal

    import psutil

    agent = subprocess.Popen(
        [PY, "-m", "lab.agent", "--quiet", "--url", url, "--session", session, "--rate", "50",
         "--connections", str(srv.n), "--hold", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert srv.all_in.wait(20), "the agent did not connect"
        loads = [c for c in psutil.Process(agent.pid).children() if "lab.agent.proc" in c.cmdline()]
        assert loads
        for c in loads:
            c.send_signal(signal.SIGSTOP)
        srv.loop.call_soon_threadsafe(srv.go.set)
        assert srv.written.wait(20)
        for c in loads:
            c.send_signal(signal.SIGCONT)
        srv.loop.call_soon_threadsafe(srv.cont.set)
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
        srv.close()
    assert agent.returncode == 0, err
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def assert_first_untimed(lines: list[dict[str, Any]], n: int, sent: int) -> None:
    """Each of the ``n`` connections got ``sent`` messages: the first untimed, the others
    timed, none given the later write's time (0.3 s after the first's)."""
    from lab.histogram import Histogram

    end = lines[-1]
    assert end["msgs_in"] == n * sent and end["lost"] == 0
    assert end["untimed"] == n  # the first message of each connection
    assert sum(c for x in lines for _, c in x["read_hist"]["buckets"]) == n * sent
    delivery = Histogram()
    for x in lines:
        delivery.merge(Histogram.from_json(x["delivery_hist"]))
    assert len(delivery) == n * (sent - 1)
    top = delivery.max()
    assert top is None or top < 200_000  # µs: not the first message's 0.3 s


def _envelope(mid: int) -> bytes:
    data = json.dumps({"ts": time.time(), "seq": mid})
    return json.dumps({"channel": "x", "id": mid, "data": data}).encode()


@pytest.mark.parametrize("tail", ["message", "part", "ping"])
def test_a_message_read_with_later_bytes_gets_no_arrival_time(tail: str) -> None:
    """The kernel times a read by its last segment. With the load processes stopped, the
    server writes an envelope, then 0.3 s later what follows it (``tail``): another envelope,
    the first bytes of one (the rest once they run again), or a ping. A load process then
    reads both writes at once: the first envelope has no receive time of its own, so it is
    counted untimed rather than given the later write's. An envelope whose last byte ends a
    read is timed."""
    from websockets.frames import Frame, Opcode

    def later() -> tuple[bytes, bytes]:
        """What follows: now, and once the load processes run again."""
        if tail == "ping":
            return Frame(Opcode.PING, b"").serialize(mask=False), b""
        second = Frame(Opcode.TEXT, _envelope(2)).serialize(mask=False)  # sent now
        return (second, b"") if tail == "message" else (second[:10], second[10:])

    srv = Stopped(
        "websocket", 4, lambda: Frame(Opcode.TEXT, _envelope(1)).serialize(mask=False), later
    )
    lines = run_stopped(srv, f"ws://127.0.0.1:{srv.port}/", "websocket")
    assert_first_untimed(lines, 4, 1 if tail == "ping" else 2)


@pytest.mark.parametrize("tail", ["event", "comment"])
def test_an_sse_event_read_with_later_bytes_gets_no_arrival_time(tail: str) -> None:
    """The same on SSE: an event, then 0.3 s later the next event or a comment line."""

    def event(mid: int) -> bytes:
        return b"id: %d\ndata: %s\n\n" % (mid, _envelope(mid))

    srv = Stopped(
        "sse",
        4,
        lambda: event(1),
        lambda: (event(2) if tail == "event" else b": keep-alive\n\n", b""),
    )
    lines = run_stopped(srv, f"http://127.0.0.1:{srv.port}/sse?channel=x", "sse")
    assert_first_untimed(lines, 4, 2 if tail == "event" else 1)


def test_messages_never_received_before_the_close_count_as_lost() -> None:
    # the server delivers 1..5, the publisher learns that 9 was the last id published
    srv = ScriptedServer([1, 2, 3, 4, 5], published_id=9)
    try:
        rc, lines, err = run_agent(
            "--url", f"ws://127.0.0.1:{srv.port}/script", "--rate", "50", "--connections", "3",
            "--hold", "1.5", "--publish-url", f"http://127.0.0.1:{srv.pub_port}/pub/x",
            "--publish-count", "1", "--publish-delay", "0.3",
        )  # fmt: skip
    finally:
        srv.close()
    assert rc == 0, err
    end = lines[-1]
    assert end["msgs_out"] == 1 and end["publish_errors"] == 0
    assert (end["msgs_in"], end["lost"], end["dup"], end["reordered"]) == (15, 3 * 4, 0, 0)


def test_generic_mode_holds_any_websocket_server() -> None:
    srv = ScriptedServer([])
    try:
        rc, lines, err = run_agent(
            "--url",
            f"ws://127.0.0.1:{srv.port}/anything",
            "--session",
            "generic",
            "--rate",
            "100",
            "--connections",
            "10",
            "--hold",
            "1",
        )
    finally:
        srv.close()
    assert rc == 0, err
    assert lines[-1]["connected"] == 10 and lines[-1]["closed"] == 10
    assert sum(lines[-1]["failed"].values()) == 0


def test_source_addresses_are_used_round_robin() -> None:
    srv = ScriptedServer([])
    try:
        rc, lines, err = run_agent(
            "--url", f"ws://127.0.0.1:{srv.port}/a",
            "--source-ips", "127.0.0.2-127.0.0.3,127.0.0.7",
            "--rate", "200", "--connections", "30", "--hold", "0.5", "--procs", "2",
        )  # fmt: skip
    finally:
        srv.close()
    assert rc == 0, err
    assert lines[-1]["connected"] == 30
    assert Counter(srv.peers) == {"127.0.0.2": 10, "127.0.0.3": 10, "127.0.0.7": 10}


def test_refused_connections_are_data_not_errors() -> None:
    port = free_port()  # nothing listens there
    rc, lines, err = run_agent(
        "--url", f"ws://127.0.0.1:{port}/ws", "--rate", "100", "--connections", "10", "--hold", "0"
    )
    assert rc == 0, err
    assert lines[-1]["failed"]["refused"] == 10


def test_track_window_counts_without_a_server() -> None:
    sh = Shared(Records(1))
    chs: dict[str, list[int]] = {}
    for mid in [10, 11, 13, 12, 12, 14, 20, 15, 200, 100]:
        sh.track(chs, "c", mid, None)
    c = sh.counters
    # gaps: 12 (came late), 15..19 (15 came late), 21..199; 100 is too old to tell: reordered
    assert c.reordered == 3
    assert c.dup == 1
    assert c.lost == (1 - 1) + (5 - 1) + 179
    assert sh.records.outcome[0] == Outcome.NOT_STARTED


def test_frame_reading_fast_path_and_parser_agree_on_any_split() -> None:
    """Server frames arriving whole, several per read, split anywhere, 7- and 16-bit
    lengths, a ping among them: every envelope counted once, in order, with its latency."""
    from websockets.frames import Frame, Opcode

    from lab.agent.publisher import message_body
    from lab.agent.session import State, WebSocketClient
    from lab.agent.target import SessionKind, make_target

    class Transport:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

    def envelope(mid: int, pad: int) -> bytes:
        data = message_body(mid, pad, time.time()).decode()
        payload = json.dumps({"channel": "x", "id": mid, "data": data}).encode()
        return Frame(Opcode.TEXT, payload).serialize(mask=False)

    frames = [envelope(mid, 30 if mid % 2 else 400) for mid in range(1, 9)]  # 7/16-bit lengths
    frames.insert(4, Frame(Opcode.PING, b"hi").serialize(mask=False))
    stream = b"".join(frames)
    tgt = make_target("ws://127.0.0.1:1/ws?channel=x", SessionKind.WEBSOCKET)
    for cuts in ([], [len(frames[0]) + 3], [1, 2, 150, 151, 700], list(range(1, len(stream)))):
        sh = Shared(Records(1))
        client = WebSocketClient(sh, 0, tgt)
        client.st = State.OPEN
        tr = client.tr = Transport()
        bounds = [0, *cuts, len(stream)]
        for a, b in itertools.pairwise(bounds):
            client.data_received(stream[a:b])
        c = sh.counters
        assert (c.msgs_in, c.lost, c.dup, c.reordered) == (8, 0, 0, 0), cuts
        assert sh.delivery_hist.total == 8
        assert client.chs == {"x": [8, 0xFF]}
        assert len(tr.sent) == 1 and tr.sent[0][0] == 0x8A  # the pong
