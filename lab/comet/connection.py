"""The HTTP side of a worker's connections: ``HttpConn`` (HTTP/1.1 parsed by httptools:
long-poll, SSE, publish, stats, health, and the WebSocket upgrade to ``WsConn``).

Memory is the point: an idle WebSocket is a ``WsConn`` with four slots and an entry in its
channels' subscriber sets. The HTTP parser is dropped at the upgrade (``set_protocol``), and
the websockets frame parser (``WsReader``) exists only while a client is actually sending.
"""

from __future__ import annotations

import asyncio
import binascii
import enum
import hmac
from typing import TYPE_CHECKING, cast

import httptools
from websockets.utils import accept_key

from lab.comet.protocol import (
    SSE_HEAD,
    HttpError,
    Outgoing,
    Route,
    Target,
    error_body,
    http_response,
    lp_body,
    parse_target,
)
from lab.comet.websocket import WsConn

if TYPE_CHECKING:
    from lab.comet.worker import Worker

# Seconds an HTTP connection answered with an error keeps reading (and discarding) what the
# client still sends, so that closing does not reset the connection before it reads the answer.
LINGER_S = 2.0
_EMPTY: tuple[str, ...] = ()


class HeadTooLarge(Exception):
    """Raised inside a parser callback when the request head passes the limit (431)."""


class Mode(enum.Enum):
    """What an HTTP connection is doing between requests."""

    IDLE = 0
    LP = 1
    SSE = 2
    PUB = 3
    CLOSING = 4


class Request:
    """One parsed HTTP request (what the server needs of it)."""

    __slots__ = (
        "auth",
        "body",
        "content_length",
        "expect",
        "keep_alive",
        "last_event_id",
        "method",
        "upgrade",
        "upgrade_header",
        "url",
        "ws_key",
        "ws_version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.url = ""
        self.upgrade = False
        # raw values of the headers the server reads (see _HEADER_FIELDS)
        self.upgrade_header: bytes | None = None
        self.ws_key: bytes | None = None
        self.ws_version: bytes | None = None
        self.auth: bytes | None = None
        self.last_event_id: bytes | None = None
        self.content_length: bytes | None = None
        self.expect: bytes | None = None
        self.body = b""
        self.keep_alive = False


CORS_PREFLIGHT = (
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID, Cache-Control"),
    ("Access-Control-Max-Age", "600"),
)

# lower-cased header name -> the Request slot that keeps its raw value
_HEADER_FIELDS = {
    b"upgrade": "upgrade_header",
    b"sec-websocket-key": "ws_key",
    b"sec-websocket-version": "ws_version",
    b"authorization": "auth",
    b"last-event-id": "last_event_id",
    b"content-length": "content_length",
    b"expect": "expect",
}


class HttpConn(asyncio.Protocol):
    """A connection speaking HTTP/1.1 (keep-alive, requests answered in order)."""

    __slots__ = (
        "body_bytes",
        "body_parts",
        "channels",
        "error",
        "head_bytes",
        "in_head",
        "keep",
        "mode",
        "parser",
        "queue",
        "raw_head",
        "req",
        "timer",
        "transport",
        "url",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.req: Request | None = None
        self.url = b""
        self.body_parts: list[bytes] = []
        self.body_bytes = 0
        self.head_bytes = 0
        self.raw_head = 0
        self.in_head = True
        self.error: tuple[int, str] | None = None
        self.queue: list[Request] = []
        self.mode = Mode.IDLE
        self.keep = False
        self.channels: tuple[str, ...] = _EMPTY
        self.timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self.transport = cast(asyncio.Transport, transport)
        worker = self.worker
        worker.connects += 1
        worker.conns.add(self)
        if len(worker.conns) > worker.max_conns or worker.stopping:
            tcp.abort()
            return
        self.parser = httptools.HttpRequestParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        if self in worker.conns:
            worker.conns.discard(self)
            worker.closes += 1
        self._leave_channels()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.parser = None
        self.transport = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.mode is Mode.SSE or self.mode is Mode.CLOSING:
            return
        if self.in_head:
            self.raw_head += len(data)
        leftover: bytes | None = None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            leftover = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            if self.error is not None:
                self._fail(*self.error)
            else:
                self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self.in_head and self.raw_head > self.worker.max_head_bytes:
            # the head is still incomplete after this many bytes (llhttp buffers partial lines)
            self._fail(431, f"request head over {self.worker.max_head_bytes} bytes")
            return
        self._process(leftover)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.req = Request()
        self.url = b""
        self.body_parts = []
        self.body_bytes = 0
        self.head_bytes = 0
        self.raw_head = 0
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        field = _HEADER_FIELDS.get(name.lower())
        if field is not None:
            setattr(self.req, field, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.head_bytes > self.worker.max_head_bytes:
            self._count_head(0)
        length = self.req.content_length if self.req is not None else None
        if length is not None:
            try:
                too_large = int(length) > self.worker.max_message_bytes
            except ValueError:
                too_large = False  # llhttp rejects a bad Content-Length itself
            if too_large:
                self.error = (413, self._too_large())
                raise HeadTooLarge
        expect = self.req.expect if self.req is not None else None
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.worker.max_message_bytes:
            self.error = (413, self._too_large())
            raise HeadTooLarge
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        req = self.req
        assert req is not None
        req.method = parser.get_method().decode("latin-1")
        req.url = self.url.decode("latin-1")
        req.upgrade = parser.should_upgrade()
        req.keep_alive = parser.should_keep_alive()
        req.body = b"".join(self.body_parts)
        self.body_parts = []
        self.queue.append(req)

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > self.worker.max_head_bytes:
            self.error = (431, f"request head over {self.worker.max_head_bytes} bytes")
            raise HeadTooLarge

    def _too_large(self) -> str:
        return f"body over --max-message-bytes={self.worker.max_message_bytes}"

    # ------------------------------------------------------------------ requests

    def _process(self, leftover: bytes | None = None) -> None:
        while self.queue and self.mode is Mode.IDLE and self.transport is not None:
            req = self.queue.pop(0)
            if req.upgrade:
                self._upgrade(req, leftover or b"")
                return
            self._handle(req)

    def _handle(self, req: Request) -> None:
        worker = self.worker
        worker.messages += 1
        self.keep = req.keep_alive
        if req.method == "OPTIONS":  # a browser's CORS preflight (e.g. POST with Authorization)
            self._respond(204, b"", req.keep_alive, CORS_PREFLIGHT)
            return
        try:
            last_event_id = req.last_event_id
            target = parse_target(
                req.method, req.url, last_event_id.decode("latin-1") if last_event_id else None
            )
        except HttpError as exc:
            self._fail(exc.status, exc.message)
            return
        route = target.route
        if route is Route.WS:
            self._fail(426, "GET /ws needs a WebSocket upgrade (use a WebSocket client)")
        elif route is Route.LP:
            self._long_poll(target)
        elif route is Route.SSE:
            self._sse(target)
        elif route is Route.PUB:
            self._publish(target, req)
        elif route is Route.STATS:
            self._respond(200, worker.stats_json(), req.keep_alive)
        else:  # HEALTHZ
            if worker.healthy():
                self._respond(200, b'{"ok":true}\n', req.keep_alive)
            else:
                self._respond(503, b'{"ok":false}\n', req.keep_alive)

    def _upgrade(self, req: Request, leftover: bytes) -> None:
        worker = self.worker  # the upgrade is part of the connect event, not a message
        try:
            target = parse_target(req.method, req.url)
        except HttpError as exc:
            self._fail(exc.status, exc.message)
            return
        if target.route is not Route.WS:
            self._fail(400, f"only /ws accepts an upgrade, not {target.route.value}")
            return
        if req.upgrade_header is None or b"websocket" not in req.upgrade_header.lower():
            self._fail(400, "Upgrade header must be 'websocket'")
            return
        if req.ws_version != b"13":
            self._fail(426, "Sec-WebSocket-Version must be 13", (("Sec-WebSocket-Version", "13"),))
            return
        key = req.ws_key
        try:
            if key is None or len(binascii.a2b_base64(key, strict_mode=True)) != 16:
                raise ValueError
        except (ValueError, binascii.Error):
            self._fail(400, "Sec-WebSocket-Key must be 16 bytes in base64")
            return
        transport = self.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept_key(key.decode("ascii")).encode()
        )
        ws = WsConn(worker, transport, worker.channel_tuple(target.channels))
        transport.set_write_buffer_limits(high=worker.max_buffer_bytes)
        for channel in ws.channels:
            worker.hub.subscribe(ws, channel)
        worker.conns.discard(self)
        worker.conns.add(ws)
        transport.set_protocol(ws)
        self.parser = None
        self.transport = None
        self.queue.clear()
        if leftover:
            ws.data_received(leftover)

    def _long_poll(self, target: Target) -> None:
        hub = self.worker.hub
        messages = hub.catch_up(target.channels, target.since)
        if messages:
            self._respond(200, lp_body(messages), self.keep)
        elif target.timeout_s == 0 or self.worker.stopping:
            self._respond(204, b"", self.keep)
        else:
            self.mode = Mode.LP
            self._join_channels(target.channels)
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(target.timeout_s, self._lp_timeout)
            if self.transport is not None:
                self.transport.pause_reading()

    def _lp_timeout(self) -> None:
        self.timer = None
        if self.mode is Mode.LP:
            self._leave_channels()
            self.mode = Mode.IDLE
            self._respond(204, b"", self.keep)

    def _sse(self, target: Target) -> None:
        transport = self.transport
        assert transport is not None
        self.mode = Mode.SSE
        events = [
            Outgoing(m).sse_event for m in self.worker.hub.catch_up(target.channels, target.since)
        ]
        transport.write(SSE_HEAD + b"retry: 1000\n\n" + b"".join(events))
        self._join_channels(target.channels)

    def _publish(self, target: Target, req: Request) -> None:
        worker = self.worker
        token = worker.token_header
        if token is not None and not hmac.compare_digest(req.auth or b"", token):
            self._fail(
                401,
                "publishing needs 'Authorization: Bearer <token>' with the server's "
                "--publish-token",
                (("WWW-Authenticate", 'Bearer realm="lab.comet"'),),
            )
            return
        try:
            data = req.body.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(400, "the body must be UTF-8 text")
            return
        if worker.stopping or not worker.publish(target.channels[0], data, self):
            self._fail(503, "the server is stopping or its supervisor is gone; retry")
            return
        self.mode = Mode.PUB
        if self.transport is not None:
            self.transport.pause_reading()

    def published(self, message_id: int) -> None:
        """The supervisor sequenced this connection's publish as ``message_id``."""
        if self.mode is Mode.PUB and self.transport is not None:
            self.mode = Mode.IDLE
            self._respond(200, b'{"id":%d}\n' % message_id, self.keep)

    # ------------------------------------------------------------------ delivery

    def deliver(self, out: Outgoing) -> None:
        """A message on a channel this connection waits on (long-poll) or streams (SSE)."""
        transport = self.transport
        if transport is None:
            return
        if self.mode is Mode.SSE:
            transport.write(out.sse_event)
        elif self.mode is Mode.LP:
            self._leave_channels()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.mode = Mode.IDLE
            self._respond(200, lp_body([out.message]), self.keep)

    def shutdown(self) -> None:
        """Server stopping: end a waiting long-poll (204), an SSE stream or an idle connection."""
        transport = self.transport
        if transport is None:
            return
        if self.mode is Mode.LP:
            self._leave_channels()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.mode = Mode.IDLE
            self._respond(204, b"", keep_alive=False)
        elif self.mode is Mode.PUB:
            self._fail(503, "the server is stopping; retry")
        else:
            self.mode = Mode.CLOSING
            transport.close()

    # ------------------------------------------------------------------ helpers

    def _join_channels(self, channels: tuple[str, ...]) -> None:
        self.channels = channels
        for channel in channels:
            self.worker.hub.subscribe(self, channel)

    def _leave_channels(self) -> None:
        for channel in self.channels:
            self.worker.hub.unsubscribe(self, channel)
        self.channels = _EMPTY

    def _respond(
        self, status: int, body: bytes, keep_alive: bool, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        keep_alive = keep_alive and not self.worker.stopping
        transport.write(http_response(status, body, keep_alive=keep_alive, extra=extra))
        if not keep_alive:
            self.mode = Mode.CLOSING
            self.parser = None
            transport.close()
            return
        transport.resume_reading()
        self._process()

    def _fail(self, status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer an error and close the connection cleanly."""
        transport = self.transport
        self.mode = Mode.CLOSING
        self.parser = None
        self.queue.clear()
        self._leave_channels()
        if transport is None:
            return
        self.worker.errors += 1
        transport.write(http_response(status, error_body(message), extra=extra))
        if self.timer is not None:
            self.timer.cancel()
        if transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
            self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()
