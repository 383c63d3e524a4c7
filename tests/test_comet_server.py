"""The comet server's wire API with real clients on loopback (one worker): each endpoint,
subscribe/unsubscribe by message, history with long-poll ``since`` and SSE ``Last-Event-ID``,
long-poll timeout, and bad input answered with the right status or close code while the worker
keeps serving."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from lab.comet.launch import ServerProcess

TOKEN = "s3cret"
MAX_BYTES = 4096


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(
        workers=1,
        extra=[
            "--publish-token",
            TOKEN,
            "--max-message-bytes",
            str(MAX_BYTES),
            "--max-head-bytes",
            "4096",
            "--history",
            "5",
            "--quiet",
        ],
    ) as s:
        yield s


def publish(server: ServerProcess, channel: str, data: str, token: str | None = TOKEN) -> int:
    return server.publish(channel, data, token)


def get(
    server: ServerProcess, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw_exchange(server: ServerProcess, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def assert_still_serving(server: ServerProcess) -> None:
    assert not [line for line in server.stderr_lines if "Traceback" in line], server.stderr_lines
    status, body = get(server, "/stats")
    assert status == 200
    stats = json.loads(body)
    assert stats["workers"][0]["pid"] == server.worker_pids[0]
    assert get(server, "/healthz")[0] == 200


async def test_stats_show_each_workers_latest_fan_out(server: ServerProcess) -> None:
    clients = [await connect(f"{server.ws_url}/ws?channel=fan") for _ in range(6)]
    try:
        for _ in range(2):  # the figures follow the latest publish, named by its id
            message_id = publish(server, "fan", "x")
            for ws in clients:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["id"] == message_id
            deadline = time.monotonic() + 5
            while True:  # the snapshot is at most a second old
                workers = json.loads(get(server, "/stats")[1])["workers"]
                fanned = [w for w in workers if w["fanout_id"] == message_id]
                if sum(w["fanout_subscribers"] for w in fanned) == 6:
                    break
                assert time.monotonic() < deadline, workers
                await asyncio.sleep(0.1)
            assert all(w["fanout_ms"] > 0 for w in fanned)
    finally:
        for ws in clients:
            await ws.close()


async def test_websocket_receives_publishes_on_its_channels(server: ServerProcess) -> None:
    async with connect(f"{server.ws_url}/ws?channel=w1&channel=w2") as ws:
        id1 = await asyncio.to_thread(publish, server, "w1", "hello")
        id2 = await asyncio.to_thread(publish, server, "w2", "wörld")
        got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
    assert got == [
        {"channel": "w1", "id": id1, "data": "hello"},
        {"channel": "w2", "id": id2, "data": "wörld"},
    ]


async def test_subscribe_and_unsubscribe_by_message(server: ServerProcess) -> None:
    async with connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps({"subscribe": "m1"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"subscribed": "m1"}
        await ws.send(json.dumps({"subscribe": "m2"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"subscribed": "m2"}
        await asyncio.to_thread(publish, server, "m1", "a")
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["data"] == "a"
        await ws.send(json.dumps({"unsubscribe": "m1"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"unsubscribed": "m1"}
        await asyncio.to_thread(publish, server, "m1", "not for me")
        await asyncio.to_thread(publish, server, "m2", "b")
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (got["channel"], got["data"]) == ("m2", "b")


def test_long_poll_history_since_and_timeout(server: ServerProcess) -> None:
    ids = [publish(server, "h1", f"m{i}") for i in range(7)]
    assert ids == list(range(1, 8))
    status, body = get(server, "/lp?channel=h1&since=4")
    assert status == 200
    assert [m["id"] for m in json.loads(body)] == [5, 6, 7]
    # history keeps 5 messages: since=0 returns what it still holds
    assert [m["id"] for m in json.loads(get(server, "/lp?channel=h1&since=0")[1])] == [
        3,
        4,
        5,
        6,
        7,
    ]
    assert get(server, "/lp?channel=h1&since=7&timeout=0.2") == (204, b"")
    assert get(server, "/lp?channel=empty&timeout=0") == (204, b"")


async def test_long_poll_waits_for_the_next_message(server: ServerProcess) -> None:
    poll = asyncio.create_task(asyncio.to_thread(get, server, "/lp?channel=h2&since=0&timeout=20"))
    await wait_for_stat(server, lambda w: w["online"] >= 1)
    await asyncio.to_thread(publish, server, "h2", "late")
    status, body = await asyncio.wait_for(poll, 20)
    assert status == 200 and json.loads(body) == [{"channel": "h2", "id": 1, "data": "late"}]


def test_long_poll_keep_alive_loop(server: ServerProcess) -> None:
    for i in range(3):
        publish(server, "h3", str(i))
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    since, seen = 0, []
    for _ in range(3):
        conn.request("GET", f"/lp?channel=h3&since={since}&timeout=5")
        resp = conn.getresponse()
        messages = json.loads(resp.read())
        seen += [m["data"] for m in messages]
        since = messages[-1]["id"]
        if since == 3:
            break
    conn.close()
    assert seen == ["0", "1", "2"]


def test_sse_honours_last_event_id(server: ServerProcess) -> None:
    for i in range(3):
        publish(server, "s1", f"e{i}")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/sse?channel=s1", headers={"Last-Event-ID": "1"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

    def next_event() -> dict[str, Any]:
        fields: dict[str, str] = {}
        while True:
            line = resp.fp.readline().decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    return {"id": int(fields["id"]), **json.loads(fields["data"])}
                continue
            key, _, value = line.partition(": ")
            fields[key] = value

    assert [next_event()["id"] for _ in range(2)] == [2, 3]
    publish(server, "s1", "live")
    event = next_event()
    assert (event["id"], event["channel"], event["data"]) == (4, "s1", "live")
    conn.close()


def test_stats_and_healthz(server: ServerProcess) -> None:
    status, body = get(server, "/stats")
    stats = json.loads(body)
    assert status == 200 and {"online", "uptime_s", "workers", "published"} <= stats.keys()
    w = stats["workers"][0]
    assert {"pid", "online", "events", "pcs", "connects", "messages", "closes"} <= w.keys()
    assert get(server, "/healthz")[0] == 200
    ws_status, _ = get(server, "/ws")
    assert ws_status == 426


async def wait_for_stat(server: ServerProcess, cond: Any, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        _, body = await asyncio.to_thread(get, server, "/stats")
        if cond(json.loads(body)["workers"][0]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition on /stats not reached")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /stats HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /stats HTTP/1.1\r\nHost: x\r\n" + b"X-Many: b\r\n" * 2000 + b"\r\n", 431),
        (b"GET /stats HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host (RFC 9112 §3.2)
        (b"GET /stats\r\n\r\n", 400),  # an HTTP/0.9 request line
        (
            b"POST /pub/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 5000\r\n\r\n"
            + b"x" * 5000,
            413,
        ),
        (
            b"POST /pub/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n"
            + b"x" * 5000
            + b"\r\n0\r\n\r\n",
            413,
        ),
        (
            b"POST /pub/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 1\r\n\r\nx",
            401,
        ),
        (b"POST /pub/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 401),
        (
            b"POST /pub/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 2\r\n\r\n\xff\xfe",
            400,
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
            400,
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            426,
        ),
        (
            b"GET /lp?channel=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
            400,
        ),
    ],
)
def test_bad_http_input_gets_status_and_worker_keeps_serving(
    server: ServerProcess, request_bytes: bytes, status: int
) -> None:
    answer = raw_exchange(server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    _, _, body = answer.partition(b"\r\n\r\n")
    assert json.loads(body)["error"]
    assert_still_serving(server)


def test_head_answers_the_get_head_without_a_body(server: ServerProcess) -> None:
    # a body after a HEAD answer would be read as the next answer: the GET behind it in the
    # pipeline must get its own, intact
    answer = raw_exchange(
        server,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 12" in head
    assert rest.startswith(b"HTTP/1.1 200 ")  # no body in between
    assert rest.endswith(b'\r\n\r\n{"ok":true}\n')
    # a route that does not take HEAD: 405, naming what it takes, still without a body
    answer = raw_exchange(server, b"HEAD /lp?channel=a HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET" in head and body == b""
    assert_still_serving(server)


def test_the_bearer_scheme_is_case_insensitive(server: ServerProcess) -> None:
    for scheme in (b"bearer", b"BEARER", b"Bearer "):
        answer = raw_exchange(
            server,
            b"POST /pub/a HTTP/1.1\r\nHost: x\r\nAuthorization: " + scheme + b" "
            + TOKEN.encode() + b"\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        )  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_a_plain_get_on_ws_names_the_upgrade_it_needs(server: ServerProcess) -> None:
    answer = raw_exchange(server, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 426 ") and b"\r\nUpgrade: websocket\r\n" in answer


def test_a_long_poll_client_that_goes_away_is_dropped_at_once(server: ServerProcess) -> None:
    import psutil

    worker = psutil.Process(server.worker_pids[0])
    socks = []
    for _ in range(3):
        sock = socket.create_connection((server.host, server.port), timeout=10)
        sock.sendall(b"GET /lp?channel=gone&timeout=300 HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(sock)
    ports = {sock.getsockname()[1] for sock in socks}

    def held() -> list[str]:  # the worker's ends of these connections, by TCP state
        return [
            c.status for c in worker.net_connections("tcp") if c.raddr and c.raddr.port in ports
        ]

    deadline = time.monotonic() + 10
    while len(held()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held() == ["ESTABLISHED"] * 3
    for sock in socks:
        sock.close()
    # long before the poll's 300 s: the server reads on while it waits, sees the FIN and
    # closes its end (it used to stop reading, and sat in CLOSE_WAIT until the timeout)
    deadline = time.monotonic() + 5
    while held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held() == []
    assert_still_serving(server)


def test_sse_over_several_channels_resumes_each_where_it_was(server: ServerProcess) -> None:
    for i in range(3):
        publish(server, "mx", f"x{i}")
    publish(server, "my", "y0")

    def stream(last_event_id: str | None) -> tuple[http.client.HTTPConnection, Any]:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        conn.request("GET", "/sse?channel=mx&channel=my", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        return conn, resp

    def next_event(resp: Any) -> tuple[str, dict[str, Any]]:
        fields: dict[str, str] = {}
        while True:
            line = resp.fp.readline().decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    return fields["id"], json.loads(fields["data"])
                continue
            key, _, value = line.partition(": ")
            fields[key] = value

    conn, resp = stream(None)
    publish(server, "my", "y1")
    event_id, env = next_event(resp)
    assert (env["channel"], env["id"]) == ("my", 2)
    assert json.loads(event_id) == {"mx": 3, "my": 2}  # where the stream is on each channel
    conn.close()
    publish(server, "mx", "x3")  # missed while away
    publish(server, "my", "y2")
    conn, resp = stream(event_id)  # as a reconnecting EventSource does
    got = [(e["channel"], e["id"]) for _, e in (next_event(resp), next_event(resp))]
    assert sorted(got) == [("mx", 4), ("my", 3)]
    conn.close()


def read_all(sock: socket.socket) -> bytes:
    """Read until the server closes (the socket's timeout bounds each wait)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_request_timeout_ends_slow_and_idle_http_connections() -> None:
    with ServerProcess(workers=1, extra=["--request-timeout", "1", "--quiet"]) as s:
        addr = (s.host, s.port)
        # an answered bad request lingers (its socket held open here) while the sweeps run:
        # they must leave it alone and go on sweeping
        bad = socket.create_connection(addr, timeout=10)
        bad.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        assert bad.recv(65536).startswith(b"HTTP/1.1 400 ")
        slow = socket.create_connection(addr, timeout=10)
        slow.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        idle = socket.create_connection(addr, timeout=10)  # sends nothing
        # a long-poll is not timed by it: it gets its own 204 after its 4 s, not a cut at 1 s
        lp = socket.create_connection(addr, timeout=10)
        lp.sendall(b"GET /lp?channel=t&timeout=4 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(slow)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert "--request-timeout" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert read_all(idle) == b""  # closed without a word, as keep-alive ends
        assert lp.recv(65536).startswith(b"HTTP/1.1 204 ")
        for sock in (bad, slow, idle, lp):
            sock.close()
        assert not [line for line in s.stderr_lines if "Traceback" in line], s.stderr_lines


def test_a_request_pipelined_behind_a_long_poll_is_answered_after_it(
    server: ServerProcess,
) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(
            b"GET /lp?channel=behind&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        mid = publish(server, "behind", "first")
        answer = read_all(sock)
    lp, _, rest = answer.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(b"HTTP/1.1 ")
    assert json.loads(lp.split(b"\r\n\r\n", 1)[1])[0]["id"] == mid  # the long-poll first
    assert rest.startswith(b"200 ") and rest.endswith(b'{"ok":true}\n')  # then the health


def test_an_upgrade_pipelined_behind_a_request_keeps_the_frames_after_it(
    server: ServerProcess,
) -> None:
    frame = Frame(Opcode.TEXT, b'{"subscribe": "pz"}').serialize(mask=True)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + UPGRADE + frame)
        got = b""
        while b'{"subscribed":"pz"}' not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    assert got.index(b"HTTP/1.1 200 ") < got.index(b"HTTP/1.1 101 ")


def test_publish_with_token_over_http_client(server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        publish(server, "t1", "x", token=None)
    assert info.value.code == 401
    assert publish(server, "t1", "x") == 1


def test_oversize_publish_from_a_standard_client_reads_413(server: ServerProcess) -> None:
    for size in (MAX_BYTES + 1, 256 * 1024):
        with pytest.raises(urllib.error.HTTPError) as info:
            publish(server, "big", "y" * size)
        assert info.value.code == 413
        assert "--max-message-bytes" in json.loads(info.value.read())["error"]
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("frame", "code"),
    [("this is not json", 1003), ('{"dance": "x"}', 1008), (b"\x00\x01", 1003)],
)
async def test_bad_frames_close_with_code_and_worker_keeps_serving(
    server: ServerProcess, frame: str | bytes, code: int
) -> None:
    async with connect(f"{server.ws_url}/ws?channel=bf") as ws:
        await ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None and info.value.rcvd.code == code
    assert info.value.rcvd.reason
    await asyncio.to_thread(assert_still_serving, server)
    async with connect(f"{server.ws_url}/ws?channel=bf2") as ws:
        await asyncio.to_thread(publish, server, "bf2", "ok")
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["data"] == "ok"


async def test_ping_and_fragmented_message(server: ServerProcess) -> None:
    async with connect(f"{server.ws_url}/ws") as ws:
        pong = await ws.ping()
        await asyncio.wait_for(pong, 10)
        await ws.send(iter(['{"subscribe"', ': "frag"}']))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"subscribed": "frag"}


def test_ping_interval_sends_pings_that_clients_answer() -> None:
    with (
        ServerProcess(workers=1, extra=["--quiet", "--ping-interval", "0.1"]) as s,
        socket.create_connection((s.host, s.port), timeout=10) as sock,
    ):
        sock.sendall(
            b"GET /ws?channel=p HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"\x89\x00" not in data.partition(b"\r\n\r\n")[2]:
            chunk = sock.recv(4096)
            assert chunk, "server closed instead of pinging"
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"\x8a\x80" + b"\x00\x00\x00\x00")  # masked empty pong
        sock.sendall(b"\x81\x92" + b"\x00\x00\x00\x00" + b'{"subscribe": "q"}'[:18])
        reply = b""
        while b"subscribed" not in reply:
            chunk = sock.recv(4096)
            assert chunk
            reply += chunk


def test_second_server_on_a_taken_port_fails_clearly(server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lab.comet", "--port", str(server.port), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "already listens" in result.stderr and "--port" in result.stderr
    assert_still_serving(server)


def test_console_line_json_lines_and_out_file(tmp_path: Path) -> None:
    out = tmp_path / "server.jsonl"
    with ServerProcess(workers=2, extra=["--out", str(out)]) as s:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            s.stdout_lines and any(line.startswith("online") for line in s.stderr_lines)
        ):
            time.sleep(0.05)
    line = json.loads(s.stdout_lines[0])
    assert (
        line["kind"] == "server"
        and {"t", "uptime_s", "online", "published", "channels"} <= line.keys()
    )
    assert [w["worker"] for w in line["workers"]] == [0, 1]
    assert set(line["workers"][0]) == {
        "worker",
        "pid",
        "online",
        "events",
        "connects",
        "messages",
        "closes",
        "pcs",
        "restarts",
        "fanout_ms",
        "fanout_subscribers",
        "fanout_id",
        "fanout_c",
    }
    console = next(x for x in s.stderr_lines if x.startswith("online"))
    assert "uptime" in console and "w1 pid" in console and "PcS" in console
    assert out.read_text().splitlines() == s.stdout_lines


UPGRADE = (
    b"GET /ws?channel=fz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_garbage_never_crashes_the_worker(server: ServerProcess) -> None:
    """Seeded random bytes, as an HTTP request and as WebSocket frames after an upgrade: every
    connection ends (answered or closed) and the same worker keeps serving."""
    rng = random.Random(1234)
    prefixes = [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"POST /pub/x HTTP/1.1\r\nContent-Length: 9\r\n",
        UPGRADE,
    ]
    for _ in range(120):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(rng.choice(prefixes) + junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    assert_still_serving(server)


def test_two_host_headers_are_refused(server: ServerProcess) -> None:
    answer = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"two Host headers" in answer
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("request_bytes", "status", "fix"),
    [
        # an unparsable request line: what to send instead
        (b"GARBAGE\r\n\r\n", 400, ["HTTP/1.1", "/ws", "/lp"]),
        (b"GET /stats HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400, ["HTTP/1.1"]),
        # over the fixture's --max-head-bytes 4096, as raw bytes and as counted: the limit and
        # the flag that sets it, as a 413 names --max-message-bytes
        (
            b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            ["--max-head-bytes=4096", "shorter"],
        ),
        (
            b"GET /stats HTTP/1.1\r\nHost: x\r\n" + b"X-Many: b\r\n" * 2000 + b"\r\n",
            431,
            ["--max-head-bytes=4096", "shorter"],
        ),
        (
            b"POST /pub/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 5000\r\n\r\n"
            + b"x" * 5000,
            413,
            ["smaller", f"--max-message-bytes={MAX_BYTES}"],
        ),
        (b"GET /stats HTTP/1.1\r\n\r\n", 400, ["Host:"]),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, ["once"]),
        (
            b"GET /lp?channel=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
            400,
            ["/ws?channel="],
        ),
        (b"GET /lp?channel=" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, ["1 to 200"]),
    ],
)
def test_error_bodies_name_the_fix(
    server: ServerProcess, request_bytes: bytes, status: int, fix: list[str]
) -> None:
    answer = raw_exchange(server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    for phrase in fix:
        assert phrase in error, error


def close_code_after(server: ServerProcess, frame: bytes) -> tuple[int, str]:
    """Upgrade on a raw socket, send ``frame``: the code and reason of the server's close."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(UPGRADE)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 101 "), got
        sock.sendall(frame)
        data = got.partition(b"\r\n\r\n")[2]
        while chunk := sock.recv(65536):  # the server closes after its close frame
            data += chunk
    assert data[0] == 0x88 and data[1] < 126, data[:40]  # a whole, unmasked close frame
    payload = data[2 : 2 + data[1]]
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


def masked(opcode: int, payload: bytes) -> bytes:
    return Frame(Opcode(opcode), payload).serialize(mask=True)


@pytest.mark.parametrize(
    ("frame", "fix"),
    [
        (masked(1, b"not json"), 'send {"subscribe": "C"} or {"unsubscribe": "C"}'),
        (masked(1, ('{"' + "ü" * 60 + '": "x"}').encode()), 'send {"subscribe"'),
        (masked(1, b'{"subscribe": 7}'), '{"subscribe": "news"}'),
        (masked(1, b'{"subscribe": ""}'), "give 1 to 200 printable characters"),
        (masked(1, b"\xff\xfe"), "send UTF-8 JSON text"),
    ],
)
def test_close_reasons_name_the_fix_within_123_bytes(
    server: ServerProcess, frame: bytes, fix: str
) -> None:
    """A refused client frame's close reason says what to send instead, and fits the 123
    bytes a close frame allows even when it quotes a long non-ASCII command."""
    _, reason = close_code_after(server, frame)
    assert fix in reason and len(reason.encode()) <= 123, reason
    assert_still_serving(server)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x05hello", 1002),  # an unmasked client frame: "incorrect masking"
        (b"\xf1\x80\x00\x00\x00\x00", 1002),  # reserved bits set
        (masked(2, b"\x00\x01"), 1003),
        (masked(1, b"not json"), 1003),
        (masked(1, b"\xff\xfe"), 1007),
        (masked(1, b'{"dance": "x"}'), 1008),
        (masked(1, b"x" * (MAX_BYTES + 1)), 1009),
    ],
)
def test_close_codes_the_server_sends_are_in_the_readme(
    server: ServerProcess, frame: bytes, code: int
) -> None:
    got, reason = close_code_after(server, frame)
    assert got == code and reason
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"\n| {code} |" in readme, f"README's close-code table lacks {code}"
    assert_still_serving(server)
