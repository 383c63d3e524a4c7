"""Live progress of a run: stage lines, and a status built from the roles' JSON lines.

``Progress`` (text) prints one line per stage and at most one status line every few seconds
(pipes, CI logs, notebooks); ``BarProgress`` draws a rich progress bar of connections in a
terminal. ``make_progress("auto")`` picks one. ``lab.engine`` feeds them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.plan import RoleLaunch


class Progress:
    """Live progress: stages as they happen, and the roles' JSON lines (compact text form).

    ``TextProgress`` prints a line per stage and at most one status line every few seconds;
    ``BarProgress`` draws a rich progress bar of connections in a terminal.
    """

    def __init__(self, stream: Any = None, every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.agents: dict[str, dict[str, Any]] = {}
        self.server: dict[str, Any] = {}
        self.cpu: dict[str, float] = {}
        self._printed = 0.0
        self._t0 = time.time()

    def stage(self, text: str) -> None:
        self._emit(f"[{time.time() - self._t0:6.1f}s] {text}")

    def line(self, launch: RoleLaunch, data: Mapping[str, Any]) -> None:
        kind = data.get("kind")
        if kind in ("agent", "agent_end"):
            self.agents[launch.name] = dict(data)
        elif kind == "server":
            self.server = dict(data)
        elif kind == "monitor":
            cpus = data.get("cpu_percent") or []
            self.cpu[launch.host] = sum(cpus) / len(cpus) if cpus else 0.0
        self.update()

    def totals(self) -> dict[str, Any]:
        """Connections planned/connected/open, errors, messages and the server's online count."""
        a = self.agents.values()
        return {
            "planned": sum(int(x.get("planned") or 0) for x in a),
            "connected": sum(int(x.get("connected") or 0) for x in a),
            "open": sum(int(x.get("open") or 0) for x in a),
            "errors": sum(sum((x.get("failed") or {}).values()) for x in a),
            "msgs_in": sum(int(x.get("msgs_in") or 0) for x in a),
            "lost": sum(int(x.get("lost") or 0) for x in a),
            "online": self.server.get("online", "—"),  # no server line yet
            "pcs": sum(int(w.get("pcs") or 0) for w in self.server.get("workers") or []),
        }

    def status(self) -> str:
        t = self.totals()
        cpu = " ".join(f"{h} {c:.0f}%" for h, c in sorted(self.cpu.items()))
        return (
            f"connected {t['connected']}/{t['planned']} open {t['open']} errors {t['errors']} "
            f"| server online {t['online']} PcS {t['pcs']} | msgs {t['msgs_in']} lost "
            f"{t['lost']} | cpu {cpu}"
        )

    def update(self) -> None:
        now = time.time()
        if now - self._printed >= self.every_s:
            self._printed = now
            self._emit(f"[{now - self._t0:6.1f}s] {self.status()}")

    def _emit(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.agents or self.server:
            self._emit(f"[{time.time() - self._t0:6.1f}s] {self.status()}")


class BarProgress(Progress):
    """A rich progress bar of connections (terminal only); stages print above it."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("connections"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._rich.add_task("", total=None)
        self._rich.start()

    def _emit(self, text: str) -> None:
        self._rich.console.print(text, highlight=False)

    def update(self) -> None:
        t = self.totals()
        self._rich.update(
            self._task,
            completed=t["connected"],
            total=t["planned"] or None,
            description=(
                f"open {t['open']} err {t['errors']} server {t['online']} msgs {t['msgs_in']}"
            ),
        )

    def close(self) -> None:
        self.update()
        self._rich.stop()


def make_progress(kind: str | Progress = "auto", stream: Any = None) -> Progress:
    """``auto``: a bar in a terminal, else text lines (pipes, notebooks); or ``text``/``bar``."""
    if isinstance(kind, Progress):
        return kind
    if kind == "auto":
        out = stream if stream is not None else sys.stderr
        kind = (
            "bar"
            if getattr(out, "isatty", lambda: False)() and "ipykernel" not in sys.modules
            else "text"
        )
    return BarProgress() if kind == "bar" else Progress(stream)
