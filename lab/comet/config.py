"""The server's command line and the settings a worker runs with.

``build_parser`` is the ``python -m lab.comet`` / ``lab serve`` interface; ``resolve`` turns
parsed arguments into a ``ServerConfig`` (workers sized from the open-file limit, a publish
token generated for non-loopback binds); ``WorkerConfig`` is what the supervisor hands each
worker over its control link.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from lab.limits import HostLimits, read_host_limits, workers_for

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_MAX_HEAD_BYTES = 16 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_HISTORY = 100
DEFAULT_MAX_CONNECTIONS = 20_000


class ConfigError(Exception):
    """A command-line value the server cannot run with; the message names the fix."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What one worker needs (sent as the first control message; the token stays off argv)."""

    index: int
    host: str
    port: int
    history: int
    max_message_bytes: int
    max_head_bytes: int
    ping_interval_s: float
    publish_token: str | None
    max_conns: int
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    backlog: int = 4096

    def to_dict(self) -> dict[str, Any]:
        return {"op": "config", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerConfig:
        return cls(**{k: v for k, v in d.items() if k != "op"})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The resolved server settings."""

    host: str
    port: int
    workers: int
    max_connections: int
    publish_token: str | None
    token_generated: bool
    history: int
    max_message_bytes: int
    max_head_bytes: int
    ping_interval_s: float
    out: str | None
    quiet: bool
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def worker_config(self, index: int, port: int, limits: HostLimits) -> WorkerConfig:
        return WorkerConfig(
            index=index,
            host=self.host,
            port=port,
            history=self.history,
            max_message_bytes=self.max_message_bytes,
            max_head_bytes=self.max_head_bytes,
            ping_interval_s=self.ping_interval_s,
            publish_token=self.publish_token,
            max_conns=limits.conns_per_process,
            request_timeout_s=self.request_timeout_s,
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m lab.comet",
        description=(
            "The comet push server: WebSocket (/ws), long-poll (/lp) and Server-Sent Events "
            "(/sse) on one port, publish with POST /pub/<channel>, figures at /stats. "
            "Several worker processes share the port (SO_REUSEPORT); a supervisor restarts "
            "any that dies and orders every publish across workers."
        ),
        epilog=(
            'stdout: one JSON line per second ({"kind": "server", ...}, results/README.md); '
            "stderr: a console line per second and logs. SIGTERM/SIGINT: WebSockets get close "
            "1001, long-polls and SSE streams end, exit 0. A worker sends a broadcast to a "
            "channel's WebSockets (when it has 32 or more subscribers) in a C loop built with "
            "the host's cc at first use (into ~/.cache/comet-lab/c); without cc, or with "
            "LAB_COMET_FANOUT=0, in Python."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free)")
    p.add_argument(
        "--workers",
        default="auto",
        help="worker processes, or 'auto' (enough that each stays below the open-file limit "
        "for --max-connections; default auto)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections the server should hold; sizes --workers auto "
        f"(default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--publish-token",
        default=None,
        help="bearer token that POST /pub needs; generated and printed when binding a "
        "non-loopback address without one",
    )
    p.add_argument(
        "--history",
        type=int,
        default=DEFAULT_HISTORY,
        help="messages kept per channel for long-poll since / SSE Last-Event-ID "
        f"(default {DEFAULT_HISTORY})",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest publish body and client frame (default 1 MiB)",
    )
    p.add_argument(
        "--max-head-bytes",
        type=int,
        default=DEFAULT_MAX_HEAD_BYTES,
        help="largest request line + headers, else 431 (default 16 KiB)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds an HTTP connection may take to send a complete request (else 408), or "
        "stay idle between requests (else closed); upgraded WebSockets, long-polls and SSE "
        f"streams are not timed (default {DEFAULT_REQUEST_TIMEOUT_S:g}; 0 = off)",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=0.0,
        help="seconds between WebSocket pings (default 0 = off: some load tools never answer)",
    )
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="no console line on stderr")
    return p


def resolve(args: argparse.Namespace, limits: HostLimits | None = None) -> ServerConfig:
    """Validate parsed arguments into a ServerConfig; raise ConfigError naming the fix."""
    limits = limits or read_host_limits()
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port; use 1..65535 (or 0 for any)")
    if args.max_connections < 1:
        raise ConfigError("--max-connections must be >= 1")
    if args.workers == "auto":
        workers = workers_for(args.max_connections, limits)
    else:
        try:
            workers = int(args.workers)
        except ValueError:
            raise ConfigError(f"--workers {args.workers!r}: give a number or 'auto'") from None
        if workers < 1:
            raise ConfigError("--workers must be >= 1 (or 'auto')")
    if args.history < 0:
        raise ConfigError("--history must be >= 0 messages per channel")
    if args.max_message_bytes < 1:
        raise ConfigError("--max-message-bytes must be >= 1")
    if args.max_head_bytes < 256:
        raise ConfigError("--max-head-bytes must be >= 256")
    if args.ping_interval < 0:
        raise ConfigError("--ping-interval must be >= 0 seconds (0 = off)")
    if not 0 <= args.request_timeout < 1e6:
        raise ConfigError("--request-timeout must be 0 (off) or a number of seconds below 1e6")
    token = args.publish_token
    generated = False
    if token == "":
        raise ConfigError("--publish-token is empty; give a token or leave the flag out")
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
        generated = True
    return ServerConfig(
        host=args.host,
        port=args.port,
        workers=workers,
        max_connections=args.max_connections,
        publish_token=token,
        token_generated=generated,
        history=args.history,
        max_message_bytes=args.max_message_bytes,
        max_head_bytes=args.max_head_bytes,
        ping_interval_s=args.ping_interval,
        out=args.out,
        quiet=args.quiet,
        request_timeout_s=args.request_timeout,
    )
