"""The comet server tried as a new user would, with standard clients only: headless Chromium's
own ``WebSocket``, ``EventSource`` and ``fetch`` (from a page on another origin, so CORS is part
of the check), ``curl``, and the ``websockets`` client library. Every endpoint of the wire API
(``../shared/DESIGN.md``, "Comet server wire API") and its bad-input answers, against a real
``python -m lab.comet --workers 2`` on loopback; after each bad input the workers still serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import queue
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser_session import BrowserSession
from conftest import require
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from lab.comet.launch import ServerProcess

TOKEN = "t0ken-for-tests"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # the documented default of --max-message-bytes


# ---------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    """The server as a new user starts it on loopback: defaults, no publish token."""
    with ServerProcess(workers=2, extra=["--quiet"]) as s:
        yield s


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerProcess]:
    """The same with ``--publish-token``: POST /pub needs ``Authorization: Bearer``."""
    with ServerProcess(workers=2, extra=["--quiet", "--publish-token", TOKEN]) as s:
        yield s


def publish(server: ServerProcess, channel: str, data: str, token: str | None = None) -> int:
    return server.publish(channel, data, token)


def stats(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as resp:
        return dict(json.load(resp))


def assert_still_serving(server: ServerProcess) -> None:
    """Both original workers answer (none crashed and was replaced)."""
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as resp:
        assert resp.status == 200
    workers = stats(server)["workers"]
    assert [w["pid"] for w in workers] == server.worker_pids
    assert all(w.get("restarts", 0) == 0 for w in workers), workers


# ---------------------------------------------------------------------------- curl


@dataclass(frozen=True, slots=True)
class CurlResult:
    """What one curl call got: HTTP status (0 = no answer), headers (lower-case), body."""

    status: int
    headers: dict[str, list[str]]
    body: str
    stderr: str


@pytest.fixture(scope="module")
def curl() -> str:
    return require("curl", "the wire API is checked with curl as a new user would")


def run_curl(curl: str, *args: str) -> CurlResult:
    sep = "\x1f"
    result = subprocess.run(
        [curl, "-sS", "--max-time", "20", "-w", f"{sep}%{{http_code}}{sep}%{{header_json}}", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, status, headers = result.stdout.rsplit(sep, 2)
    return CurlResult(int(status), json.loads(headers or "{}"), body, result.stderr)


class CurlSse:
    """``curl -N`` on /sse: its output lines read by a thread, events parsed on demand."""

    def __init__(self, curl: str, url: str, *headers: str) -> None:
        args = [curl, "-sSNi", "--max-time", "30", url]
        for header in headers:
            args += ["-H", header]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\r\n"))
        self.lines.put(None)

    def head(self) -> dict[str, str]:
        """The response status line and headers (``status`` key), read up to the blank line."""
        head = {"status": self._line()}
        while line := self._line():
            name, _, value = line.partition(":")
            head[name.strip().lower()] = value.strip()
        return head

    def block(self) -> dict[str, str]:
        """The next SSE block (``field: value`` lines up to a blank line)."""
        fields: dict[str, str] = {}
        while True:
            line = self._line()
            if not line:
                if fields:
                    return fields
                continue
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")

    def _line(self) -> str:
        line = self.lines.get(timeout=15)
        assert line is not None, "curl's SSE stream ended"
        return line

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_curl_sse_stream_history_and_live(curl: str, token_server: ServerProcess) -> None:
    for i in range(3):
        assert publish(token_server, "c-sse", f"old {i}", TOKEN) == i + 1
    stream = CurlSse(curl, f"{token_server.url}/sse?channel=c-sse", "Last-Event-ID: 1")
    fresh = CurlSse(curl, f"{token_server.url}/sse?channel=c-sse")
    try:
        head = stream.head()
        assert head["status"].startswith("HTTP/1.1 200")
        assert head["content-type"] == "text/event-stream"
        assert head.get("access-control-allow-origin") == "*"
        assert stream.block() == {"retry": "1000"}
        replayed = [stream.block() for _ in range(2)]
        assert [int(b["id"]) for b in replayed] == [2, 3]
        assert json.loads(replayed[0]["data"]) == {"channel": "c-sse", "id": 2, "data": "old 1"}
        fresh.head()
        assert fresh.block() == {"retry": "1000"}  # connected: no history without an id
        assert publish(token_server, "c-sse", "live ü", TOKEN) == 4
        for s in (stream, fresh):
            block = s.block()
            assert block["id"] == "4"
            assert json.loads(block["data"]) == {"channel": "c-sse", "id": 4, "data": "live ü"}
    finally:
        stream.close()
        fresh.close()


def test_curl_long_poll(curl: str, token_server: ServerProcess) -> None:
    base = f"{token_server.url}/lp?channel=c-lp"
    empty = run_curl(curl, f"{base}&since=0&timeout=0.3")
    assert (empty.status, empty.body) == (204, "")
    for i in range(2):
        publish(token_server, "c-lp", f"m{i}", TOKEN)
    got = run_curl(curl, f"{base}&since=0&timeout=5")
    assert got.status == 200 and got.headers["access-control-allow-origin"] == ["*"]
    assert json.loads(got.body) == [
        {"channel": "c-lp", "id": 1, "data": "m0"},
        {"channel": "c-lp", "id": 2, "data": "m1"},
    ]
    # a waiting long-poll answers with the next message (from history if it came first)
    waiting = subprocess.Popen(
        [curl, "-sS", "--max-time", "20", f"{base}&since=2&timeout=15"],
        stdout=subprocess.PIPE,
        text=True,
    )
    publish(token_server, "c-lp", "next", TOKEN)
    out, _ = waiting.communicate(timeout=20)
    assert json.loads(out) == [{"channel": "c-lp", "id": 3, "data": "next"}]
    after = run_curl(curl, f"{base}&since=3&timeout=0.3")
    assert after.status == 204
    assert run_curl(curl, f"{base}&since=x").status == 400


def test_curl_publish_token_and_size(
    curl: str, token_server: ServerProcess, tmp_path: Path
) -> None:
    url = f"{token_server.url}/pub/c-pub"
    missing = run_curl(curl, "--data-binary", "x", url)
    assert missing.status == 401, missing
    assert "Authorization: Bearer" in json.loads(missing.body)["error"]
    assert missing.headers.get("www-authenticate")
    wrong = run_curl(curl, "-H", "Authorization: Bearer nope", "--data-binary", "x", url)
    assert wrong.status == 401
    assert_still_serving(token_server)
    auth = ("-H", f"Authorization: Bearer {TOKEN}")
    ok = run_curl(curl, *auth, "--data-binary", "héllo", url)
    assert (ok.status, json.loads(ok.body)) == (200, {"id": 1})
    assert ok.headers["access-control-allow-origin"] == ["*"]
    body = tmp_path / "body"
    body.write_bytes(b"x" * DEFAULT_MAX_MESSAGE_BYTES)
    assert run_curl(curl, *auth, "--data-binary", f"@{body}", url).status == 200
    body.write_bytes(b"x" * (DEFAULT_MAX_MESSAGE_BYTES + 1))
    big = run_curl(curl, *auth, "--data-binary", f"@{body}", url)
    assert big.status == 413, big
    assert "--max-message-bytes" in json.loads(big.body)["error"]
    assert_still_serving(token_server)
    # the 1 MiB message went through, the oversize one did not
    lp = run_curl(curl, f"{token_server.url}/lp?channel=c-pub&since=1&timeout=0")
    assert [m["id"] for m in json.loads(lp.body)] == [2]


def test_curl_stats_healthz_and_errors(curl: str, token_server: ServerProcess) -> None:
    base = token_server.url
    health = run_curl(curl, f"{base}/healthz")
    assert health.status == 200
    got = run_curl(curl, f"{base}/stats")
    assert got.status == 200 and got.headers["content-type"] == ["application/json"]
    data = json.loads(got.body)
    assert isinstance(data["online"], int) and isinstance(data["uptime_s"], int | float)
    assert [w["pid"] for w in data["workers"]] == token_server.worker_pids
    for worker in data["workers"]:
        assert {"pid", "online", "events", "pcs"} <= worker.keys()
        assert all(isinstance(worker[k], int) for k in ("pid", "online", "events", "pcs"))
    missing = run_curl(curl, f"{base}/nowhere")
    assert missing.status == 404 and "/ws" in json.loads(missing.body)["error"]
    assert_still_serving(token_server)
    huge = run_curl(curl, "-H", "X-Big: " + "a" * 20_000, f"{base}/stats")
    assert huge.status == 431, huge
    assert_still_serving(token_server)
    wrong_method = run_curl(curl, "-X", "DELETE", f"{base}/stats")
    assert wrong_method.status == 405
    assert run_curl(curl, f"{base}/ws").status == 426  # plain GET, no upgrade
    assert_still_serving(token_server)


@pytest.mark.parametrize(
    "request_line",
    [b"GARBAGE\r\n\r\n", b"GET /stats HTTP/1.1 extra\r\n\r\n", b"G\x00T / HTTP/1.1\r\n\r\n"],
)
def test_malformed_request_line_gets_400(token_server: ServerProcess, request_line: bytes) -> None:
    with socket.create_connection((token_server.host, token_server.port), timeout=10) as sock:
        sock.sendall(request_line)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert_still_serving(token_server)


def test_cors_preflight_for_an_authorized_publish(curl: str, token_server: ServerProcess) -> None:
    """A page on another origin publishing with its token sends ``Authorization``, which is not
    a CORS-safelisted header: the browser first sends OPTIONS and needs a 2xx answer allowing
    the origin, the POST method and the Authorization (and Content-Type) request headers."""
    got = run_curl(
        curl,
        "-X",
        "OPTIONS",
        "-H",
        "Origin: http://127.0.0.1:1",
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: authorization,content-type",
        f"{token_server.url}/pub/c-cors",
    )
    assert 200 <= got.status < 300, f"preflight OPTIONS /pub/c-cors answered {got.status}"
    h = {k: ",".join(v).lower() for k, v in got.headers.items()}
    assert h.get("access-control-allow-origin") in ("*", "http://127.0.0.1:1")
    assert "post" in h.get("access-control-allow-methods", "")
    assert "authorization" in h.get("access-control-allow-headers", "")
    assert "content-type" in h.get("access-control-allow-headers", "")


# ---------------------------------------------------------------------------- websockets


async def spread_over_workers(server: ServerProcess, url: str, cap: int = 24) -> list[Any]:
    """Open WebSocket clients until /stats shows every worker holding some (SO_REUSEPORT
    picks the worker); /stats refreshes a worker's figures about once a second."""
    clients = [await connect(url) for _ in range(4)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        online = [w["online"] for w in (await asyncio.to_thread(stats, server))["workers"]]
        if sum(online) == len(clients):
            if all(online):
                return clients
            if len(clients) >= cap:
                break
            clients += [await connect(url) for _ in range(4)]
        await asyncio.sleep(0.1)
    for ws in clients:
        await ws.close()
    raise AssertionError(f"{len(clients)} clients never spread over all workers: {online}")


async def test_websockets_envelopes_across_workers(open_server: ServerProcess) -> None:
    """Clients on both workers get every publish, in order."""
    url = f"{open_server.ws_url}/ws?channel=k1&channel=k2"
    clients = await spread_over_workers(open_server, url)
    try:
        sent = []
        for i in range(5):
            channel = ("k1", "k2")[i % 2]
            data = f"msg {i} ✓"
            msg_id = await asyncio.to_thread(publish, open_server, channel, data)
            sent.append({"channel": channel, "id": msg_id, "data": data})
        assert [m["id"] for m in sent] == [1, 1, 2, 2, 3]
        for ws in clients:
            got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in sent]
            assert got == sent
    finally:
        for ws in clients:
            await ws.close()


async def test_websockets_unsubscribe_stops_delivery(open_server: ServerProcess) -> None:
    async with connect(f"{open_server.ws_url}/ws?channel=u-ctl") as ws:
        await ws.send(json.dumps({"subscribe": "u1"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"subscribed": "u1"}
        await asyncio.to_thread(publish, open_server, "u1", "before")
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert got == {"channel": "u1", "id": 1, "data": "before"}
        await ws.send(json.dumps({"unsubscribe": "u1"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"unsubscribed": "u1"}
        await asyncio.to_thread(publish, open_server, "u1", "after")
        await asyncio.to_thread(publish, open_server, "u-ctl", "marker")
        # delivery is in publish order: the marker comes after anything still sent on u1
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert got == {"channel": "u-ctl", "id": 1, "data": "marker"}


@pytest.mark.parametrize("frame", ["this is not json", '{"dance": "x"}', b"\x00\x01binary"])
async def test_websockets_bad_frame_gets_close_code(
    open_server: ServerProcess, frame: str | bytes
) -> None:
    async with connect(f"{open_server.ws_url}/ws?channel=bad") as ws:
        await ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    rcvd = info.value.rcvd
    assert rcvd is not None and rcvd.code in (1003, 1008), info.value
    assert rcvd.reason, "the close frame should say what was wrong"
    await asyncio.to_thread(assert_still_serving, open_server)
    async with connect(f"{open_server.ws_url}/ws?channel=bad-after") as ws:
        await asyncio.to_thread(publish, open_server, "bad-after", "ok")
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["data"] == "ok"


# ---------------------------------------------------------------------------- chromium

PAGE = Path(__file__).with_name("data") / "comet_clients.html"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    """The test page, served from its own origin (another port than the comet server's)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[BrowserSession]:
    browser = BrowserSession(
        require("chromium", "the wire API is checked with a browser's own clients")
    )
    try:
        yield browser.start()
    finally:
        browser.close()


@pytest.fixture
def page(chromium: BrowserSession, page_url: str) -> BrowserSession:
    chromium.open(page_url)
    return chromium


def envelopes(channel: str, first_id: int, data: list[str]) -> list[dict[str, Any]]:
    return [{"channel": channel, "id": first_id + i, "data": d} for i, d in enumerate(data)]


def test_browser_websocket_channels_in_query(
    page: BrowserSession, open_server: ServerProcess
) -> None:
    for name in ("q1", "q2", "q3"):
        page.call("openWs", name, f"{open_server.ws_url}/ws?channel=bq1&channel=bq2")
    data = ["one", "twö", '{"json": "as text"}']
    sent = []
    for i, d in enumerate(data):
        reply = page.call("publish", open_server.url, ("bq1", "bq2")[i % 2], d)
        assert reply["status"] == 200
        sent.append({"channel": ("bq1", "bq2")[i % 2], "id": reply["body"]["id"], "data": d})
    assert [m["id"] for m in sent] == [1, 1, 2]
    for name in ("q1", "q2", "q3"):
        assert page.call("waitCount", name, 3) == sent


def test_browser_websocket_subscribe_frames(
    page: BrowserSession, open_server: ServerProcess
) -> None:
    page.call("openWs", "f", f"{open_server.ws_url}/ws")
    page.call("wsSend", "f", json.dumps({"subscribe": "bf"}))
    page.call("wsSend", "f", json.dumps({"subscribe": "bf-ctl"}))
    assert page.call("waitCount", "f", 2) == [{"subscribed": "bf"}, {"subscribed": "bf-ctl"}]
    data = [f"frame {i}" for i in range(4)]
    for d in data:
        assert page.call("publish", open_server.url, "bf", d)["status"] == 200
    assert page.call("waitCount", "f", 6)[2:] == envelopes("bf", 1, data)
    page.call("wsSend", "f", json.dumps({"unsubscribe": "bf"}))
    assert page.call("waitCount", "f", 7)[6] == {"unsubscribed": "bf"}
    page.call("publish", open_server.url, "bf", "not for me")
    page.call("publish", open_server.url, "bf-ctl", "marker")
    assert page.call("waitCount", "f", 8)[7:] == envelopes("bf-ctl", 1, ["marker"])


def test_browser_fetch_long_poll(page: BrowserSession, open_server: ServerProcess) -> None:
    base = open_server.url
    assert page.call("longPoll", base, "channel=blp&since=0&timeout=0") == {
        "status": 204,
        "body": None,
    }
    for d in ("a", "b"):
        page.call("publish", base, "blp", d)
    got = page.call("longPoll", base, "channel=blp&since=0")
    assert got == {"status": 200, "body": envelopes("blp", 1, ["a", "b"])}
    page.call("startLongPoll", "w", base, "channel=blp&since=2&timeout=15")
    page.call("publish", base, "blp", "c")
    assert page.call("finishLongPoll", "w") == {"status": 200, "body": envelopes("blp", 3, ["c"])}
    assert page.call("longPoll", base, "channel=blp&since=3&timeout=0.3")["status"] == 204


def test_browser_publish_with_token(page: BrowserSession, token_server: ServerProcess) -> None:
    """A page publishing with its token: the Authorization header makes the browser preflight
    (OPTIONS) the cross-origin POST; the server must allow it."""
    base = token_server.url
    ok = page.call("publish", base, "btok", "with token", {"Authorization": f"Bearer {TOKEN}"})
    assert ok == {"status": 200, "body": {"id": 1}}
    wrong = page.call("publish", base, "btok", "x", {"Authorization": "Bearer wrong"})
    assert wrong["status"] == 401


class CuttableProxy:
    """A TCP relay to the server whose open connections the test can cut, to make a client
    reconnect; it keeps the first bytes each client sent (the request heads)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            upstream.settimeout(None)
            with self.lock:
                self.socks += [client, upstream]
                self.heads.append(b"")
                index = len(self.heads) - 1
            threading.Thread(target=self._pump, args=(client, upstream, index), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None) -> None:
        try:
            while data := src.recv(65536):
                if index is not None and len(self.heads[index]) < 8192:
                    self.heads[index] += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        with self.lock:
            for s in self.socks:
                s.close()


def test_browser_event_source_resumes_with_last_event_id(
    page: BrowserSession, open_server: ServerProcess
) -> None:
    proxy = CuttableProxy(open_server.host, open_server.port)
    try:
        base = open_server.url
        page.call("publish", base, "bsse", "before the stream")  # id 1: not replayed
        page.call("openSse", "s", f"http://127.0.0.1:{proxy.port}/sse?channel=bsse")
        for d in ("e2", "e3"):
            page.call("publish", base, "bsse", d)
        first = page.call("waitCount", "s", 2)
        assert [m["env"] for m in first] == envelopes("bsse", 2, ["e2", "e3"])
        assert [m["lastEventId"] for m in first] == ["2", "3"]
        proxy.cut()  # the stream drops: EventSource reconnects after the server's retry
        assert page.call("waitSseErrors", "s", 1)["errors"] >= 1
        for d in ("gap 4", "gap 5"):
            page.call("publish", base, "bsse", d)
        page.call("waitCount", "s", 4)
        page.call("publish", base, "bsse", "live 6")
        got = page.call("waitCount", "s", 5)
        assert [m["env"] for m in got] == envelopes(
            "bsse", 2, ["e2", "e3", "gap 4", "gap 5", "live 6"]
        )
        assert page.call("sseState", "s")["opens"] >= 2
        requests = [h.partition(b"\r\n\r\n")[0].lower() for h in proxy.heads if h]
        sse = [h for h in requests if h.startswith(b"get /sse")]
        assert len(sse) >= 2, requests
        assert b"\r\nlast-event-id: 3" in sse[1], sse[1]
    finally:
        proxy.close()
