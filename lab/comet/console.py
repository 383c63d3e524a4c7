"""The server's once-a-second figures, as the field report's console showed them: connections
online, uptime, and per worker the events handled so far and in the last second (PcS), and
how long its latest fan-out took (one message written to all its subscribers).

Pure functions: ``server_line`` builds the ``{"kind": "server", ...}`` JSON line of
results/README.md (also the ``/stats`` body), ``console_text`` the human line for stderr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict


class WorkerFigures(TypedDict):
    """One worker's entry of the server line."""

    worker: int
    pid: int
    online: int
    events: int
    connects: int
    messages: int
    closes: int
    pcs: int
    restarts: int
    fanout_ms: float
    fanout_subscribers: int
    fanout_id: int
    fanout_c: int


class ServerLine(TypedDict):
    kind: str
    t: float
    uptime_s: int
    online: int
    workers: list[WorkerFigures]
    published: int
    channels: int


def worker_figures(
    index: int, pid: int, reported: dict[str, Any] | None, restarts: int
) -> WorkerFigures:
    """A worker's entry from its latest ``stats`` control message (zeros before the first)."""
    r = reported or {}
    return {
        "worker": index,
        "pid": pid,
        "online": int(r.get("online", 0)),
        "events": int(r.get("events", 0)),
        "connects": int(r.get("connects", 0)),
        "messages": int(r.get("messages", 0)),
        "closes": int(r.get("closes", 0)),
        "pcs": int(r.get("pcs", 0)),
        "restarts": restarts,
        "fanout_ms": float(r.get("fanout_ms", 0.0)),
        "fanout_subscribers": int(r.get("fanout_subscribers", 0)),
        "fanout_id": int(r.get("fanout_id", 0)),
        "fanout_c": int(r.get("fanout_c", 0)),
    }


def server_line(
    t: float, uptime_s: float, workers: Sequence[WorkerFigures], published: int, channels: int
) -> ServerLine:
    return {
        "kind": "server",
        "t": round(t, 3),
        "uptime_s": int(uptime_s),
        "online": sum(w["online"] for w in workers),
        "workers": list(workers),
        "published": published,
        "channels": channels,
    }


def console_text(line: ServerLine) -> str:
    """``online 12000  uptime 42 s  | w0 pid 1234 events 5000 PcS 2500 | ...``"""
    parts = [
        f"online {line['online']:>6}  uptime {line['uptime_s']:>5} s  published {line['published']}"
    ]
    for w in line["workers"]:
        restarted = f" restarts {w['restarts']}" if w["restarts"] else ""
        fanout = w.get("fanout_subscribers", 0)
        fanned = f" fan-out {w['fanout_ms']:.1f} ms/{fanout}" if fanout else ""
        parts.append(
            f"w{w['worker']} pid {w['pid']} online {w['online']} events {w['events']} "
            f"PcS {w['pcs']}{fanned}{restarted}"
        )
    return "  | ".join(parts)
