"""The HTTP side of a worker's connections: ``HttpConn`` (HTTP/1.1 parsed by httptools:
long-poll, SSE, publish, stats, health, and the WebSocket upgrade to ``WsConn``), and
``fast_upgrade``: the check of a whole upgrade request read at accept, which lets the worker's
accept path (``lab.comet.fdio``) answer the common case without an ``HttpConn``; both share
``check_upgrade`` and ``switching_protocols``.

Memory is the point: an idle WebSocket is a ``WsConn`` with four slots and an entry in its
channels' subscriber sets. The HTTP parser is dropped at the upgrade (``set_protocol``), and
the websockets frame parser (``WsReader``) exists only while a client is actually sending.
"""

from __future__ import annotations

import asyncio
import binascii
import enum
import hmac
import logging
from hashlib import sha1
from typing import TYPE_CHECKING, cast

import httptools

from lab.comet.protocol import (
    SSE_HEAD,
    HttpError,
    Outgoing,
    Route,
    SseCursor,
    Target,
    error_body,
    http_response,
    lp_body,
    parse_target,
)
from lab.comet.websocket import WsConn

if TYPE_CHECKING:
    from lab.comet.worker import Worker

log = logging.getLogger("lab.comet.worker")

# Seconds an HTTP connection answered with an error keeps reading (and discarding) what the
# client still sends, so that closing does not reset the connection before it reads the answer.
LINGER_S = 2.0
# Requests a client may pipeline behind a waiting long-poll before the server stops reading
# (it keeps reading up to then, to see the client go away).
MAX_QUEUED = 8
_EMPTY: tuple[str, ...] = ()
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
# the fix named by a 400 for a request httptools cannot parse
_SEND_HTTP = (
    "send HTTP/1.1 (RFC 9112): a request line such as 'GET /lp?channel=A HTTP/1.1', "
    "'Name: value' header lines, a body framed by Content-Length or chunked; the paths are "
    "/ws, /lp, /sse, /pub/<channel>, /stats, /healthz"
)


class Refused(Exception):
    """Raised inside a parser callback to stop parsing a request the server refuses (a header
    of ``_ONCE`` sent twice, a head or body over its limit); ``HttpConn.error`` holds the
    answer."""


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
        "host",
        "keep_alive",
        "last_event_id",
        "method",
        "upgrade",
        "upgrade_header",
        "url",
        "version",
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
        self.host: bytes | None = None
        self.body = b""
        self.keep_alive = False
        self.version = ""


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
    b"host": "host",
}


def _set_header(req: Request, name: bytes, value: bytes) -> str | None:
    """Keep a header the server reads (``_HEADER_FIELDS``) in ``req``; the field's name when
    the header came before (the last one is kept), else None."""
    field = _HEADER_FIELDS.get(name.lower())
    if field is None:
        return None
    again = getattr(req, field) is not None
    setattr(req, field, value)
    return field if again else None


# the Request slots whose header may come only once: a second one is answered 400 with this
_ONCE = {
    "host": "two Host headers: send it once (RFC 9112 §3.2)",
    "ws_key": "two Sec-WebSocket-Key headers: send it once, with one key (RFC 6455 §11.3.1)",
    "ws_version": (
        "two Sec-WebSocket-Version headers: send it once, 'Sec-WebSocket-Version: 13' "
        "(RFC 6455 §11.3.5)"
    ),
}


class HttpConn(asyncio.Protocol):
    """A connection speaking HTTP/1.1 (keep-alive, requests answered in order)."""

    __slots__ = (
        "body_bytes",
        "body_parts",
        "channels",
        "cursor",
        "error",
        "head_bytes",
        "head_only",
        "idle_tick",
        "in_head",
        "keep",
        "mode",
        "parser",
        "prefix",
        "queue",
        "raw_head",
        "req",
        "rest",
        "timer",
        "transport",
        "url",
        "worker",
    )

    def __init__(self, worker: Worker, prefix: bytes = b"") -> None:
        self.worker = worker
        self.prefix = prefix  # bytes read before the hand-over (lab.comet.fdio), parsed first
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
        self.cursor: SseCursor | None = None  # an SSE stream of several channels
        self.head_only = False  # answering a HEAD request: no body
        self.idle_tick = worker.ticks  # when it began to wait for a request; -1: busy
        self.rest: bytes | None = None  # what came after an upgrade request, for the WebSocket

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A connection handed over by the worker's acceptor, which counted it in
        ``worker.conns`` and ``worker.http_conns``, with the bytes it read already
        (``prefix``): they are parsed before anything read later."""
        tcp = self.transport = cast(asyncio.Transport, transport)
        worker = self.worker
        if worker.stopping:
            tcp.abort()
            return
        self.parser = httptools.HttpRequestParser(self)
        prefix, self.prefix = self.prefix, b""
        if prefix:
            try:
                self.data_received(prefix)
            except Exception:  # a bug: uvloop would only log it and leave the connection open
                log.exception("worker %d: a request failed; connection closed", worker.index)
                tcp.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        if self in worker.conns:
            worker.conns.discard(self)
            worker.closes += 1
        worker.http_conns.discard(self)
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
        if self.rest is not None:  # an upgrade is waiting its turn: these are WebSocket bytes
            self.rest += data
            return
        if self.transport is not None and (
            self.mode is Mode.PUB or (self.mode is Mode.LP and len(self.queue) >= MAX_QUEUED)
        ):
            # resumed once the publish or long-poll is answered; asked again here because
            # uvloop ignores a pause asked inside connection_made (a hand-over's first bytes)
            self.transport.pause_reading()
        if self.in_head:
            self.raw_head += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.rest = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            if self.error is not None:
                self._fail(*self.error)
            else:
                self._fail(400, f"malformed HTTP request: {exc}; {_SEND_HTTP}")
            return
        if self.in_head and self.raw_head > self.worker.max_head_bytes:
            # the head is still incomplete after this many bytes (llhttp buffers partial lines)
            self._fail(431, self._head_too_large())
            return
        self._process()

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
        again = _set_header(cast(Request, self.req), name, value)
        if again in _ONCE:
            self.error = (400, _ONCE[again])
            raise Refused

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
                raise Refused
        expect = self.req.expect if self.req is not None else None
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.worker.max_message_bytes:
            self.error = (413, self._too_large())
            raise Refused
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
        req.version = parser.get_http_version()
        req.body = b"".join(self.body_parts)
        self.body_parts = []
        self.req = None
        self.queue.append(req)

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > self.worker.max_head_bytes:
            self.error = (431, self._head_too_large())
            raise Refused

    def _too_large(self) -> str:
        return (
            f"body over --max-message-bytes={self.worker.max_message_bytes}: send a smaller "
            "body, or start the server with a larger --max-message-bytes"
        )

    def _head_too_large(self) -> str:
        return (
            f"request head over --max-head-bytes={self.worker.max_head_bytes}: send a shorter "
            "URL and fewer or shorter headers, or start the server with a larger "
            "--max-head-bytes"
        )

    # ------------------------------------------------------------------ requests

    def _process(self) -> None:
        while self.queue and self.mode is Mode.IDLE and self.transport is not None:
            req = self.queue.pop(0)
            self.idle_tick = -1
            self.head_only = req.method == "HEAD"
            if req.version != "1.1" and req.version != "1.0":
                self._fail(400, f"HTTP/{req.version} is not served: send an HTTP/1.1 request")
                return
            if req.host is None and req.version == "1.1":
                self._fail(400, "an HTTP/1.1 request needs a Host header: add 'Host: HOST:PORT'")
                return
            if req.upgrade:
                rest, self.rest = self.rest or b"", None
                self._upgrade(req, rest)
                return
            self._handle(req)
        if self.mode is Mode.IDLE and not self.queue:
            self.idle_tick = self.worker.ticks

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
            self._fail(exc.status, exc.message, exc.extra)
            return
        route = target.route
        if route is Route.WS:
            self._fail(
                426,
                "GET /ws needs a WebSocket upgrade (use a WebSocket client)",
                (("Upgrade", "websocket"),),
            )
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
            target = check_upgrade(req)
        except HttpError as exc:
            self._fail(exc.status, exc.message, exc.extra)
            return
        transport = self.transport
        assert transport is not None and req.ws_key is not None
        transport.write(switching_protocols(req.ws_key))
        ws = WsConn(worker, transport, worker.channel_tuple(target.channels))
        transport.set_write_buffer_limits(high=worker.max_buffer_bytes)
        for channel in ws.channels:
            worker.hub.subscribe(ws, channel)
        worker.conns.discard(self)
        worker.http_conns.discard(self)
        worker.conns.add(ws)
        transport.set_protocol(ws)
        self.parser = None
        self.transport = None
        self.queue.clear()
        if leftover:
            ws.data_received(leftover)

    def _long_poll(self, target: Target) -> None:
        hub = self.worker.hub
        messages = hub.catch_up(target)
        if messages:
            self._respond(200, lp_body(messages), self.keep)
        elif target.timeout_s == 0 or self.worker.stopping:
            self._respond(204, b"", self.keep)
        else:
            self.mode = Mode.LP
            self._join_channels(target.channels)
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(target.timeout_s, self._lp_timeout)
            # reading goes on while it waits: a client that goes away is seen at once

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
        self.worker.http_conns.discard(self)  # a stream is never timed: out of the sweep
        hub = self.worker.hub
        messages = hub.catch_up(target)
        if len(target.channels) == 1:
            events = [Outgoing(m).sse_event for m in messages]
        else:  # event ids are the stream's position on each channel (SseCursor)
            start = {}
            for channel in target.channels:
                since = target.since_of(channel)
                start[channel] = hub.last_id(channel) if since is None else since
            cursor = self.cursor = SseCursor(start)
            events = [cursor.event(Outgoing(m)) for m in messages]
        transport.write(SSE_HEAD + b"retry: 1000\n\n" + b"".join(events))
        self._join_channels(target.channels)

    def _publish(self, target: Target, req: Request) -> None:
        worker = self.worker
        token = worker.token
        if token is not None and not _bearer_matches(req.auth, token):
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
            self._fail(400, "the body is not UTF-8: publish UTF-8 text (binary data: base64 it)")
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
            cursor = self.cursor
            transport.write(out.sse_event if cursor is None else cursor.event(out))
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

    def timed_out(self) -> None:
        """The worker's sweep: no complete request within ``--request-timeout`` (408), or
        idle that long between requests (closed without a word, as keep-alive ends)."""
        self.idle_tick = -1
        if self.mode is not Mode.IDLE:
            return
        if self.req is not None:  # a request was under way
            self._fail(
                408,
                f"no complete request in --request-timeout={self.worker.request_timeout_s:g} s: "
                "send the whole request at once, or start the server with a larger "
                "--request-timeout",
            )
        elif self.transport is not None:
            self.mode = Mode.CLOSING
            self.parser = None
            self.transport.close()

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
        head, self.head_only = self.head_only, False
        transport.write(http_response(status, body, keep_alive=keep_alive, extra=extra, head=head))
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
        self.idle_tick = -1  # not waiting for a request any more: the sweep leaves it alone
        self.parser = None
        self.queue.clear()
        self._leave_channels()
        if transport is None:
            return
        self.worker.errors += 1
        head, self.head_only = self.head_only, False
        transport.write(http_response(status, error_body(message), extra=extra, head=head))
        if self.timer is not None:
            self.timer.cancel()
        if transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
            self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()


def _bearer_matches(auth: bytes | None, token: bytes) -> bool:
    """``Authorization: Bearer <token>``; the scheme's case is free (RFC 9110 §11.1)."""
    if auth is None:
        return False
    scheme, _, given = auth.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def check_upgrade(req: Request) -> Target:
    """The target of a WebSocket upgrade request, or ``HttpError`` naming what is wrong."""
    target = parse_target(req.method, req.url)
    if target.route is not Route.WS:
        raise HttpError(
            400, f"only /ws accepts an upgrade, not {target.route.value}: upgrade on /ws?channel=A"
        )
    if req.upgrade_header is None or b"websocket" not in req.upgrade_header.lower():
        raise HttpError(400, "only a WebSocket upgrade is served: send 'Upgrade: websocket'")
    if req.ws_version != b"13":
        raise HttpError(426, "Sec-WebSocket-Version must be 13", (("Sec-WebSocket-Version", "13"),))
    key = req.ws_key
    try:
        if key is None or len(binascii.a2b_base64(key, strict_mode=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HttpError(
            400,
            "Sec-WebSocket-Key must be 16 random bytes in base64 (24 characters, e.g. "
            "'dGhlIHNhbXBsZSBub25jZQ==')",
        ) from None
    return target


def switching_protocols(key: bytes) -> bytes:
    """The 101 answer to an upgrade with ``Sec-WebSocket-Key: key`` (RFC 6455 §4.2.2)."""
    accept = binascii.b2a_base64(sha1(key + WS_GUID).digest(), newline=False)
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept
    )


class FirstRequest:
    """Parser callbacks for the fast path: a connection's first request, read whole at accept
    (``fast_upgrade``). Only what an upgrade needs; anything else goes to ``HttpConn``."""

    __slots__ = ("head_bytes", "messages", "req", "twice", "url")

    def __init__(self) -> None:
        self.req = Request()
        self.url = b""
        # a header the server reads came twice: HttpConn answers (with a 400 if it is one of
        # _ONCE's)
        self.twice = False
        self.messages = 0  # requests begun in these bytes: more than one goes to HttpConn
        self.head_bytes = 0  # counted as HttpConn counts them

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if _set_header(self.req, name, value) is not None:
            self.twice = True


def fast_upgrade(data: bytes, max_head_bytes: int) -> tuple[Target, bytes] | None:
    """If ``data`` is exactly one complete and valid WebSocket upgrade request (the common
    case: what a client sends first, read whole at accept), its target and the 101 answer;
    else None, and ``HttpConn`` handles the bytes, answering every error as it always does.
    Returns before anything is written or changed, so that handing over is always safe."""
    if len(data) > max_head_bytes:
        return None
    head = FirstRequest()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
        return None  # not an upgrade (or not complete)
    except httptools.HttpParserUpgrade as exc:
        if exc.args[0] != len(data):
            return None  # bytes after the request: HttpConn keeps them for the WebSocket
    except httptools.HttpParserError:
        return None
    req = head.req
    if (
        head.messages != 1
        or head.twice
        or head.head_bytes > max_head_bytes
        or req.host is None
        or req.content_length is not None  # HttpConn checks the size against its limit
        or req.expect is not None  # HttpConn answers 100 Continue
        or parser.get_http_version() != "1.1"
    ):
        return None
    req.method = parser.get_method().decode("latin-1")
    req.url = head.url.decode("latin-1")
    try:
        target = check_upgrade(req)
    except HttpError:
        return None
    assert req.ws_key is not None
    return target, switching_protocols(req.ws_key)
