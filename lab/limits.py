"""Machine limits and the capacity arithmetic that every planner shares.

Pure functions over numbers read once from the host (``read_host_limits``): how many
connections one process may hold under its open-file limit, how many processes a target needs,
how many ephemeral ports one (source address, destination) pair offers. Call
``read_host_limits()`` on the host that will run the load, then the ``*_for`` helpers.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

# File descriptors a process keeps for itself (stdio, epoll, pipes, log files, listeners).
FD_RESERVE = 64
# Fraction of the open-file limit a process may fill with connections.
FD_HEADROOM = 0.9


@dataclass(frozen=True, slots=True)
class HostLimits:
    """Limits of one host that bound a plan. Read with ``read_host_limits``."""

    nofile_soft: int
    nofile_hard: int
    port_low: int
    port_high: int
    mem_available_bytes: int

    @property
    def ephemeral_ports(self) -> int:
        """Ports per (source address, destination address, destination port)."""
        return self.port_high - self.port_low + 1

    @property
    def conns_per_process(self) -> int:
        """Connections one process may hold below its (hard) open-file limit."""
        return max(1, int(self.nofile_hard * FD_HEADROOM) - FD_RESERVE)


PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _read_port_range(path: Path = PORT_RANGE_FILE) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _read_mem_available(path: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_host_limits() -> HostLimits:
    """Read this host's open-file limits, ephemeral port range and available memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY:
        soft = hard
    low, high = _read_port_range()
    return HostLimits(soft, hard, low, high, _read_mem_available())


def raise_nofile_soft_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def processes_for(connections: int, limits: HostLimits) -> int:
    """Processes needed so that each holds fewer connections than its open-file limit allows."""
    return max(1, math.ceil(connections / limits.conns_per_process))


def workers_for(max_connections: int, limits: HostLimits, *, imbalance: float = 1.25) -> int:
    """Server workers for ``max_connections``: SO_REUSEPORT spreads by hash, not evenly, so
    leave ``imbalance`` headroom per worker."""
    return max(1, math.ceil(max_connections * imbalance / limits.conns_per_process))


# Share of the ephemeral range one (source, destination) pair can fill at full connect speed.
# Linux's connect() port search scans the even ports first and only then the odd ones; once
# the even half is used, every connect() walks it (measured here: ~2,500/s collapses to
# ~200/s at ~14,100 connections per source address with a 28,232-port range).
FAST_PORT_SHARE = 0.45


def fast_ports_per_pair(limits: HostLimits) -> int:
    """Connections one (source address, destination) pair takes before connect() slows down."""
    return max(1, int(limits.ephemeral_ports * FAST_PORT_SHARE))


def source_addresses_for(connections_per_destination: int, limits: HostLimits) -> int:
    """Source addresses needed so that no (source, destination) pair leaves the fast half of
    its ephemeral ports (see ``FAST_PORT_SHARE``)."""
    return max(1, math.ceil(connections_per_destination / fast_ports_per_pair(limits)))


SOCKSTAT_FILE = Path("/proc/net/sockstat")


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT on this host (/proc/net/sockstat ``tw``)."""
    from lab.monitor import parse_sockstat

    return parse_sockstat(SOCKSTAT_FILE.read_text())["tcp_tw"]


TIME_WAIT_SETTLE_S = 70.0  # the longest wait for TIME_WAIT sockets to go (they last 60 s)


def settle_time_wait(limit: int = 2000, timeout_s: float = TIME_WAIT_SETTLE_S) -> None:
    """Wait (up to the 60 s TIME_WAIT lifetime) until earlier runs' TIME_WAIT sockets are gone:
    tens of thousands of them make connect() and every lookup of an established socket
    slower, and the figures with them."""
    deadline = time.monotonic() + timeout_s
    tw = time_wait_sockets()
    if tw > limit:
        print(f"waiting for {tw} TIME_WAIT sockets of earlier runs to expire ...", flush=True)
    while tw > limit and time.monotonic() < deadline:
        time.sleep(1.0)
        tw = time_wait_sockets()
