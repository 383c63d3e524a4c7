"""The agent's capacity check: can this host run this plan? Decided before any connection.

What it is for: a plan that cannot fit fails at once with a message naming the limit and the
fix, rather than as thousands of EMFILE / EADDRNOTAVAIL errors mid-run. Pure arithmetic over
``lab.limits.HostLimits`` (read once with ``read_host_limits``) and the schedule's peaks:

- files: each process holds at most ``conns_per_process`` connections (open-file hard limit);
- ports: each (source address, destination) pair gives ~``ephemeral_ports`` ports;
- memory: agent + kernel bytes per held connection, plus an interpreter per process.

Also: ``auto_procs`` (processes for --procs auto), ``parse_source_ips`` (list / range /
auto) and ``check_source_ips`` (each address can be bound here).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from dataclasses import dataclass

from lab.limits import HostLimits, fast_ports_per_pair, processes_for

# Agent user-space bytes per held connection (measured ~1.5-2.5 KiB; keep headroom).
AGENT_BYTES_PER_CONN = 3 * 1024
# Kernel bytes per TCP socket (one end), measured ~3.9 KiB.
KERNEL_BYTES_PER_SOCKET = 4 * 1024
# One agent process: interpreter, uvloop, websockets, buffers.
PROCESS_BYTES = 48 * 1024 * 1024
# New connections per second that ``--procs auto`` plans per agent process, and the most a
# process opens while the others wait their turn (``Schedule.lanes``). One process has
# sustained ~10,000/s against a minimal server on a core of its own here (bench_agent.py);
# sharing the cores with the server and a monitor, it gets less: keep headroom.
RATE_PER_PROCESS = 6000.0
# Past this rate per process, schedule lag is likely: the plan gets a warning.
RATE_PER_PROCESS_WARN = 1.5 * RATE_PER_PROCESS
# Share of a (source, destination) pair's ephemeral ports a plan may use.
PORT_HEADROOM = 0.95
# Share of the available memory a plan may use.
MEM_HEADROOM = 0.8
# IP_BIND_ADDRESS_NO_PORT (linux/in.h): bind the address now, pick the port at connect().
IP_BIND_ADDRESS_NO_PORT = 24


class CapacityError(Exception):
    """The plan does not fit this host; the message names the limit and the fix."""


@dataclass(frozen=True, slots=True)
class Demand:
    """What a plan asks of a host: peak simultaneous connections and the highest rate of new
    connections any phase asks for (``Schedule.peak_rate_per_s``; a ramp shorter than a second
    asks its full rate of the processes)."""

    peak_open: int
    peak_rate_per_s: float
    procs: int
    sources: int
    destinations: int
    lanes: int | None = None  # processes opening side by side (Schedule.lanes); None: procs


def auto_procs(
    peak_open: int, peak_rate_per_s: float, limits: HostLimits, cpus: int | None = None
) -> int:
    """Processes for --procs auto: enough for the open-file limit and for the rate, at most one
    per CPU unless the open-file limit needs more."""
    by_files = processes_for(peak_open, limits)
    by_rate = max(1, math.ceil(peak_rate_per_s / RATE_PER_PROCESS))
    cpus = cpus or os.cpu_count() or 1
    return max(by_files, min(by_rate, cpus))


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _ip_range_text(first: str, count: int) -> str:
    last = ipaddress.ip_address(first) + (count - 1)
    return f"{first}-{last}" if count > 1 else first


def parse_source_ips(spec: str | None, *, needed: int, loopback: bool) -> list[str | None]:
    """Source addresses from --source-ips: ``auto``, a comma list, or a range ``A-B``.

    ``auto``: on loopback, ``needed`` addresses from 127.0.0.2 (127.0.0.1 is left to everything
    else on the host, whose ports would slow our connects); elsewhere ``[None]`` (the kernel's
    choice). Raises ``ValueError`` with the fix on bad input.
    """
    if spec is None or spec == "auto":
        if loopback:
            start = ipaddress.ip_address("127.0.0.2")
            return [str(start + k) for k in range(max(1, needed))]
        return [None]
    out: list[str | None] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (ipaddress.ip_address(x.strip()) for x in part.split("-", 1))
                if int(b) < int(a) or int(b) - int(a) > 65535:
                    raise ValueError(f"bad range {part}")
                out.extend(str(a + k) for k in range(int(b) - int(a) + 1))
            else:
                out.append(str(ipaddress.ip_address(part)))
        except ValueError as exc:
            raise ValueError(
                f"--source-ips {spec!r}: {exc}; give auto, a list (127.0.0.2,127.0.0.3) "
                "or a range (127.0.0.2-127.0.0.9)"
            ) from exc
    if not out:
        raise ValueError("--source-ips is empty: give auto, a list or a range")
    return out


def check_source_ips(ips: list[str | None]) -> None:
    """Bind each source address once (no connection): raises CapacityError naming the address
    and the fix when one is not assigned to this host."""
    for ip in ips:
        if ip is None:
            continue
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((ip, 0))
            except OSError as exc:
                raise CapacityError(
                    f"source address {ip} cannot be used on this host ({exc.strerror}): assign it "
                    f"(ip addr add {ip}/32 dev lo) or remove it from --source-ips"
                ) from exc


def check_capacity(
    demand: Demand, limits: HostLimits, *, source_hint: str | None = None
) -> list[str]:
    """Raise ``CapacityError`` when the plan cannot fit; return warnings otherwise.

    ``source_hint`` is the first free address to suggest for more source addresses
    (127.0.0.2 on loopback)."""
    problems: list[str] = []
    warnings: list[str] = []
    per_proc = math.ceil(demand.peak_open / demand.procs)
    if per_proc > limits.conns_per_process:
        need = processes_for(demand.peak_open, limits)
        problems.append(
            f"files: {demand.peak_open} connections over {demand.procs} process(es) is {per_proc} "
            f"per process, above the {limits.conns_per_process} that the open-file hard limit "
            f"({limits.nofile_hard}) allows: use --procs {need} (or --procs auto)"
        )
    pairs = max(1, demand.sources * demand.destinations)
    per_pair = math.ceil(demand.peak_open / pairs)
    usable = int(limits.ephemeral_ports * PORT_HEADROOM)
    if per_pair > usable:
        need = math.ceil(demand.peak_open / (usable * max(1, demand.destinations)))
        first = source_hint or "127.0.0.2"
        problems.append(
            f"ports: {demand.peak_open} connections over {demand.sources} source address(es) × "
            f"{demand.destinations} destination(s) is {per_pair} per pair, above the {usable} "
            f"ephemeral ports of a pair (ip_local_port_range {limits.port_low}-"
            f"{limits.port_high}): add source addresses {_ip_range_text(first, need)} "
            f"(--source-ips {_ip_range_text(first, need)}, or auto on loopback) "
            "or more --url destinations"
        )
    need_bytes = (
        demand.peak_open * (AGENT_BYTES_PER_CONN + KERNEL_BYTES_PER_SOCKET)
        + demand.procs * PROCESS_BYTES
    )
    if limits.mem_available_bytes and need_bytes > limits.mem_available_bytes * MEM_HEADROOM:
        problems.append(
            f"memory: {demand.peak_open} connections need about {need_bytes >> 20} MiB, "
            f"{int(MEM_HEADROOM * 100)}% of available memory is "
            f"{int(limits.mem_available_bytes * MEM_HEADROOM) >> 20} MiB: "
            "lower --connections or spread the plan over more agent hosts"
        )
    if problems:
        raise CapacityError("the plan does not fit this host:\n  " + "\n  ".join(problems))
    # Linux picks even ports first for connect(); once they are taken every connect() scans
    # them all (__inet_hash_connect): one process drops from ~8,000 to a few hundred
    # connects/s (measured here at ~14,000 connections on one pair)
    fast = fast_ports_per_pair(limits)
    if per_pair > fast:
        need = math.ceil(demand.peak_open / (fast * max(1, demand.destinations)))
        first = source_hint or "127.0.0.2"
        warnings.append(
            f"ports: {per_pair} connections per (source, destination) pair is past the "
            f"{fast} that connect() serves fast (Linux scans its even ports first): expect "
            f"connects to slow down; add source addresses ({_ip_range_text(first, need)})"
        )
    rate_per_proc = demand.peak_rate_per_s / (demand.lanes or demand.procs)
    if rate_per_proc > RATE_PER_PROCESS_WARN:
        warnings.append(
            f"rate: {rate_per_proc:.0f} new connections/s per process is past the "
            f"{RATE_PER_PROCESS_WARN:.0f}/s beyond which one process may fall behind (about "
            f"10,000/s at best, on a core of its own): watch the schedule lag reported each "
            f"second; use more --procs or hosts"
        )
    return warnings
