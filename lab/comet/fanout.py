"""A worker's broadcast loop in C (``fanout.c``): one message's frame sent to all of a
channel's WebSocket subscribers in one call.

Why: one broadcast to 64,000 subscribers is 64,000 ``send()``s, about 15 µs of kernel CPU
each on a loopback VM (where the receiver's TCP work runs inside the sender's call). The
Python loop around them (a method call, checks and ``os.write`` per subscriber) added ~9%
more (``perf`` of a c64k-broadcast run); here it is a few ns per subscriber.

How: for each channel, the list of descriptors to send to is built from its subscribers and
kept while nothing changes: no subscription anywhere in the worker (``Hub.version``) and no
socket of the worker's ``Poller`` that closed, started queueing bytes or emptied its queue
(``Poller.changes``). A descriptor is in the list only while its ``SockTransport`` is open and
has nothing queued, so a frame never overtakes queued bytes and a closed descriptor (whose
number the kernel may give to a new connection) is never sent to. Everything else (long-poll
and SSE subscribers, a WebSocket with bytes queued, one on an event-loop transport) is
returned to the caller, which serves it in Python as before; so is every socket that did not
take the whole frame (its rest is queued for EPOLLOUT, as ``SockTransport.write`` does) or
failed (closed, as a failed write is).

Building: as the agent's fast path (``lab.cbuild``). Without a compiler, or with
``LAB_COMET_FANOUT=0``, the worker's Python loop serves every broadcast.
"""

from __future__ import annotations

import ctypes
import errno
import os
from array import array
from pathlib import Path
from typing import Any

from lab import cbuild
from lab.comet.protocol import Hub
from lab.comet.websocket import WsConn
from lab.rawio import OPEN, Poller, SockTransport

SOURCE = Path(__file__).with_name("fanout.c")
ENV_SWITCH = "LAB_COMET_FANOUT"  # "0": the Python loop serves every broadcast
MIN_SUBSCRIBERS = 32  # fewer: the Python loop (no list kept)
MAX_CHANNELS = 16  # channels whose lists are kept at once
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def build() -> tuple[Path | None, str]:
    """The compiled library, built now if needed: ``(path, "")`` or ``(None, why)``."""
    return cbuild.build(SOURCE, ENV_SWITCH)


def load() -> tuple[ctypes.CDLL | None, str]:
    """The library a worker uses, if its supervisor built it (``build()``): ``(lib, "")`` or
    ``(None, why)``. Workers do not run the compiler themselves."""
    return cbuild.load(SOURCE, ENV_SWITCH, build_it=False, setup=_declare)


def _declare(lib: ctypes.CDLL) -> None:
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.fan_send.argtypes = [vp, i32, ctypes.c_char_p, i32, vp, vp]
    lib.fan_send.restype = i32


class _Entry:
    """A channel's kept list: the descriptors C sends to, and the subscribers it does not."""

    __slots__ = ("bad", "fds", "got", "key", "rest")

    def __init__(self, key: tuple[int, int], subscribers: list[Any]) -> None:
        self.key = key
        fds = array("i")
        rest: list[Any] = []
        for sub in subscribers:
            tr = sub.transport if type(sub) is WsConn else None
            if type(tr) is SockTransport and tr.state == OPEN and not tr.buf:
                fds.append(tr.fd)
            else:
                rest.append(sub)
        self.fds = fds
        self.rest = rest
        self.bad = array("i", bytes(4 * len(fds)))
        self.got = array("i", bytes(4 * len(fds)))


class FanOut:
    """A worker's C broadcast loop over the WebSockets of its ``poller`` (see the module doc).
    ``sent`` counts the sockets it served, for the tests and the benchmark."""

    def __init__(self, lib: ctypes.CDLL, hub: Hub[Any], poller: Poller) -> None:
        self.lib = lib
        self.hub = hub
        self.poller = poller
        self.lists: dict[str, _Entry] = {}
        self.sent = 0

    def send(self, channel: str, subscribers: list[Any], frame: bytes) -> list[Any]:
        """Send ``frame`` to the subscribers C can serve; return the others, for the caller's
        Python loop (all of them when there are fewer than ``MIN_SUBSCRIBERS``)."""
        if len(subscribers) < MIN_SUBSCRIBERS:
            return subscribers
        key = self._state()
        entry = self.lists.get(channel)
        if entry is None or entry.key != key:
            if len(self.lists) >= MAX_CHANNELS:
                self.lists.clear()
            entry = self.lists[channel] = _Entry(key, subscribers)
        fds, bad, got = entry.fds, entry.bad, entry.got
        n = len(fds)
        if n:
            addr = fds.buffer_info()[0]
            nbad = self.lib.fan_send(
                addr, n, frame, len(frame), bad.buffer_info()[0], got.buffer_info()[0]
            )
            self.sent += n - nbad
            transports = self.poller.fds
            for k in range(nbad):
                tr = transports[fds[bad[k]]]
                r = got[k]
                if r >= 0:
                    tr.sent_part(r, frame)
                elif -r in _RETRY:
                    tr.sent_part(0, frame)
                else:
                    tr.fail(OSError(-r, os.strerror(-r)))
        return entry.rest

    def forget_stale(self) -> None:
        """Drop the lists kept for a state that has changed (they hold references to
        subscribers that may be gone): once a second, from the worker's tick."""
        key = self._state()
        for channel in [c for c, e in self.lists.items() if e.key != key]:
            del self.lists[channel]

    def _state(self) -> tuple[int, int]:
        """What a kept list depends on: subscriptions, and sockets closed or queueing."""
        return (self.hub.version, self.poller.changes)
