"""The load agent's C fast path for WebSocket sessions (``fastpath.c``): building it, loading
it, and the ``FastPath`` that a load process drives.

What it is for: a WebSocket connection's start and upgrade (socket, bind, connect, request,
the 101, its records, counters and connect-latency sample) cost the Python path ~40 µs of
user CPU at 2,500 new connections a second, around ~70 µs of kernel work; the C path does the
same work in a few µs of user CPU and holds an idle connection as a file descriptor with no
Python object. Everything that is not that common case (the first response from each
destination, any other response, messages, closes, timeouts) is handed to the Python session
objects (``lab.agent.session``), which carry on as if they had opened the connection.

Building: the C file ships with the package and is compiled with the host's C compiler at
first use (``lab.cbuild``: into ``~/.cache/comet-lab/c``, once per host and version). No
Python headers are needed: it is plain C loaded with ctypes. Without a compiler, or with
``LAB_AGENT_FASTPATH=0``, the agent uses its Python path, which measures the same things
with more CPU per connection.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from array import array
from pathlib import Path
from typing import Any

from lab import cbuild

SOURCE = Path(__file__).with_name("fastpath.c")
ENV_SWITCH = "LAB_AGENT_FASTPATH"  # "0": use the Python path
ST_CONNECTING, ST_HANDSHAKE, ST_HELD = 1, 2, 3
EV_ADOPT_HELD, EV_ADOPT_DATA, EV_FAIL = 1, 2, 3
MAX_EVENTS = 1024  # fastpath.c: events served per poll
HIST_PAIRS = 6000  # > the histogram's 5,376 buckets


class Out(ctypes.Structure):
    """fastpath.c ``out_t``: one event handed to Python."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("fd", ctypes.c_int32),
        ("i", ctypes.c_int32),
        ("arg", ctypes.c_int32),
        ("off", ctypes.c_int32),
        ("len", ctypes.c_int32),
        ("ts", ctypes.c_double),
    ]


class Counts(ctypes.Structure):
    """fastpath.c ``counts_t``: what the C path counted since it was last asked."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "started",
            "connected",
            "open",
            "bytes_in",
            "bytes_out",
            "launched",
            "lag_max_ns",
        )
    ]


def build() -> tuple[Path | None, str]:
    """The compiled library, built now if needed (``lab.cbuild``): ``(path, "")``, or
    ``(None, why)`` naming the problem and the fix."""
    return cbuild.build(SOURCE, ENV_SWITCH)


def load() -> tuple[ctypes.CDLL | None, str]:
    """The library, built and loaded once per process: ``(lib, "")`` or ``(None, why)``."""
    return cbuild.load(SOURCE, ENV_SWITCH, setup=_declare)


def _declare(lib: ctypes.CDLL) -> None:
    """The C functions' argument and result types."""
    vp, i32, dbl = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.fp_new.restype = vp
    lib.fp_new.argtypes = [i32, i32, i32, i32, i32, i32, vp, vp, vp, vp, i32, dbl, dbl]
    lib.fp_epoll_fd.argtypes = [vp]
    lib.fp_pair.argtypes = [vp, i32, i32, vp, i32, vp, i32, vp, i32, i32]
    lib.fp_pair.restype = None
    lib.fp_expect.argtypes = [vp, i32, vp, i32]
    lib.fp_expect.restype = None
    lib.fp_after.argtypes = [vp, vp, i32]
    lib.fp_after.restype = None
    lib.fp_set_clock.argtypes = [vp, dbl, dbl]
    lib.fp_set_clock.restype = None
    lib.fp_launch.argtypes = [vp, i32, i32]
    lib.fp_launch.restype = None
    lib.fp_run.argtypes = [vp, vp, i32, dbl]
    lib.fp_stop.argtypes = [vp]
    lib.fp_stop.restype = None
    lib.fp_fails.argtypes = [vp, vp, i32]
    lib.fp_poll.argtypes = [vp, vp, vp]
    lib.fp_release.argtypes = [vp, i32, vp]
    lib.fp_expired.argtypes = [vp, dbl, vp, i32]
    lib.fp_take_counts.argtypes = [vp, vp]
    lib.fp_take_counts.restype = None
    lib.fp_take_hist.argtypes = [vp, vp, i32]
    lib.fp_arena.argtypes = [vp]
    lib.fp_arena.restype = vp


def sockaddr(family: int, host: str, port: int) -> bytes:
    """A ``struct sockaddr_in`` / ``sockaddr_in6`` for a numeric address."""
    if family == socket.AF_INET6:
        return (
            socket.AF_INET6.to_bytes(2, "little")
            + port.to_bytes(2, "big")
            + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host)
            + bytes(4)
        )
    return (
        socket.AF_INET.to_bytes(2, "little")
        + port.to_bytes(2, "big")
        + socket.inet_pton(socket.AF_INET, host)
        + bytes(8)
    )


def _addr(buf: array) -> int:
    return buf.buffer_info()[0]


class FastPath:
    """One load process's C context. ``dests[p]`` = (source or None, target, address) of pair
    p; ``targets`` in the order ``dests`` refers to them (``target_index[p]``)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        records: Any,
        dests: list[tuple[str | None, Any, tuple[str, int]]],
        target_index: list[int],
        n_targets: int,
        *,
        timestamps: bool,
        maxfd: int,
        after: bytes = b"",
    ) -> None:
        self.lib = lib
        self.target_index = target_index
        self._keep: list[Any] = []  # bytes whose buffers C points into
        self.x = lib.fp_new(
            records.n,
            records.first,
            records.step,
            len(dests),
            n_targets,
            maxfd,
            _addr(records.scheduled),
            _addr(records.started),
            _addr(records.connected),
            _addr(records.outcome),
            int(timestamps),
            0.0,
            0.0,
        )
        if not self.x:
            raise OSError(errno.ENOMEM, "the agent's C fast path could not allocate its state")
        self.ep_fd = lib.fp_epoll_fd(self.x)
        for p, (src, tgt, addr) in enumerate(dests):
            dst = sockaddr(tgt.family, addr[0], addr[1])
            s = sockaddr(tgt.family, src, 0) if src is not None else None
            self._keep += [dst, s, tgt.request]
            lib.fp_pair(
                self.x,
                p,
                tgt.family,
                s,
                len(s) if s else 0,
                dst,
                len(dst),
                tgt.request,
                len(tgt.request),
                target_index[p],
            )
        self.expected: list[bytes | None] = [None] * n_targets  # what C compares with
        self.after = after
        self._keep.append(after)
        lib.fp_after(self.x, after or None, len(after))
        self.out = (Out * MAX_EVENTS)()
        self.nev = ctypes.c_int(0)
        self.fails_buf = (ctypes.c_int32 * 512)()
        self.launched = 0  # rows started, as of the last take()
        self.rows = (ctypes.c_int32 * 4096)()
        self.hist = (ctypes.c_int64 * (2 * HIST_PAIRS))()
        self.counts = Counts()
        self.state = ctypes.c_int(0)
        self.arena = lib.fp_arena(self.x)

    def set_clock(self, start_at: float, mono0: float) -> None:
        """Rows' times are ``start_at + (monotonic() - mono0)`` unix seconds."""
        self.lib.fp_set_clock(self.x, start_at, mono0)

    def expect(self, target: int, response: bytes) -> None:
        """``response`` (a whole 101 that the Python path accepted) is what ``target``
        answers: equal responses are taken as upgrades without Python."""
        if self.expected[target] is not response:
            # C points into the newest response only: the list keeps it alive (and lets the
            # one before go: a server with a Date header sends a new one every second)
            self.lib.fp_expect(self.x, target, response, len(response))
            self.expected[target] = response

    def launch(self, i_from: int, i_to: int) -> None:
        """Start rows ``i_from`` .. ``i_to - 1`` now (failures: ``fails()``)."""
        self.lib.fp_launch(self.x, i_from, i_to)

    def run(self, opens: array, i_from: int, window_s: float) -> int:
        """The launcher (call it in a thread of its own: the GIL is released meanwhile):
        start rows ``i_from`` .. at their times ``opens[i]`` (seconds after the clock's
        ``mono0``), at most one batch per ``window_s``, until all are started or ``stop()``.
        Returns the rows started."""
        return int(self.lib.fp_run(self.x, _addr(opens), i_from, window_s))

    def stop(self) -> None:
        """The launcher stops at its next turn (within 50 ms)."""
        self.lib.fp_stop(self.x)

    def fails(self) -> list[tuple[int, int]]:
        """(row, errno) of the rows whose start failed since last asked."""
        out: list[tuple[int, int]] = []
        f = self.fails_buf
        while True:
            nf = self.lib.fp_fails(self.x, f, 256)
            out += [(f[2 * k], f[2 * k + 1]) for k in range(nf)]
            if nf < 256:
                return out

    def poll(self) -> tuple[list[tuple[int, int, int, int, bytes, float]], int]:
        """Serve what is ready: the events for Python, as (kind, fd, row, arg, data, ts), and
        how many events were served."""
        k = self.lib.fp_poll(self.x, self.out, ctypes.byref(self.nev))
        if not k:
            return [], self.nev.value
        res = []
        for e in self.out[:k]:
            data = ctypes.string_at(self.arena + e.off, e.len) if e.kind == EV_ADOPT_DATA else b""
            arg = e.arg
            if e.kind == EV_ADOPT_HELD and e.len < 0:  # the after-upgrade bytes not all written
                data = self.after[e.off :]
            res.append((e.kind, e.fd, e.i, arg, data, e.ts))
        return res, self.nev.value

    def release(self, i: int) -> tuple[int, int]:
        """Take row ``i`` from C: (fd, state), or (-1, 0) when C does not hold it."""
        fd = self.lib.fp_release(self.x, i, ctypes.byref(self.state))
        return fd, self.state.value if fd >= 0 else 0

    def expired(self, limit: float) -> list[int]:
        """Rows held by C, still connecting, that started before ``limit`` (unix s)."""
        k = self.lib.fp_expired(self.x, limit, self.rows, len(self.rows))
        return list(self.rows[:k])

    def take(self, counters: Any, hist: Any) -> float:
        """Add what C counted and timed since last asked to ``counters`` and ``hist``; return
        the largest start lag (s) since then. Updates ``launched``."""
        c = self.counts
        self.lib.fp_take_counts(self.x, ctypes.byref(c))
        self.launched = c.launched
        counters.started += c.started
        counters.connected += c.connected
        counters.open += c.open
        counters.bytes_in += c.bytes_in
        counters.bytes_out += c.bytes_out
        k = self.lib.fp_take_hist(self.x, self.hist, HIST_PAIRS)
        if k:
            h = self.hist
            counts = hist.counts
            total = 0
            for j in range(k):
                idx, n = h[2 * j], h[2 * j + 1]
                counts[idx] = counts.get(idx, 0) + n
                total += n
            hist.total += total
        return c.lag_max_ns * 1e-9
