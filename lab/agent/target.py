"""Where a session connects: the destination URL parsed once, and its first request bytes.

What it is for: the load process builds one ``Target`` per ``--url`` before the start, so that
each connection only writes bytes prepared in advance (the WebSocket upgrade request with a
fixed key and its expected ``Sec-WebSocket-Accept``, the SSE or first long-poll request).
``describe_http_failure`` says what a destination's failing HTTP answer likely means.
"""

from __future__ import annotations

import base64
import enum
import os
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.utils import accept_key


class SessionKind(enum.Enum):
    WEBSOCKET = "websocket"
    LONGPOLL = "longpoll"
    SSE = "sse"
    GENERIC = "generic"


@dataclass(frozen=True, slots=True)
class Target:
    """One destination: where to connect and the request bytes to send first."""

    kind: SessionKind
    host: str
    port: int
    path: str  # path without the query
    query: str
    channel: str
    request: bytes  # the first request (upgrade / SSE / first long-poll)
    accept: bytes  # expected Sec-WebSocket-Accept (websocket kinds)
    family: int = socket.AF_INET
    url: str = ""  # as given (messages name it)
    ip: str = ""  # host, resolved once (make_target); the Host header keeps the name

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip or self.host, self.port)


def make_target(url: str, kind: SessionKind, *, lp_timeout_s: float = 25.0) -> Target:
    """Parse ``url`` for ``kind``; raises ValueError naming the problem and the fix."""
    parts = urlsplit(url)
    want = {"ws", "wss"} if kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC) else {"http"}
    if parts.scheme not in want:
        path = {SessionKind.LONGPOLL: "lp", SessionKind.SSE: "sse"}.get(kind, "ws")
        example = f"{'ws' if 'ws' in want else 'http'}://127.0.0.1:8080/{path}?channel=bench"
        raise ValueError(
            f"--url {url!r}: session {kind.value} needs a {'/'.join(sorted(want))}:// URL "
            f"(e.g. {example})"
        )
    if parts.scheme == "wss":
        raise ValueError(f"--url {url!r}: TLS (wss://) is not supported; use ws://")
    if not parts.hostname:
        raise ValueError(f"--url {url!r}: no host; give e.g. ws://127.0.0.1:8080/ws")
    host = parts.hostname
    try:
        port = parts.port or 80
    except ValueError as exc:  # urlsplit: "Port out of range 0-65535", "Port could not be cast"
        raise ValueError(f"--url {url!r}: {exc}; give a port from 1 to 65535") from exc
    path = parts.path or "/"
    query = parts.query
    channels = parse_qs(query).get("channel", [])
    channel = channels[0] if channels else ""
    if kind in (SessionKind.LONGPOLL, SessionKind.SSE) and not channel:
        raise ValueError(f"--url {url!r}: session {kind.value} needs ?channel=NAME")
    hostport = f"{host}:{port}"
    accept = b""
    if kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC):
        key = base64.b64encode(os.urandom(16)).decode()
        accept = accept_key(key).encode()
        target = path + ("?" + query if query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    elif kind is SessionKind.SSE:
        request = (
            f"GET {path}?{query} HTTP/1.1\r\nHost: {hostport}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n"
        ).encode()
    else:
        q = urlencode({"channel": channel, "timeout": lp_timeout_s})
        request = f"GET {path}?{q} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode()
    family, ip = resolve(host, port, url)
    return Target(kind, host, port, path, query, channel, request, accept, family, url, ip)


def resolve(host: str, port: int, url: str) -> tuple[int, str]:
    """The address family and IP of ``host``, looked up once (not by every connect() of the
    load loop); ValueError naming the URL and the fix when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(
            f"--url {url!r}: cannot resolve host {host!r} ({exc}); give its IP address, or "
            "fix the name (DNS, /etc/hosts)"
        ) from exc
    # IPv4 first, as connect() would try it
    family, _, _, _, sockaddr = min(infos, key=lambda i: i[0] != socket.AF_INET)
    return int(family), str(sockaddr[0])


# where lab serve answers each session kind, for the hint of a 404
_ENDPOINTS = {
    SessionKind.WEBSOCKET: "a WebSocket endpoint (lab serve: /ws)",
    SessionKind.GENERIC: "a WebSocket endpoint (lab serve: /ws)",
    SessionKind.LONGPOLL: "a long-poll endpoint (lab serve: /lp)",
    SessionKind.SSE: "an SSE endpoint (lab serve: /sse)",
}


def describe_http_failure(kind: SessionKind, status: int, url: str) -> str:
    """One line on an HTTP answer that failed a session (``status`` 0: not HTTP at all), with
    the likely cause and fix, e.g. ``HTTP 404 from ws://…/x: not a WebSocket endpoint (…)``."""
    websocket = kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC)
    if status == 0:
        return f"no HTTP answer from {url}: is an HTTP server listening on that port?"
    if websocket and status == 101:
        hint = "the upgrade's Sec-WebSocket-Accept is missing or wrong: not a WebSocket server"
    elif status == 404 or (websocket and status < 300) or status == 405:
        hint = f"not {_ENDPOINTS[kind]}"
    elif 300 <= status < 400:
        hint = "a redirect: give the URL it points to"
    elif status in (401, 403):
        hint = "the server wants credentials, which the agent does not send"
    elif status == 400:
        hint = "the server refused the request: check the URL's path and query (?channel=NAME)"
    elif status in (429, 503):
        hint = "the server is shedding load: see its log, or lower --rate"
    elif status >= 500:
        hint = "the server failed: see its log"
    else:
        hint = "the server refused the request: see its log"
    return f"HTTP {status} from {url}: {hint}"
