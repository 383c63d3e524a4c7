"""The comet application protocol, sans-I/O: envelope, subscriptions, channel history,
long-poll catch-up, request targets and client commands.

Nothing here touches a socket, a clock or an event loop: the worker (``lab.comet.worker``)
feeds requests and messages in and writes the bytes that come out. WebSocket and HTTP wire
parsing come from ``websockets`` and ``httptools``; this module only decides what the comet
server answers. Wire formats (the contract with clients, e.g. ``lab.agent``):

- envelope: ``{"channel": "A", "id": 42, "data": "..."}`` (JSON, UTF-8), ``id`` per channel,
  increasing by one from 1;
- WebSocket: one text frame per envelope; client commands ``{"subscribe": "C"}`` and
  ``{"unsubscribe": "C"}`` are answered ``{"subscribed": "C"}`` / ``{"unsubscribed": "C"}``;
- long-poll ``GET /lp?channel=A&since=ID&timeout=S``: ``200`` with a JSON array of envelopes
  (oldest first) that the history holds after ``since``, else the next message as soon as it
  comes, else ``204`` after ``S`` seconds (default 25); without ``since`` it waits for the
  next message. Keep-alive works. Ids are per channel: with several channels, ``since`` is a
  JSON object ``{"A": 5, "B": 2}`` (a channel left out gets only what comes next), or ``0``
  (everything the history holds); a single number for several channels is refused (400);
- SSE ``GET /sse?channel=A``: ``id: <id>`` and ``data: <envelope JSON>`` per event; the
  ``Last-Event-ID`` header (or ``?lastEventId=`` / ``?since=``) replays what the history
  holds after it. A stream of several channels gives each event the id ``{"A": 5, "B": 2}``
  (the position on every channel of the stream), which a reconnecting EventSource sends back,
  so that a resume loses nothing the history holds on any channel;
- ``POST /pub/<channel>``: ``200 {"id": N}`` once the message is sequenced; every HTTP error
  is a JSON ``{"error": "..."}`` naming the problem and the fix;
- CORS: every answer allows any origin, and ``OPTIONS`` (a browser's preflight) answers 204.
"""

from __future__ import annotations

import enum
import functools
import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypedDict, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.frames import Close, Frame, Opcode

MAX_CHANNEL_CHARS = 200
MAX_CHANNELS_PER_REQUEST = 64
DEFAULT_LP_TIMEOUT_S = 25.0
MAX_LP_TIMEOUT_S = 3600.0

# Close codes for client frames the server does not accept (RFC 6455 §7.4.1).
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_GOING_AWAY = 1001


class EnvelopeDict(TypedDict):
    """A delivered message as clients receive it (JSON)."""

    channel: str
    id: int
    data: str


@dataclass(frozen=True, slots=True)
class Message:
    """One sequenced message of a channel; ``id`` increases by one per channel from 1."""

    channel: str
    id: int
    data: str

    def envelope(self) -> EnvelopeDict:
        return {"channel": self.channel, "id": self.id, "data": self.data}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Outgoing:
    """One message's encodings, each computed at most once per process however many
    subscribers receive it (a broadcast serializes once and writes the same bytes)."""

    __slots__ = ("_json", "_sse", "_ws", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._json: bytes | None = None
        self._ws: bytes | None = None
        self._sse: bytes | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = _dumps(self.message.envelope())
        return self._json

    @property
    def ws_frame(self) -> bytes:
        """The unmasked WebSocket text frame carrying the envelope."""
        if self._ws is None:
            self._ws = ws_text_frame(self.json)
        return self._ws

    @property
    def sse_event(self) -> bytes:
        if self._sse is None:
            self._sse = b"id: %d\ndata: %s\n\n" % (self.message.id, self.json)
        return self._sse


class SseCursor:
    """Where an SSE stream of several channels is on each of them: its events' ids are this
    position, a JSON object in ASCII (``{"A":5,"B":2}``), which a reconnecting EventSource
    sends back as Last-Event-ID. The channels' JSON keys are encoded once per stream."""

    __slots__ = ("ids", "keys")

    def __init__(self, start: dict[str, int]) -> None:
        self.ids = dict(start)
        self.keys = {channel: json.dumps(channel).encode() for channel in start}

    def event(self, out: Outgoing) -> bytes:
        """The event of message ``out``, whose id is the position once it is delivered."""
        message = out.message
        self.ids[message.channel] = message.id
        keys = self.keys
        position = b",".join(b"%s:%d" % (keys[ch], i) for ch, i in self.ids.items())
        return b"id: {%s}\ndata: %s\n\n" % (position, out.json)


def ws_text_frame(payload: bytes) -> bytes:
    """A server-to-client (unmasked) WebSocket text frame."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def ws_close_frame(code: int, reason: str) -> bytes:
    """A server-to-client WebSocket close frame."""
    return Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=False)


def ws_ping_frame() -> bytes:
    return Frame(Opcode.PING, b"").serialize(mask=False)


def lp_body(messages: Iterable[Message]) -> bytes:
    """Long-poll answer body: a JSON array of envelopes, oldest first."""
    return _dumps([m.envelope() for m in messages])


# ---------------------------------------------------------------- channels and history


def check_channel(name: str) -> str | None:
    """Return why ``name`` is not a valid channel name, or None when it is."""
    if not name:
        return "channel name is empty"
    if len(name) > MAX_CHANNEL_CHARS:
        return f"channel name longer than {MAX_CHANNEL_CHARS} characters"
    if not name.isprintable():
        return "channel name has non-printable characters"
    return None


class ChannelHistory:
    """The last ``limit`` messages of one channel and the last id it assigned."""

    __slots__ = ("last_id", "messages")

    def __init__(self, limit: int) -> None:
        self.messages: deque[Message] = deque(maxlen=max(0, limit))
        self.last_id = 0

    def append(self, message: Message) -> None:
        self.messages.append(message)
        self.last_id = max(self.last_id, message.id)

    def after(self, since: int) -> list[Message]:
        """Messages with an id greater than ``since`` that the history still holds."""
        if since >= self.last_id:
            return []
        return [m for m in self.messages if m.id > since]


class Sequencer:
    """The single place that assigns per-channel ids (the supervisor process): every worker
    receives every message in the order assigned here, so order holds across workers."""

    def __init__(self, history_limit: int) -> None:
        self.history_limit = history_limit
        self.channels: dict[str, ChannelHistory] = {}
        self.published = 0

    def sequence(self, channel: str, data: str) -> Message:
        history = self.channels.get(channel)
        if history is None:
            history = self.channels[channel] = ChannelHistory(self.history_limit)
        message = Message(channel, history.last_id + 1, data)
        history.append(message)
        self.published += 1
        return message

    def replay(self) -> Iterator[Message]:
        """Every message still held, channel by channel, for a (re)started worker."""
        for history in self.channels.values():
            yield from history.messages

    def last_ids(self) -> dict[str, int]:
        return {name: h.last_id for name, h in self.channels.items()}


S = TypeVar("S")


class Hub(Generic[S]):
    """A worker's view of the channels: who is subscribed to what, and each channel's
    history. Subscribers are opaque hashable objects (the worker's connections)."""

    def __init__(self, history_limit: int) -> None:
        self.history_limit = history_limit
        self.subscriptions: dict[str, set[S]] = {}
        self.histories: dict[str, ChannelHistory] = {}
        # counts subscribe and unsubscribe calls: what lists of subscribers kept elsewhere
        # depend on (lab.comet.fanout)
        self.version = 0

    def subscribe(self, subscriber: S, channel: str) -> None:
        self.version += 1
        subs = self.subscriptions.get(channel)
        if subs is None:
            subs = self.subscriptions[channel] = set()
        subs.add(subscriber)

    def unsubscribe(self, subscriber: S, channel: str) -> None:
        self.version += 1
        subs = self.subscriptions.get(channel)
        if subs is not None:
            subs.discard(subscriber)
            if not subs:
                del self.subscriptions[channel]

    def record(self, message: Message) -> list[S]:
        """Keep ``message`` in its channel's history; return the subscribers to deliver to
        (a copy: delivering may unsubscribe)."""
        history = self.histories.get(message.channel)
        if history is None:
            history = self.histories[message.channel] = ChannelHistory(self.history_limit)
        history.append(message)
        subs = self.subscriptions.get(message.channel)
        return list(subs) if subs else []

    def last_id(self, channel: str) -> int:
        history = self.histories.get(channel)
        return history.last_id if history is not None else 0

    def after(self, channel: str, since: int) -> list[Message]:
        history = self.histories.get(channel)
        return history.after(since) if history is not None else []

    def catch_up(self, target: Target) -> list[Message]:
        """Long-poll / SSE catch-up: on each of the target's channels, the messages after its
        position (``Target.since_of``; none where that is None: only what comes next)."""
        out: list[Message] = []
        for channel in target.channels:
            since = target.since_of(channel)
            if since is not None:
                out.extend(self.after(channel, since))
        return out


# ---------------------------------------------------------------- client commands


class Action(enum.Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True, slots=True)
class Command:
    """A client's WebSocket command."""

    action: Action
    channel: str

    def reply(self) -> bytes:
        key = "subscribed" if self.action is Action.SUBSCRIBE else "unsubscribed"
        return _dumps({key: self.channel})


# what a client may send on a WebSocket (close reasons name it; they fit 123 bytes)
_COMMANDS = '{"subscribe": "C"} or {"unsubscribe": "C"}'


class BadFrame(Exception):
    """A client frame the server does not accept: close the WebSocket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        # a close frame's reason holds at most 123 bytes of UTF-8 (RFC 6455 §5.5)
        self.reason = reason.encode()[:123].decode("utf-8", "ignore")


def parse_command(text: str) -> Command:
    """Parse a client text frame: ``{"subscribe": "C"}`` or ``{"unsubscribe": "C"}``."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise BadFrame(CLOSE_UNSUPPORTED_DATA, f"frame is not JSON: send {_COMMANDS}") from None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise BadFrame(CLOSE_POLICY_VIOLATION, 'expected {"subscribe": C} or {"unsubscribe": C}')
    ((key, channel),) = obj.items()
    try:
        action = Action(key)
    except ValueError:
        raise BadFrame(
            CLOSE_POLICY_VIOLATION, f"unknown command {key[:30]!r}: send {_COMMANDS}"
        ) from None
    if not isinstance(channel, str):
        raise BadFrame(CLOSE_POLICY_VIOLATION, 'channel must be a string: {"subscribe": "news"}')
    problem = check_channel(channel)
    if problem is not None:
        raise BadFrame(
            CLOSE_POLICY_VIOLATION, f"{problem}: give 1 to {MAX_CHANNEL_CHARS} printable characters"
        )
    return Command(action, channel)


# ---------------------------------------------------------------- HTTP request targets


class Route(enum.Enum):
    WS = "/ws"
    LP = "/lp"
    SSE = "/sse"
    PUB = "/pub/"
    STATS = "/stats"
    HEALTHZ = "/healthz"


class HttpError(Exception):
    """A request the server answers with an error ``status`` and a message naming the fix
    (``extra``: headers the status needs, e.g. ``Allow`` with a 405)."""

    def __init__(self, status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Target:
    """What a request asks for, validated."""

    route: Route
    channels: tuple[str, ...] = ()
    since: int | None = None
    timeout_s: float = DEFAULT_LP_TIMEOUT_S
    # per-channel positions (``since`` as a JSON object): (channel, id) pairs
    since_by: tuple[tuple[str, int], ...] | None = None

    def since_of(self, channel: str) -> int | None:
        """Where ``channel``'s catch-up starts: after this id (None: only what comes next)."""
        if self.since_by is None:
            return self.since
        for name, since in self.since_by:
            if name == channel:
                return since
        return None


# the methods each route answers (HEAD: the GET answer's head, without its body)
_METHODS = {
    Route.WS: ("GET",),
    Route.LP: ("GET",),
    Route.SSE: ("GET",),
    Route.PUB: ("POST",),
    Route.STATS: ("GET", "HEAD"),
    Route.HEALTHZ: ("GET", "HEAD"),
}


_CHANNEL_RULE = f"a channel name has 1 to {MAX_CHANNEL_CHARS} printable characters"


def _channels(query: dict[str, list[str]], *, required: bool) -> tuple[str, ...]:
    channels = tuple(dict.fromkeys(query.get("channel", [])))
    if required and not channels:
        raise HttpError(400, "missing ?channel=NAME (repeat it for several channels)")
    if len(channels) > MAX_CHANNELS_PER_REQUEST:
        raise HttpError(
            400,
            f"more than {MAX_CHANNELS_PER_REQUEST} channels in one request: split them over "
            "several requests",
        )
    for channel in channels:
        problem = check_channel(channel)
        if problem is not None:
            raise HttpError(400, f"{problem}: {channel[:40]!r}; {_CHANNEL_RULE}")
    return channels


def _since(
    value: str | None, channels: tuple[str, ...]
) -> tuple[int | None, tuple[tuple[str, int], ...] | None]:
    """``since`` / ``Last-Event-ID``: a message id, or per channel a JSON object of ids."""
    if value is None or value == "":
        return None, None
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in obj.items()
        ):
            raise HttpError(
                400,
                "since/Last-Event-ID as a JSON object must map channels to ids >= 0, "
                f'e.g. {{"A": 5, "B": 2}}; got {value[:60]!r}',
            )
        unknown = [k for k in obj if k not in channels]
        if unknown:
            raise HttpError(
                400,
                f"since/Last-Event-ID names {unknown[0][:40]!r}, which is not a ?channel= of this "
                "request: give ids only for the request's channels",
            )
        return None, tuple((ch, obj[ch]) for ch in channels if ch in obj)
    try:
        since = int(value)
    except ValueError:
        raise HttpError(
            400,
            f"since/Last-Event-ID must be a message id, or a JSON object of ids per channel; "
            f"got {value[:40]!r}",
        ) from None
    if since < 0:
        raise HttpError(400, "since/Last-Event-ID must be >= 0")
    if since > 0 and len(channels) > 1:
        raise HttpError(
            400,
            f"ids are per channel: with several channels give since as a JSON object of ids, "
            f'e.g. {{"{channels[0]}": {since}, "{channels[1]}": 0}} (URL-encoded), or 0 for all '
            "the history holds",
        )
    return since, None


@functools.lru_cache(maxsize=4096)
def parse_target(method: str, url: str, last_event_id: str | None = None) -> Target:
    """Validate a request line's method and target; raise ``HttpError`` (404, 405, 400).
    Cached: thousands of clients send the same few targets (``/ws?channel=room``)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "//[": an unclosed IPv6 authority
        raise HttpError(
            400, f"bad request target {url[:60]!r}: {exc}; send a path such as /lp?channel=A"
        ) from None
    path = parts.path
    try:
        query = parse_qs(parts.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(
            400, "the query string is not UTF-8 once %-decoded: %-encode UTF-8 text"
        ) from None
    except ValueError as exc:
        raise HttpError(
            400, f"bad query string: {exc}; send name=value pairs joined by '&'"
        ) from None
    if path.startswith("/pub/"):
        route = Route.PUB
    else:
        try:
            route = Route(path)
        except ValueError:
            raise HttpError(
                404, f"no such path {path[:60]!r}; try /ws, /lp, /sse, /pub/<channel>, /stats"
            ) from None
    methods = _METHODS[route]
    if method not in methods:
        allow = ", ".join(methods)
        raise HttpError(405, f"{route.value} takes {allow}, not {method}", (("Allow", allow),))
    if route is Route.PUB:
        try:
            channel = unquote(path[len("/pub/") :], errors="strict")
        except UnicodeDecodeError:
            raise HttpError(
                400, "the channel name is not UTF-8 once %-decoded: %-encode UTF-8 text"
            ) from None
        problem = check_channel(channel)
        if problem is not None:
            raise HttpError(400, f"{problem}; publish to /pub/<channel>: {_CHANNEL_RULE}")
        return Target(route, (channel,))
    if route is Route.WS:
        return Target(route, _channels(query, required=False))
    if route is Route.LP:
        timeout = query.get("timeout", [""])[-1]
        try:
            timeout_s = float(timeout) if timeout else DEFAULT_LP_TIMEOUT_S
        except ValueError:
            raise HttpError(400, f"timeout must be seconds, got {timeout[:40]!r}") from None
        if not 0 <= timeout_s <= MAX_LP_TIMEOUT_S:  # NaN fails it too
            raise HttpError(400, f"timeout must be between 0 and {MAX_LP_TIMEOUT_S:g} s")
        channels = _channels(query, required=True)
        since, since_by = _since(query.get("since", [""])[-1], channels)
        return Target(route, channels, since, timeout_s, since_by)
    if route is Route.SSE:
        channels = _channels(query, required=True)
        resume = last_event_id or query.get("lastEventId", [""])[-1] or query.get("since", [""])[-1]
        since, since_by = _since(resume, channels)
        return Target(route, channels, since, since_by=since_by)
    return Target(route)


REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def http_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    keep_alive: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
    head: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length body (``head``: the answer to a
    HEAD request, the same head without the body)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    if status != 204:
        lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    lines.append("Access-Control-Allow-Origin: *")
    lines.extend(f"{k}: {v}" for k, v in extra)
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw + body if status != 204 and not head else raw


def error_body(message: str) -> bytes:
    return _dumps({"error": message}) + b"\n"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\nX-Accel-Buffering: no\r\nAccess-Control-Allow-Origin: *\r\n\r\n"
)
