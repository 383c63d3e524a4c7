"""Client sessions: one tiny asyncio protocol object per connection, per session kind.

What it is for: the load process (``lab.agent.proc``) opens a socket and hands it to one of
these protocols, which drives the session and updates the process's shared ``Counters``,
histograms and record columns. Per-connection state is a handful of ``__slots__``; parsers
live only while needed (the HTTP parser until the upgrade; the frame reader while a frame is
incomplete), so an idle held WebSocket costs a protocol, a transport and a socket.

Kinds (``SessionKind``):
- ``websocket``: HTTP upgrade (a request built once per destination; a whole 101 response
  with the right ``Sec-WebSocket-Accept`` in one read is checked with a few byte searches, any
  other response is parsed with ``httptools``), optional subscribe frames, then idle
  or receive; messages are comet envelopes ``{"channel", "id", "data"}``: per-channel ids give
  lost / duplicated / reordered counts, ``data`` = ``{"ts": unix_s, "seq": n}`` gives the
  delivery latency. Frames are parsed with ``websockets.frames.Frame.parse``.
- ``generic``: any WebSocket URL: upgrade and hold; frames counted, pings answered.
- ``longpoll``: HTTP/1.1 keep-alive loop of ``GET /lp?channel=..&since=..``; connected = TCP up
  (a connection whose first poll is refused, e.g. 404, is then a failure, reason http).
- ``sse``: ``GET /sse``; connected = response headers (200) received; events parsed here
  (``id:`` / ``data:`` lines, the trivial text/event-stream format), body via ``httptools``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import time
from typing import Any

import httptools
import orjson
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from lab.agent.records import Outcome, Records
from lab.agent.target import SessionKind, Target, make_target
from lab.histogram import Histogram

OP_CONT, OP_TEXT, OP_BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
OP_CLOSE, OP_PING, OP_PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG

MAX_FRAME_BYTES = 16 * 1024 * 1024
WINDOW = 64  # ids remembered per channel for duplicate / reorder detection
WINDOW_MASK = (1 << WINDOW) - 1
OK = int(Outcome.OK)
PENDING = int(Outcome.PENDING)
NAN = math.nan
_TS_PREFIX = '{"ts":'
_loads = orjson.loads  # bytes in, about 2.5x json.loads on an envelope; ValueError when invalid


class State(enum.IntEnum):
    CONNECTING = 0
    HANDSHAKE = 1
    OPEN = 2
    CLOSING = 3
    DONE = 4


class Counters:
    """Cumulative counters of one load process (the JSON line's fields)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "connected",
        "dropped",
        "dup",
        "failed",
        "lag_max_s",
        "lost",
        "msgs_in",
        "msgs_out",
        "open",
        "reordered",
        "started",
        "untimed",
    )

    def __init__(self) -> None:
        self.started = self.connected = self.closed = self.open = self.dropped = 0
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self.lost = self.dup = self.reordered = self.untimed = 0
        self.failed = [0] * 7  # Outcome.REFUSED .. Outcome.OTHER
        self.lag_max_s = 0.0


class Shared:
    """What every connection of a process shares: counters, histograms, records, settings."""

    __slots__ = (
        "clock",
        "close_frame",
        "connect_hist",
        "conns",
        "counters",
        "delivery_hist",
        "expected",
        "http_error",
        "pending",
        "read_hist",
        "records",
        "rx_held",
        "rx_split",
        "rx_time",
        "subscribe_frames",
        "upgrades",
    )

    def __init__(self, records: Records, subscribe: tuple[str, ...] = ()) -> None:
        self.records = records
        self.clock = time.time  # unix seconds for the records; the process maps its monotonic clock
        self.counters = Counters()
        self.connect_hist = Histogram("us")
        self.delivery_hist = Histogram("us")  # from the send time to the arrival here
        self.read_hist = Histogram("us")  # from the send time to when this process read it
        # the kernel's receive time (unix s) of the data being handled, when the process reads
        # with SO_TIMESTAMPNS; 0.0 otherwise (then arrival = read time). It is the time of the
        # read's LAST segment: where the server writes messages apart (WebSocket frames, SSE
        # events: ``rx_split``), only a message whose last byte ends the read has it; one
        # followed by anything (another message, part of one, a ping) arrived earlier by an
        # unknown amount, and is counted ``untimed`` rather than given that later time.
        # ``rx_held``: the send time of the read's latest message so far, recorded by
        # ``read_done()`` unless ``rx_later()`` or another message came after it. A long-poll
        # answer is one write: all its messages arrived together (``rx_split`` False).
        self.rx_time = 0.0
        self.rx_split = True
        self.rx_held = 0.0
        self.conns: list[Client | None] = [None] * records.n
        self.pending: dict[int, Any] = {}  # index -> client still connecting or handshaking
        # last id published per channel, once the publisher is done: a connection that closes
        # without having seen it counts the missing tail as lost
        self.expected: dict[str, int] = {}
        # per Sec-WebSocket-Accept value, the last whole 101 response checked for it
        self.upgrades: dict[bytes, bytes] = {}
        # the first HTTP answer that failed a session (status, 0 when not HTTP) and where: the
        # process reports it once, so that the user reads which status came from which URL
        self.http_error: tuple[int, Target] | None = None
        self.close_frame = Frame(OP_CLOSE, Close(1000, "").serialize()).serialize(mask=True)
        self.subscribe_frames = b"".join(
            Frame(OP_TEXT, json.dumps({"subscribe": ch}).encode()).serialize(mask=True)
            for ch in subscribe
        )

    def fail(self, i: int, outcome: Outcome) -> None:
        """Connection ``i`` failed to connect (or was dropped before its planned close)."""
        rec = self.records
        if rec.outcome[i] == Outcome.OK:  # dropped after connecting
            self.counters.dropped += 1
            self.counters.open -= 1
            self.counters.closed += 1
            rec.closed[i] = self.clock()
        elif Outcome.REFUSED <= outcome <= Outcome.OTHER:
            self.counters.failed[outcome - Outcome.REFUSED] += 1
        rec.outcome[i] = outcome
        self.pending.pop(i, None)
        self.conns[i] = None

    def http_failed(self, status: int, tgt: Target) -> None:
        """A session failed on an HTTP answer with ``status`` (0: the answer was not HTTP)."""
        if self.http_error is None:
            self.http_error = (status, tgt)

    def not_connected(self, i: int) -> None:
        """Undo ``connected(i)``: the connection turned out never to have worked (a long-poll
        whose first poll was refused). Its connect_hist sample stays: a histogram cannot give
        one back, and it did time a TCP handshake."""
        rec = self.records
        rec.connected[i] = NAN
        rec.outcome[i] = PENDING
        c = self.counters
        c.connected -= 1
        c.open -= 1

    def connected(self, i: int) -> None:
        """Connection ``i`` is up (for a WebSocket: the 101 was read), at the kernel's receive
        time of that read when known."""
        now = self.rx_time or self.clock()
        rec = self.records
        rec.connected[i] = now
        rec.outcome[i] = OK  # a plain int: stored faster than the enum
        c = self.counters
        c.connected += 1
        c.open += 1
        self.connect_hist.record((now - rec.scheduled[i]) * 1e6)
        self.pending.pop(i, None)

    def track(self, chs: dict[str, list[int]], channel: str, mid: int, data: Any) -> None:
        """Count one delivered message: order per channel, and delivery latency from ``ts``."""
        c = self.counters
        st = chs.get(channel)
        if st is None:
            chs[channel] = [mid, 1]
        else:
            last, mask = st
            if mid > last:
                c.lost += mid - last - 1
                st[0] = mid
                st[1] = ((mask << (mid - last)) | 1) & WINDOW_MASK
            elif last - mid < WINDOW:
                bit = 1 << (last - mid)
                if mask & bit:
                    c.dup += 1
                else:
                    st[1] = mask | bit
                    c.reordered += 1
                    c.lost -= 1  # counted as lost when the gap opened
            else:
                c.reordered += 1
        ts = send_time(data)
        if ts is not None:
            self.latency(ts)

    def latency(self, ts: float) -> None:
        """Record a message sent at ``ts`` (unix s): read latency, and arrival (the kernel's
        receive time when known: see ``rx_time``; else the read time)."""
        now = time.time()
        self.read_hist.record((now - ts) * 1e6)
        rx = self.rx_time
        if not rx:
            self.delivery_hist.record((now - ts) * 1e6)
        elif self.rx_split:
            self.rx_later()  # an earlier message of this read, if any: this one follows it
            self.rx_held = ts
        else:
            self.delivery_hist.record((rx - ts) * 1e6)

    def rx_later(self) -> None:
        """More bytes of this read came after the message held (part of a frame, a ping, an
        SSE comment...): the read's time is theirs, not the message's, which stays untimed."""
        if self.rx_held:
            self.counters.untimed += 1
            self.rx_held = 0.0

    def read_done(self) -> None:
        """The read timed ``rx_time`` is handled: its last message gets that arrival."""
        held = self.rx_held
        if held:
            self.delivery_hist.record((self.rx_time - held) * 1e6)
            self.rx_held = 0.0
        self.rx_time = 0.0


def send_time(data: Any) -> float | None:
    """The ``ts`` (unix seconds) of a published body ``{"ts": ..., ...}``, else None. The
    publisher's own bodies start ``{"ts":<number>,``: read without a JSON parse; other JSON
    objects are parsed."""
    if type(data) is not str or data[:1] != "{":
        return None
    if data.startswith(_TS_PREFIX):
        end = data.find(",", 6)
        try:
            return float(data[6:end]) if end > 6 else None
        except ValueError:
            pass
    try:
        ts = _loads(data).get("ts")
    except (ValueError, AttributeError):
        return None
    return ts if isinstance(ts, int | float) and not isinstance(ts, bool) else None


def classify(exc: BaseException) -> Outcome:
    """The outcome that an exception raised while connecting stands for."""
    import errno

    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Outcome.RESET
    if isinstance(exc, OSError):
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            return Outcome.NO_PORT
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return Outcome.NO_FILES
        if exc.errno == errno.ETIMEDOUT:
            return Outcome.TIMEOUT
        if exc.errno == errno.ECONNREFUSED:
            return Outcome.REFUSED
    return Outcome.OTHER


class Client(asyncio.Protocol):
    """Base of the session protocols: transport, index, state, lazily-made parser state."""

    __slots__ = ("aux", "chs", "i", "sh", "st", "tgt", "tr")

    def __init__(self, sh: Shared, i: int, tgt: Target) -> None:
        self.sh = sh
        self.i = i
        self.tgt = tgt
        self.st = State.CONNECTING
        self.tr: Any = None
        self.aux: Any = None
        self.chs: dict[str, list[int]] | None = None

    def __call__(self) -> Client:
        """The protocol factory of ``create_connection`` is the protocol itself (no lambda)."""
        return self

    def fail(self, outcome: Outcome) -> None:
        if self.st >= State.CLOSING:
            return
        self.st = State.DONE
        self.sh.fail(self.i, outcome)
        self.aux = None
        if self.tr is not None:
            self.tr.abort()

    def close(self, unconnected: Outcome = Outcome.TIMEOUT) -> None:
        """Planned close (schedule or shutdown): the server is asked to close first. A
        connection still handshaking ends with outcome ``unconnected``."""
        if self.st >= State.CLOSING:
            return
        if self.st < State.OPEN:
            self.fail(unconnected)
            return
        self.st = State.CLOSING
        sh = self.sh
        if self.chs and sh.expected:
            for ch, st in self.chs.items():
                last = sh.expected.get(ch)
                if last is not None and last > st[0]:
                    sh.counters.lost += last - st[0]
        sh.records.closed[self.i] = sh.clock()
        sh.counters.closed += 1
        sh.counters.open -= 1
        self._send_close()

    def _send_close(self) -> None:
        self.tr.close()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.st < State.CLOSING:
            # before the upgrade: why the connect failed (refused, ...); after: a drop
            self.fail(classify(exc) if exc is not None and self.st < State.OPEN else Outcome.RESET)
        self.st = State.DONE
        self.sh.conns[self.i] = None
        self.sh.pending.pop(self.i, None)
        self.tr = None
        self.aux = None

    # httptools callbacks (while handshaking)
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-accept" and value == self.tgt.accept:
            self.chs = {}  # marks a correct accept key until the upgrade completes


def _upgrade_end(data: bytes, accept: bytes) -> int:
    """Where the frames start if ``data`` holds a whole ``101`` response carrying the expected
    ``Sec-WebSocket-Accept``; else 0 (then httptools parses the response: any other status, a
    response split over reads, a wrong key). The common case costs no parser and no callbacks."""
    if data[:13] != b"HTTP/1.1 101 ":
        return 0
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return 0
    pos = data.find(accept, 0, end)
    if pos < 0 or data[pos + len(accept) : pos + len(accept) + 2] != b"\r\n":
        return 0
    line = data.rfind(b"\r\n", 0, pos)
    if line < 0 or data[line + 2 : pos].rstrip().lower() != b"sec-websocket-accept:":
        return 0
    return end + 4


class WebSocketClient(Client):
    """``websocket`` (envelopes tracked) and ``generic`` (frames only) sessions."""

    __slots__ = ()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        self.st = State.HANDSHAKE
        self.sh.pending[self.i] = self
        transport.write(self.tgt.request)
        self.sh.counters.bytes_out += len(self.tgt.request)

    def data_received(self, data: bytes) -> None:
        self.sh.counters.bytes_in += len(data)
        if self.st == State.HANDSHAKE:
            if self.aux is None:  # the first bytes of the response
                # a server answers every upgrade with the same bytes: a response equal to one
                # already checked for this key needs no other check
                accept = self.tgt.accept
                upgrades = self.sh.upgrades
                if data == upgrades.get(accept):
                    end = len(data)
                else:
                    end = _upgrade_end(data, accept)
                    if end == len(data):
                        upgrades[accept] = data
                if end:
                    self.chs = {}  # the accept key matched
                    self._upgraded(data[end:])
                    return
                self.aux = httptools.HttpResponseParser(self)
            try:
                self.aux.feed_data(data)
            except httptools.HttpParserUpgrade as up:
                self._upgraded(data[up.args[0] :])
                return
            except httptools.HttpParserError:
                self.sh.http_failed(0, self.tgt)  # unless on_headers_complete named the status
                self.fail(Outcome.HTTP)
            return
        if self.st >= State.DONE:
            return
        self._frames(data)

    def on_headers_complete(self) -> None:
        status = self.aux.get_status_code()
        if status != 101:
            self.sh.http_failed(status, self.tgt)
            raise ValueError("not an upgrade")  # surfaces as HttpParserError: an HTTP failure

    def _upgraded(self, rest: bytes) -> None:
        if self.chs is None or (self.aux is not None and self.aux.get_status_code() != 101):
            # a 101 without the right Sec-WebSocket-Accept
            self.sh.http_failed(self.aux.get_status_code() if self.aux else 101, self.tgt)
            self.fail(Outcome.HTTP)
            return
        self.aux = None
        self.chs = None
        self.st = State.OPEN
        sh = self.sh
        sh.connected(self.i)
        if sh.subscribe_frames:
            self.tr.write(sh.subscribe_frames)
            sh.counters.bytes_out += len(sh.subscribe_frames)
        if rest:
            self._frames(rest)

    def _send_close(self) -> None:
        self.tr.write(self.sh.close_frame)

    def _frames(self, data: bytes) -> None:
        aux = self.aux
        if aux is None:
            # Fast path for what a push server sends: whole final text frames, unmasked, with a
            # 7- or 16-bit length, one or several per read. Anything else (a partial frame,
            # other opcodes, fragments, a mask) goes to websockets' parser from that frame on.
            size = len(data)
            pos = 0
            while size - pos >= 2 and data[pos] == 0x81:
                n = data[pos + 1]
                if n < 126:
                    start = pos + 2
                elif n == 126 and size - pos >= 4:
                    n = (data[pos + 2] << 8) | data[pos + 3]
                    start = pos + 4
                else:
                    break
                end = start + n
                if end > size:
                    break
                if self.tgt.kind is SessionKind.WEBSOCKET:
                    self._message(data[start:end])
                    if end < size:  # bytes follow it in this read
                        self.sh.rx_later()
                else:
                    self.sh.counters.msgs_in += 1
                if self.st >= State.DONE:
                    return
                pos = end
            if pos == size:
                return
            if pos:
                data = data[pos:]
            aux = self.aux
        if aux is None:
            reader = StreamReader()
            aux = self.aux = [
                reader,
                Frame.parse(reader.read_exact, mask=False, max_size=MAX_FRAME_BYTES),
                None,
            ]
        reader, gen = aux[0], aux[1]
        reader.feed_data(data)
        while True:
            try:
                next(gen)
                return  # the frame is incomplete: keep the reader
            except StopIteration as done:
                frame = done.value
            except Exception:
                self.fail(Outcome.OTHER)
                return
            if not reader.buffer and aux[2] is None:
                self.aux = None
                self._frame(frame)
                return
            gen = aux[1] = Frame.parse(reader.read_exact, mask=False, max_size=MAX_FRAME_BYTES)
            self._frame(frame)
            if reader.buffer or aux[2] is not None:  # bytes of this read follow
                self.sh.rx_later()
            if self.aux is None or self.st == State.DONE:
                return

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is OP_TEXT or op is OP_BINARY or op is OP_CONT:
            data = frame.data
            if not frame.fin or op is OP_CONT:
                aux = self.aux
                if aux is None:  # keep the partial message beside an (empty) reader
                    reader = StreamReader()
                    aux = self.aux = [
                        reader,
                        Frame.parse(reader.read_exact, mask=False, max_size=MAX_FRAME_BYTES),
                        None,
                    ]
                aux[2] = data if aux[2] is None else aux[2] + data
                if not frame.fin:
                    return
                data, aux[2] = aux[2], None
            if self.tgt.kind is SessionKind.WEBSOCKET:
                self._message(data)  # counts envelopes only, not command replies
            else:
                self.sh.counters.msgs_in += 1
        elif op is OP_PING:
            pong = Frame(OP_PONG, frame.data).serialize(mask=True)
            self.tr.write(pong)
        elif op is OP_CLOSE:
            if self.st == State.CLOSING:
                self.tr.close()
                return
            # the server closed first: answer, count the drop
            self.tr.write(self.sh.close_frame)
            self.fail(Outcome.RESET)

    def _message(self, data: bytes | bytearray | memoryview) -> None:
        """One envelope: counted, its id checked against the channel's last, its delivery
        latency recorded. The next id in order (the common case) is handled inline; anything
        else goes through ``Shared.track``."""
        try:
            env = _loads(data)
        except ValueError:
            return
        if type(env) is not dict:
            return
        mid = env.get("id")
        channel = env.get("channel")
        if type(mid) is not int or channel is None:
            return
        sh = self.sh
        sh.counters.msgs_in += 1
        chs = self.chs
        if chs is None:
            chs = self.chs = {}
        if type(channel) is not str:
            channel = str(channel)
        st = chs.get(channel)
        if st is None or mid != st[0] + 1:
            sh.track(chs, channel, mid, env.get("data"))
            return
        st[0] = mid
        st[1] = ((st[1] << 1) | 1) & WINDOW_MASK
        sent = send_time(env.get("data"))
        if sent is not None:
            sh.latency(sent)


class _HttpClient(Client):
    """A client whose every byte goes through an httptools parser kept in ``aux[0]``."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.sh.counters.bytes_in += len(data)
        if self.aux is None:
            return
        try:
            self.aux[0].feed_data(data)
        except httptools.HttpParserError:
            self.sh.http_failed(0, self.tgt)
            self.fail(Outcome.HTTP)


class LongPollClient(_HttpClient):
    """``longpoll``: a keep-alive loop of GET /lp?channel=&since=&timeout= on one connection.
    ``aux`` is ``[parser, body, since, first poll unanswered]`` while the connection lives."""

    __slots__ = ()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        self.st = State.OPEN
        self.sh.connected(self.i)
        self.aux = [httptools.HttpResponseParser(self), bytearray(), None, True]
        self._poll()

    def fail(self, outcome: Outcome) -> None:
        aux = self.aux
        if outcome is Outcome.HTTP and aux is not None and aux[3] and self.st == State.OPEN:
            # Refused on its first poll (404, garbage): the session never worked. Counted as
            # connected when TCP came up (what "connected" means for long-poll, so that a poll
            # waiting 25 s for a message is open meanwhile), it becomes a failure (reason http)
            # as a refused WebSocket upgrade or SSE request is, not a drop: connected + failed
            # + pending stays the connections started, and the record (outcome http, no
            # connected time) says the same as the counters. A second's line may have shown it
            # connected: the answer usually comes in the same millisecond.
            self.sh.not_connected(self.i)
        super().fail(outcome)

    def _poll(self) -> None:
        since = self.aux[2]
        req = self.tgt.request
        if since is not None:
            req = req.replace(b"&timeout=", b"&since=%d&timeout=" % since, 1)
        self.tr.write(req)
        self.sh.counters.bytes_out += len(req)

    def on_body(self, body: bytes) -> None:
        self.aux[1] += body

    def on_message_complete(self) -> None:
        aux = self.aux
        status = aux[0].get_status_code()
        body, aux[1] = aux[1], bytearray()
        if status == 200:
            try:
                envs = json.loads(body)
            except ValueError:
                envs = []
            for env in envs if isinstance(envs, list) else [envs]:
                if isinstance(env, dict) and isinstance(env.get("id"), int):
                    self.sh.counters.msgs_in += 1
                    if self.chs is None:
                        self.chs = {}
                    ch = str(env.get("channel", self.tgt.channel))
                    self.sh.track(self.chs, ch, env["id"], env.get("data"))
                    if ch == self.tgt.channel:
                        aux[2] = max(aux[2] or 0, env["id"])
        elif status != 204:
            self.sh.http_failed(status, self.tgt)
            self.fail(Outcome.HTTP)
            return
        aux[3] = False  # answered: the session works
        if self.st == State.OPEN:
            self._poll()


class SSEClient(_HttpClient):
    """``sse``: GET /sse, then text/event-stream events. ``aux`` is
    ``[parser, line buffer, event id, data lines]`` while the connection lives."""

    __slots__ = ()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        self.st = State.HANDSHAKE
        self.sh.pending[self.i] = self
        self.aux = [httptools.HttpResponseParser(self), b"", None, []]
        transport.write(self.tgt.request)
        self.sh.counters.bytes_out += len(self.tgt.request)

    def on_headers_complete(self) -> None:
        status = self.aux[0].get_status_code()
        if status != 200:
            self.sh.http_failed(status, self.tgt)
            self.fail(Outcome.HTTP)
            return
        self.st = State.OPEN
        self.sh.connected(self.i)

    def on_message_complete(self) -> None:
        if self.st == State.OPEN:  # the server ended the stream
            self.fail(Outcome.RESET)

    def on_body(self, body: bytes) -> None:
        aux = self.aux
        if aux is None or self.st != State.OPEN:
            return
        buf = aux[1] + body
        # lines end with \r\n, \n or \r; a trailing \r may be the first half of \r\n
        start = 0
        n = len(buf)
        while start < n:
            jn = buf.find(b"\n", start)
            jr = buf.find(b"\r", start)
            j = jn if jr < 0 or (0 <= jn < jr) else jr
            if j < 0 or (j == jr and j + 1 == n):
                break
            line = buf[start:j]
            start = j + 2 if j == jr and buf[j + 1 : j + 2] == b"\n" else j + 1
            self._line(line)
        aux[1] = buf[start:]
        if start < n:  # part of a line after an event of this read
            self.sh.rx_later()

    def _line(self, line: bytes) -> None:
        aux = self.aux
        if line:  # bytes after an event of this read (the next event's, a comment)
            self.sh.rx_later()
        else:
            data = aux[3]
            if data:
                self._event(aux[2], b"\n".join(data))
            aux[3] = []
            return
        if line[:1] == b":":
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            aux[3].append(value)
        elif name == b"id":
            aux[2] = value
        # "event" and "retry" are not used by the comet server

    def _event(self, event_id: bytes | None, data: bytes) -> None:
        self.sh.counters.msgs_in += 1
        channel, mid, payload = self.tgt.channel, None, None
        try:
            env = json.loads(data)
        except ValueError:
            env = None
        if isinstance(env, dict) and "id" in env and "channel" in env:
            channel, mid, payload = str(env["channel"]), env["id"], env.get("data")
        else:
            payload = data.decode(errors="replace")
            if event_id is not None and event_id.isdigit():
                mid = int(event_id)
        if isinstance(mid, int):
            if self.chs is None:
                self.chs = {}
            self.sh.track(self.chs, channel, mid, payload)


__all__ = ["CLIENTS", "Client", "SessionKind", "Shared", "State", "Target", "make_target"]

CLIENTS: dict[SessionKind, type[Client]] = {
    SessionKind.WEBSOCKET: WebSocketClient,
    SessionKind.GENERIC: WebSocketClient,
    SessionKind.LONGPOLL: LongPollClient,
    SessionKind.SSE: SSEClient,
}
