"""The control link between the supervisor and a worker: length-prefixed JSON messages
over a Unix socket pair, sans-I/O (``encode`` and ``Decoder``).

Messages (``op`` field): worker → parent ``ready``, ``pub`` (a publish to sequence),
``stats``; parent → worker ``msg`` (a sequenced message, in order), ``snapshot`` (the
figures of all workers, for ``/stats`` and ``/healthz``), ``stop``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

_HEAD = struct.Struct("!I")
MAX_IPC_BYTES = 64 * 1024 * 1024


class IpcError(Exception):
    """The peer sent something that is not a control message: the link is broken."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEAD.pack(len(body)) + body


class Decoder:
    """Bytes in, complete control messages out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self._buffer
        buf += data
        out: list[dict[str, Any]] = []
        pos = 0
        size = len(buf)
        while size - pos >= 4:
            (length,) = _HEAD.unpack_from(buf, pos)
            if length > MAX_IPC_BYTES:
                raise IpcError(f"control message of {length} bytes")
            end = pos + 4 + length
            if end > size:
                break
            try:
                message = json.loads(bytes(buf[pos + 4 : end]))
            except ValueError as exc:
                raise IpcError(f"control message is not JSON: {exc}") from None
            if not isinstance(message, dict) or "op" not in message:
                raise IpcError("control message without op")
            out.append(message)
            pos = end
        if pos:
            del buf[:pos]
        return out
