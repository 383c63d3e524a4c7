"""The publisher: ``POST /pub/<channel>`` at a fixed rate, each body carrying its send time.

What it is for: receivers measure delivery latency from ``ts`` and count lost / duplicated /
reordered messages from the per-channel ids the server assigns. Runs in the coordinator on one
HTTP/1.1 keep-alive connection (reconnecting when the server closes it), one request at a
time, on an open schedule: message ``n`` is due at ``start + n / rate``; when behind it
sends at once and the lag shows in ``lag_ms``. Bounded by ``count`` and by ``stop()``.
The first failed publish is told on stderr at once (the status or the error, and the fix);
after it only ``errors`` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httptools


@dataclass(frozen=True, slots=True)
class PublishSpec:
    url: str
    rate_per_s: float
    count: int
    token: str | None = None
    payload_bytes: int = 0
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname or not parts.path.startswith("/pub/"):
            raise ValueError(
                f"--publish-url {self.url!r}: give http://HOST:PORT/pub/<channel>, "
                "e.g. http://127.0.0.1:8080/pub/bench"
            )
        if not self.rate_per_s > 0:
            raise ValueError(f"--publish-rate must be > 0, got {self.rate_per_s}")
        if self.count < 0:
            raise ValueError(f"--publish-count must be >= 0, got {self.count}")


def message_body(seq: int, payload_bytes: int, now: float) -> bytes:
    """The published body: JSON ``{"ts": unix_s, "seq": n}``, padded to ``payload_bytes``."""
    body = json.dumps({"ts": now, "seq": seq}, separators=(",", ":"))
    if len(body) < payload_bytes:
        pad = payload_bytes - len(body) - len(',"pad":""')
        if pad > 0:
            body = body[:-1] + ',"pad":"' + "x" * pad + '"}'
    return body.encode()


class _Response(asyncio.Protocol):
    __slots__ = ("body", "closed", "parser", "statuses", "tr", "waiter")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.body = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self.tr: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._done(exc)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def _done(self, exc: BaseException | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("publish connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._done(exc)


class Publisher:
    """Publishes per ``PublishSpec``; counters read by the coordinator each second."""

    def __init__(self, spec: PublishSpec) -> None:
        self.spec = spec
        parts = urlsplit(spec.url)
        self.host = parts.hostname or "127.0.0.1"
        self.channel = unquote(parts.path[len("/pub/") :])
        self.port = parts.port or 80
        auth = f"Authorization: Bearer {spec.token}\r\n" if spec.token else ""
        self.head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.msgs_out = 0
        self.bytes_out = 0
        self.errors = 0
        self.lag_max_s = 0.0
        self.last_id: int | None = None
        self.first_error: str | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _error(self, text: str) -> None:
        """Count a failed publish; tell the first one (one line, not one per message)."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = text
            print(f"lab.agent: publish: {text}", file=sys.stderr, flush=True)

    def _refusal(self, status: int) -> str:
        if status in (401, 403):
            fix = (
                "the server refused the token: give --publish-token the server's token"
                if self.spec.token
                else "the server needs a publish token: give --publish-token (the server's)"
            )
        elif status == 404:
            fix = "not a publish endpoint (lab serve: /pub/<channel>)"
        elif status == 413:
            fix = "the body is too large for the server: lower --payload-bytes"
        else:
            fix = "see the server's log"
        return f"HTTP {status} from {self.spec.url}: {fix}"

    def _failure(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer from {self.spec.url} in time: is the server overloaded?"
        if isinstance(exc, httptools.HttpParserError):
            return f"no HTTP answer from {self.spec.url}: is it an HTTP server's port?"
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot publish to {self.spec.url} ({why}): is the server up?"

    async def _connect(self) -> _Response:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Response, self.host, self.port)
        return proto

    async def run(self, start_mono: float) -> None:
        """Publish ``count`` messages from ``start_mono`` (loop time) + ``delay_s``."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        conn: _Response | None = None
        t_first = start_mono + spec.delay_s
        for seq in range(spec.count):
            due = t_first + seq / spec.rate_per_s
            wait = due - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
            if self._stop.is_set():
                break
            self.lag_max_s = max(self.lag_max_s, loop.time() - due)
            body = message_body(seq, spec.payload_bytes, time.time())
            req = self.head + b"%d\r\n\r\n" % len(body) + body
            try:
                if conn is None or conn.closed.done():
                    conn = await asyncio.wait_for(self._connect(), 5.0)
                conn.waiter = loop.create_future()
                conn.body = bytearray()
                assert conn.tr is not None
                conn.tr.write(req)
                status = await asyncio.wait_for(conn.waiter, 10.0)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                self._error(self._failure(exc))
                if conn is not None and conn.tr is not None:
                    conn.tr.abort()
                conn = None
                continue
            if status != 200:
                self._error(self._refusal(status))
                continue
            self.msgs_out += 1
            self.bytes_out += len(req)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.last_id = int(json.loads(conn.body)["id"])
        if conn is not None and conn.tr is not None:
            conn.tr.close()
