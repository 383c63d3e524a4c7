"""An upgraded WebSocket connection of a worker: ``WsConn`` (a subscriber: four slots when
idle) and ``WsReader`` (websockets' sans-I/O frame parser, created only while the client is
sending and dropped again when it goes quiet)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from lab.comet.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_UNSUPPORTED_DATA,
    BadFrame,
    Outgoing,
    parse_command,
    ws_close_frame,
    ws_text_frame,
)

if TYPE_CHECKING:
    from lab.comet.worker import Worker

# Seconds a closing WebSocket gets to answer our close frame before the TCP connection is cut.
CLOSE_TIMEOUT_S = 5.0
GOING_AWAY_FRAME = ws_close_frame(CLOSE_GOING_AWAY, "server shutting down")
_EMPTY: tuple[str, ...] = ()


class WsReader:
    """Frame parsing state of a WebSocket that is sending: websockets' sans-I/O protocol plus
    the fragments of a message in progress. Dropped again when the connection goes quiet."""

    __slots__ = ("opcode", "parts", "proto", "timer")

    def __init__(self, max_message_bytes: int) -> None:
        self.proto = Protocol(Side.SERVER, state=State.OPEN, max_size=max_message_bytes)
        self.parts: list[bytes] = []
        self.opcode = Opcode.TEXT
        self.timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        proto = self.proto
        return (
            proto.state is State.OPEN
            and proto.current_size is None
            and not proto.reader.buffer
            and not self.parts
        )


class WsConn(asyncio.Protocol):
    """An upgraded WebSocket subscriber. Idle, it holds only these four slots."""

    __slots__ = ("channels", "reader", "transport", "worker")

    def __init__(self, worker: Worker, transport: asyncio.Transport, channels: tuple[str, ...]):
        self.worker = worker
        self.transport: asyncio.Transport | None = transport
        self.channels = channels
        self.reader: WsReader | None = None

    def deliver(self, out: Outgoing) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(out.ws_frame)

    def pause_writing(self) -> None:
        """The client reads slower than messages come: cut it rather than buffer without end."""
        transport = self.transport
        if transport is not None:
            self.worker.errors += 1
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        if self in worker.conns:
            worker.conns.discard(self)
            worker.closes += 1
        hub = worker.hub
        for channel in self.channels:
            hub.unsubscribe(self, channel)
        self.channels = _EMPTY
        reader = self.reader
        if reader is not None and reader.timer is not None:
            reader.timer.cancel()
        self.reader = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        transport = self.transport
        if transport is None:
            return
        if reader is None:
            if self.worker.stopping:
                # We already sent the going-away close frame: this is the client's answer.
                transport.close()
                return
            reader = self.reader = WsReader(self.worker.max_message_bytes)
        proto = reader.proto
        proto.receive_data(data)
        for frame in cast(list[Frame], proto.events_received()):
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self._message(opcode, bytes(frame.data))
                else:
                    reader.opcode = opcode
                    reader.parts = [bytes(frame.data)]
            elif opcode is Opcode.CONT:
                reader.parts.append(bytes(frame.data))
                if frame.fin:
                    parts, reader.parts = reader.parts, []
                    self._message(reader.opcode, b"".join(parts))
            if self.transport is None or proto.state is not State.OPEN:
                break
        self._flush(reader)
        if self.reader is not None and reader.idle():
            self.reader = None

    def _message(self, opcode: Opcode, payload: bytes) -> None:
        worker = self.worker
        worker.messages += 1
        try:
            if opcode is Opcode.BINARY:
                raise BadFrame(
                    CLOSE_UNSUPPORTED_DATA, "binary frames are not supported; send JSON text"
                )
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise BadFrame(1007, "text frame is not UTF-8: send UTF-8 JSON text") from None
            command = parse_command(text)
        except BadFrame as exc:
            worker.errors += 1
            self.close(exc.code, exc.reason)
            return
        channel = worker.intern_channel(command.channel)
        if command.action.value == "subscribe":
            if channel not in self.channels:
                self.channels = worker.channel_tuple((*self.channels, channel))
                worker.hub.subscribe(self, channel)
        elif channel in self.channels:
            self.channels = worker.channel_tuple(tuple(c for c in self.channels if c != channel))
            worker.hub.unsubscribe(self, channel)
        if self.transport is not None:
            self.transport.write(ws_text_frame(command.reply()))

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``; cut the TCP connection if the client
        does not answer within CLOSE_TIMEOUT_S."""
        transport = self.transport
        if transport is None:
            return
        reader = self.reader
        if reader is None:
            if code == CLOSE_GOING_AWAY:
                transport.write(GOING_AWAY_FRAME)
                return
            reader = self.reader = WsReader(self.worker.max_message_bytes)
        if reader.proto.state is State.OPEN:
            reader.proto.send_close(code, reason)
            self._flush(reader)

    def _flush(self, reader: WsReader) -> None:
        transport = self.transport
        if transport is None:
            return
        proto = reader.proto
        for out in proto.data_to_send():
            if out:
                transport.write(out)
            else:
                transport.close()
                return
        if proto.close_expected() and reader.timer is None:
            reader.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)
