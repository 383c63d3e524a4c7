"""Per-connection records: compact columns in memory, a small binary file on disk.

What it is for: every connection the agent schedules gets one row (scheduled, started,
connected, closed times and an outcome), kept in preallocated ``array`` columns (33 bytes a
connection, no per-connection objects) and written at the end, or on SIGTERM, for the report
(``connections.parquet``). Read a file back with ``read_records(path)``.

File format (``.rec``): a sequence of blocks, so files concatenate (the coordinator appends the
blocks of its processes into one file). Each block::

    b"CLREC1\\n"                          magic
    uint32 little-endian                 length of the JSON header that follows
    JSON header (UTF-8)                  {"n": rows, "proc": p, "procs": P, "agent": name,
                                          "first": f, "step": s,
                                          "byteorder": "little", "outcomes": [names...],
                                          "columns": [["scheduled","d"], ["started","d"],
                                                      ["connected","d"], ["closed","d"],
                                                      ["outcome","b"]]}
    the columns, in header order, each ``n`` items of its array typecode (native widths:
    'd' = float64, 'b' = int8), byte order as in the header

Times are unix seconds (float64), NaN when the event never happened. The connection number
``conn`` is the agent-wide arrival index: ``first + row * step`` (a block without ``first`` and
``step``, as written before processes could take consecutive runs: ``proc + row * procs``).
"""

from __future__ import annotations

import enum
import json
import math
import struct
import sys
from array import array
from pathlib import Path
from typing import BinaryIO

MAGIC = b"CLREC1\n"
NAN = math.nan


class Outcome(enum.IntEnum):
    """How a connection ended. ``OK``: connected (and closed as planned)."""

    NOT_STARTED = 0
    OK = 1
    REFUSED = 2
    TIMEOUT = 3
    RESET = 4
    NO_PORT = 5
    NO_FILES = 6
    HTTP = 7
    OTHER = 8
    PENDING = 9  # started, no result yet (only seen in files flushed mid-run)

    @property
    def label(self) -> str:
        return self.name.lower()


FAILURES = ("refused", "timeout", "reset", "no_port", "no_files", "http", "other")
COLUMNS = (
    ("scheduled", "d"),
    ("started", "d"),
    ("connected", "d"),
    ("closed", "d"),
    ("outcome", "b"),
)


class Records:
    """The record columns of one agent process, preallocated for ``n`` connections."""

    __slots__ = (
        "agent",
        "closed",
        "connected",
        "first",
        "n",
        "outcome",
        "proc",
        "procs",
        "scheduled",
        "started",
        "step",
    )

    def __init__(
        self,
        n: int,
        *,
        proc: int = 0,
        procs: int = 1,
        agent: str = "",
        first: int | None = None,
        step: int | None = None,
    ) -> None:
        self.n = n
        self.proc = proc
        self.procs = procs
        # row k is the agent's connection first + k * step (Schedule.shard)
        self.first = proc if first is None else first
        self.step = procs if step is None else step
        self.agent = agent
        nans = array("d", [NAN]) * n
        self.scheduled = array("d", nans)
        self.started = array("d", nans)
        self.connected = array("d", nans)
        self.closed = array("d", nans)
        self.outcome = array("b", bytes(n))

    def write_block(self, f: BinaryIO) -> None:
        """Append this process's block to an open binary file."""
        header = {
            "n": self.n,
            "proc": self.proc,
            "procs": self.procs,
            "first": self.first,
            "step": self.step,
            "agent": self.agent,
            "byteorder": sys.byteorder,
            "outcomes": [o.label for o in Outcome],
            "columns": [list(c) for c in COLUMNS],
        }
        raw = json.dumps(header).encode()
        f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
        for name, _ in COLUMNS:
            getattr(self, name).tofile(f)

    def save(self, path: str | Path) -> None:
        """Write this process's records to ``path`` (replacing it)."""
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as f:
            self.write_block(f)
        tmp.replace(path)


def read_records(path: str | Path) -> dict[str, list]:
    """All rows of a ``.rec`` file as columns: conn, proc, scheduled, started, connected, closed
    (unix s, NaN when it never happened) and outcome (str: ok, refused, timeout, reset, no_port,
    no_files, http, other, not_started, pending). A truncated last block is read as far as it
    goes; a file that is not a record file raises ``ValueError`` naming it."""
    out: dict[str, list] = {
        k: [] for k in ("conn", "proc", "scheduled", "started", "connected", "closed", "outcome")
    }
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if data[pos : pos + len(MAGIC)] != MAGIC:
            raise ValueError(f"{path}: not a comet-lab record file (bad magic at byte {pos})")
        pos += len(MAGIC)
        (hlen,) = struct.unpack_from("<I", data, pos)
        pos += 4
        header = json.loads(data[pos : pos + hlen])
        pos += hlen
        n, proc, procs = int(header["n"]), int(header["proc"]), int(header["procs"])
        first, step = int(header.get("first", proc)), int(header.get("step", procs))
        names = header["outcomes"]
        cols: dict[str, array] = {}
        for name, code in header["columns"]:
            a = array(code)
            size = a.itemsize * n
            chunk = data[pos : pos + size]
            a.frombytes(chunk[: len(chunk) - len(chunk) % a.itemsize])
            if header["byteorder"] != sys.byteorder:
                a.byteswap()
            pos += size
            cols[name] = a
        rows = min(len(a) for a in cols.values())
        out["conn"].extend(range(first, first + rows * step, step))
        out["proc"].extend([proc] * rows)
        for name in ("scheduled", "started", "connected", "closed"):
            out[name].extend(cols[name][:rows])
        out["outcome"].extend(
            names[o] if 0 <= o < len(names) else "other" for o in cols["outcome"][:rows]
        )
    return out


def append_file(dst: str | Path, src: str | Path) -> None:
    """Append the blocks of record file ``src`` to ``dst`` (created if missing)."""
    with open(dst, "ab") as out, open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
