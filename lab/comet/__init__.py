"""``lab.comet``: the comet push server (WebSocket, long-poll and SSE on one port).

Modules: ``protocol`` (the sans-I/O comet application protocol), ``connection`` (HTTP
connections: long-poll, SSE, publish, the upgrade), ``fdio`` (the worker's accept path and its
WebSockets on raw fds), ``websocket`` (upgraded connections), ``worker`` (one SO_REUSEPORT
worker process), ``fanout`` (a broadcast's sends to WebSockets in one C call), ``supervisor``
(the parent: restarts workers, sequences publishes, prints the figures), ``console`` (the
once-a-second figures), ``config`` (the command line), ``ipc`` (the parent-worker link),
``launch`` (start a server child process and wait until it serves, for tests and benchmarks).
Run it with ``python -m lab.comet --help`` or ``lab serve``.
"""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Start the server (see ``python -m lab.comet --help``)."""
    from lab.comet.supervisor import main as supervisor_main

    return supervisor_main(argv, prog)


__all__ = ["main"]
