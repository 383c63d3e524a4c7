"""The plan: who runs what, where, at which rate — a pure function of an experiment and limits.

``make_plan(experiment, limits)`` takes the validated ``Experiment`` and each host's
``HostLimits`` (read on the host, ``lab.limits.read_host_limits``) and returns a ``Plan``: the
monitor, server and agent command lines per host (``RoleLaunch``), in start order. Before any
load it checks capacity — open files per process, ephemeral ports × source addresses ×
destinations, memory — and raises ``CapacityError`` naming the limit and the fix. No I/O, no
clock: ``lab.run`` executes the plan, ``lab doctor`` prints it.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from lab.agent.capacity import RATE_PER_PROCESS
from lab.experiment import (
    Experiment,
    HostSpec,
    PhaseKind,
    ServerKind,
    SessionKind,
    SubscribeBy,
)
from lab.limits import (
    FAST_PORT_SHARE,
    HostLimits,
    fast_ports_per_pair,
    processes_for,
    source_addresses_for,
    workers_for,
)

# Memory per connection used by the capacity check (generous: measured figures in DESIGN.md).
SERVER_BYTES_PER_CONN = 12 * 1024
AGENT_BYTES_PER_CONN = 8 * 1024
KERNEL_BYTES_PER_SOCKET = 4 * 1024
PROCESS_BASE_BYTES = 40 * 1024 * 1024
# Seconds between "start agents" and their common start time: spawning and importing the
# agent's processes (about half a second each on a busy 2-core host), at least START_DELAY_S.
START_DELAY_S = 3.0
START_DELAY_PER_PROC_S = 0.5
# Extra seconds monitors run past the experiment's bound (start delay and teardown included),
# so that they never outlive a run by much.
MONITOR_GRACE_S = 60.0
# Headroom per server worker for SO_REUSEPORT's uneven (hash) spreading: measured here, 64,000
# connections over 4 workers land within ±1% of 16,000 each (15,896-16,101).
SERVER_IMBALANCE = 1.1


class CapacityError(ValueError):
    """The plan cannot fit a host's limits. ``limit`` names the limit, ``fix`` what to do."""

    def __init__(self, host: str, limit: str, problem: str, fix: str) -> None:
        self.host, self.limit, self.problem, self.fix = host, limit, problem, fix
        super().__init__(f"{host}: {limit}: {problem} — fix: {fix}")


class Role(enum.Enum):
    MONITOR = "monitor"
    SERVER = "server"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class RoleLaunch:
    """One process (group) to start: ``python -m lab.<role> *argv`` on ``host``, in its run dir."""

    host: str
    role: Role
    name: str
    argv: tuple[str, ...]
    command: str | None = None
    stream_file: str = ""
    fetch_globs: tuple[str, ...] = ()
    health_url: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (path relative to the run dir, text) to write first


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything to launch, in stage order (monitors, server, agents)."""

    experiment: Experiment
    hosts: tuple[HostSpec, ...]
    launches: tuple[RoleLaunch, ...]
    start_delay_s: float
    max_duration_s: float

    def stage(self, role: Role) -> tuple[RoleLaunch, ...]:
        """The launches of one role, in plan order."""
        return tuple(x for x in self.launches if x.role is role)


@dataclass(frozen=True, slots=True)
class AgentShare:
    """What one agent host does: its share of connections and rate, processes, addresses."""

    host: str
    name: str
    connections: int
    rate_per_s: float
    procs: int
    source_ips: tuple[str, ...]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` whole numbers that differ by at most one (first ones larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _is_wildcard(address: str) -> bool:
    return address in ("0.0.0.0", "::", "")


def _fmt_range(first: int, count: int) -> str:
    """127.0.0.<first>-<first+count-1> in the short form the experiment accepts."""
    return f"127.0.0.{first}" if count == 1 else f"127.0.0.{first}-{first + count - 1}"


def server_address(exp: Experiment) -> str:
    """The address agents connect to: the bind address, or the server host's address."""
    bind = exp.server.host
    if _is_wildcard(bind):
        return exp.host(exp.server_host).address
    return bind


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def agent_url(exp: Experiment) -> str:
    """The URL one connection opens (channels in the query when subscribing by query)."""
    if exp.server.kind is ServerKind.EXTERNAL:
        assert exp.server.url
        return exp.server.url
    kind = exp.session.kind
    path = {SessionKind.LONGPOLL: "/lp", SessionKind.SSE: "/sse"}.get(kind, "/ws")
    scheme = "ws" if kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC) else "http"
    url = f"{scheme}://{_url_host(server_address(exp))}:{exp.server.port}{path}"
    if exp.session.channels and exp.session.subscribe_by is SubscribeBy.QUERY:
        url += "?" + urlencode([("channel", c) for c in exp.session.channels])
    return url


def publish_url(exp: Experiment) -> str | None:
    if exp.publishing is None:
        return None
    if exp.server.kind is ServerKind.EXTERNAL:
        return exp.server.publish_url
    channel = quote(exp.publishing.channel, safe="")
    return f"http://{_url_host(server_address(exp))}:{exp.server.port}/pub/{channel}"


def _limits_for(limits: Mapping[str, HostLimits], host: str) -> HostLimits:
    try:
        return limits[host]
    except KeyError:
        raise CapacityError(
            host, "limits", "no limits were read for this host", "read them on the host first"
        ) from None


def server_workers(exp: Experiment, lim: HostLimits) -> int:
    """Workers the server needs (auto) or is given (checked against the open-file limit)."""
    max_conns = exp.server.max_connections or exp.peak_connections
    needed = workers_for(max_conns, lim, imbalance=SERVER_IMBALANCE)
    given = exp.server.workers
    if given is None:
        return needed
    if given < needed:
        per = lim.conns_per_process
        raise CapacityError(
            exp.server_host,
            f"open files per process (hard nofile {lim.nofile_hard})",
            f"server.workers={given} holds at most {given * per} connections ({per} per "
            f"worker); {max_conns} connections with {SERVER_IMBALANCE:g}× headroom for uneven "
            f"SO_REUSEPORT spreading need {needed} workers",
            f"raise workers to {needed} (-p server.workers={needed}, or `workers: auto`)",
        )
    return given


def _agent_source_ips(
    exp: Experiment, host: str, conns: int, procs: int, lim: HostLimits, first_free: int
) -> tuple[str, ...]:
    """Source addresses for one agent host; () lets the kernel choose (one address)."""
    usable = fast_ports_per_pair(lim)  # past it, connect() slows down (lab.limits)
    needed = source_addresses_for(conns, lim)
    ports = (
        f"{usable} fast ephemeral ports (of {lim.port_low}-{lim.port_high}: "
        f"connect() slows down past {FAST_PORT_SHARE:.0%})"
    )
    given = dict(exp.agents.source_ips_by_host).get(host, exp.agents.source_ips)
    if exp.server.kind is ServerKind.LAB_COMET:
        dest_loopback = _is_loopback(server_address(exp))
    else:
        dest_loopback = _is_loopback(urlsplit(exp.server.url or "").hostname or "")
    if given is not None:
        if len(given) * usable < conns:
            if dest_loopback:
                fix = f"add source addresses {_fmt_range(2, needed)} (agents.source_ips)"
            else:
                fix = (
                    f"list at least {needed} addresses configured on {host} in "
                    f"agents.source_ips.{host}, or widen net.ipv4.ip_local_port_range on {host}"
                )
            raise CapacityError(
                host,
                "ephemeral ports × source addresses × destinations",
                f"{len(given)} source address(es) × {ports} × 1 destination is below the "
                f"{conns} connections of this host",
                fix,
            )
        return given
    if needed == 1:
        return ()
    if not dest_loopback:
        raise CapacityError(
            host,
            "ephemeral ports × source addresses × destinations",
            f"{conns} connections to one destination need {needed} source addresses "
            f"({ports} per pair), and only loopback addresses can be chosen automatically",
            f"list {needed} addresses configured on {host} in agents.source_ips.{host}, "
            f"add agent hosts, or widen net.ipv4.ip_local_port_range on {host}",
        )
    # At least one address per process: a connection's address follows its place in the
    # agent's schedule (whichever process opens it), so each pair holds connections / pairs.
    count = max(needed, procs)
    if first_free + count - 1 > 254:
        raise CapacityError(
            host,
            "source addresses",
            f"needs {count} more loopback addresses past 127.0.0.{first_free}",
            "add agent hosts or lower the connections",
        )
    return tuple(f"127.0.0.{i}" for i in range(first_free, first_free + count))


def agent_shares(exp: Experiment, limits: Mapping[str, HostLimits]) -> tuple[AgentShare, ...]:
    """Split connections and rate over the agent hosts; choose processes and addresses."""
    hosts = exp.agent_hosts
    conns = split_evenly(exp.peak_connections, len(hosts))
    ramp_rate = next(p.rate_per_s for p in exp.phases if p.rate_per_s)
    assert ramp_rate is not None
    shares = []
    for i, (host, n) in enumerate(zip(hosts, conns, strict=True)):
        lim = _limits_for(limits, host)
        needed = processes_for(n, lim)
        rate = ramp_rate * n / max(1, exp.peak_connections)
        procs = exp.agents.procs or max(needed, math.ceil(rate / RATE_PER_PROCESS))
        if procs < needed:
            raise CapacityError(
                host,
                f"open files per process (hard nofile {lim.nofile_hard})",
                f"agents.procs={procs} gives {math.ceil(n / procs)} connections per process, "
                f"above the {lim.conns_per_process} one process may hold",
                f"raise agents.procs to {needed} (-p agents.procs={needed}, or `procs: auto`)",
            )
        ips = _agent_source_ips(exp, host, n, procs, lim, 2)
        shares.append(AgentShare(host, f"agent-{i}", n, rate, procs, ips))
    return tuple(shares)


def _check_memory(
    exp: Experiment, limits: Mapping[str, HostLimits], shares: Sequence[AgentShare], workers: int
) -> None:
    need: dict[str, int] = {}
    peak = exp.peak_connections
    if exp.server.kind is ServerKind.LAB_COMET:
        h = exp.server_host
        need[h] = need.get(h, 0) + peak * (SERVER_BYTES_PER_CONN + KERNEL_BYTES_PER_SOCKET)
        need[h] += workers * PROCESS_BASE_BYTES
    for s in shares:
        per = AGENT_BYTES_PER_CONN + KERNEL_BYTES_PER_SOCKET
        need[s.host] = need.get(s.host, 0) + s.connections * per + s.procs * PROCESS_BASE_BYTES
    for host, bytes_ in need.items():
        avail = _limits_for(limits, host).mem_available_bytes
        if avail and bytes_ > avail:
            raise CapacityError(
                host,
                "memory",
                f"the plan needs about {bytes_ >> 20} MiB, {avail >> 20} MiB are available",
                "lower the connections, free memory, or spread agents over more hosts",
            )


def _is_simple(exp: Experiment) -> bool:
    """One ramp, then at most one hold, then at most one close: the agent's plain flags."""
    kinds = [p.kind for p in exp.phases]
    return kinds[:1] == [PhaseKind.RAMP] and kinds[1:] in (
        [],
        [PhaseKind.HOLD],
        [PhaseKind.CLOSE],
        [PhaseKind.HOLD, PhaseKind.CLOSE],
    )


def agent_phases(exp: Experiment, index: int, hosts: int) -> list[dict[str, Any]]:
    """The phases of agent ``index`` of ``hosts`` in the agent's --plan JSON form: targets
    split evenly, rates in proportion to the agent's share of the connections."""
    peak = max(1, exp.peak_connections)
    frac = split_evenly(peak, hosts)[index] / peak
    out: list[dict[str, Any]] = []
    for p in exp.phases:
        if p.kind is PhaseKind.RAMP:
            until = split_evenly(p.until_connections or 0, hosts)[index]
            out.append({"kind": "ramp", "rate_per_s": (p.rate_per_s or 0) * frac, "until": until})
        elif p.kind is PhaseKind.RATE:
            rate = (p.rate_per_s or 0) * frac
            out.append({"kind": "ramp", "rate_per_s": rate, "duration_s": p.duration_s})
        elif p.kind is PhaseKind.HOLD:
            out.append({"kind": "hold", "duration_s": p.hold_s})
        elif p.close_rate_per_s:
            out.append({"kind": "close", "rate_per_s": p.close_rate_per_s * frac})
        else:
            out.append({"kind": "close"})
    return out


def _phase_args(
    exp: Experiment, share: AgentShare, index: int, hosts: int
) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """--rate/--connections/--hold/--close-rate when they express the phases, else --plan."""
    if not _is_simple(exp):
        doc = {"arrival": exp.arrival.kind.value, "seed": exp.arrival.seed + index}
        doc["phases"] = agent_phases(exp, index, hosts)  # type: ignore[assignment]
        name = f"{share.name}.plan.json"
        return ["--plan", name], ((name, json.dumps(doc, indent=1) + "\n"),)
    hold = sum(p.hold_s or 0 for p in exp.phases if p.kind is PhaseKind.HOLD)
    flags = [
        "--rate",
        f"{share.rate_per_s:g}",
        "--connections",
        str(share.connections),
        "--hold",
        f"{hold:g}",
    ]
    close = [p for p in exp.phases if p.kind is PhaseKind.CLOSE]
    if close and close[0].close_rate_per_s:
        frac = share.connections / max(1, exp.peak_connections)
        flags += ["--close-rate", f"{close[0].close_rate_per_s * frac:g}"]
    return flags, ()


def _server_launch(exp: Experiment, workers: int) -> RoleLaunch | None:
    srv = exp.server
    if srv.kind is ServerKind.EXTERNAL:
        if not srv.command:
            return None
        return RoleLaunch(
            exp.server_host, Role.SERVER, "server", (), srv.command, "", (), srv.health_url
        )
    max_conns = srv.max_connections or exp.peak_connections
    argv = [
        "--host",
        srv.host,
        "--port",
        str(srv.port),
        "--workers",
        str(workers),
        "--max-connections",
        str(max_conns),
        "--history",
        str(srv.history),
        "--max-message-bytes",
        str(srv.max_message_bytes),
        "--out",
        "server.jsonl",
    ]
    if srv.publish_token:
        argv += ["--publish-token", srv.publish_token]
    if srv.ping_interval_s:
        argv += ["--ping-interval", f"{srv.ping_interval_s:g}"]
    health = srv.health_url or (f"http://{_url_host(server_address(exp))}:{srv.port}/healthz")
    return RoleLaunch(
        exp.server_host, Role.SERVER, "server", tuple(argv), None, "server.jsonl", (), health
    )


def _agent_launch(exp: Experiment, share: AgentShare, index: int, hosts: int) -> RoleLaunch:
    argv = ["--url", agent_url(exp), "--session", exp.session.kind.value]
    phase_args, files = _phase_args(exp, share, index, hosts)
    argv += phase_args
    if exp.session.subscribe_by is SubscribeBy.MESSAGE:
        for channel in exp.session.channels:
            argv += ["--subscribe", channel]
    argv += ["--procs", str(share.procs)]
    if exp.agents.nice:
        argv += ["--nice", str(exp.agents.nice)]
    if share.source_ips:
        argv += ["--source-ips", ",".join(share.source_ips)]
    argv += [
        "--max-duration",
        f"{exp.max_duration_s:g}",
        "--seed",
        str(exp.arrival.seed + index),
        "--arrival",
        exp.arrival.kind.value,
    ]
    pub = exp.publishing
    if pub and index == 0:  # one publisher: every subscriber expects each message once
        url = publish_url(exp)
        if url:
            argv += [
                "--publish-url",
                url,
                "--publish-rate",
                f"{pub.rate_per_s:g}",
                "--payload-bytes",
                str(pub.payload_bytes),
                "--publish-count",
                str(pub.count),
            ]
            if exp.server.publish_token:
                argv += ["--publish-token", exp.server.publish_token]
            if pub.start_after_s:
                argv += ["--publish-delay", f"{pub.start_after_s:g}"]
    argv += [
        "--agent-id",
        share.name,
        "--out",
        f"{share.name}.jsonl",
        "--records",
        f"{share.name}.rec",
    ]
    return RoleLaunch(
        share.host,
        Role.AGENT,
        share.name,
        tuple(argv),
        None,
        f"{share.name}.jsonl",
        (f"{share.name}.rec*",),  # the joined file, or its parts
        None,
        files,
    )


def _monitor_launch(exp: Experiment, host: str) -> RoleLaunch:
    argv = [
        "--interval",
        f"{exp.monitor.interval_s:g}",
        "--duration",
        f"{exp.max_duration_s + MONITOR_GRACE_S:g}",
        "--out",
        "monitor.jsonl",
    ]
    for rule in exp.monitor.match:
        argv += ["--match", rule]
    if exp.server.kind is ServerKind.EXTERNAL and exp.server.match and host == exp.server_host:
        argv += ["--match", f"server={exp.server.match}"]
    return RoleLaunch(host, Role.MONITOR, f"monitor@{host}", tuple(argv), None, "monitor.jsonl")


def make_plan(exp: Experiment, limits: Mapping[str, HostLimits]) -> Plan:
    """The launches for ``exp`` given each host's limits; raises CapacityError if it cannot fit."""
    workers = 0
    if exp.server.kind is ServerKind.LAB_COMET:
        workers = server_workers(exp, _limits_for(limits, exp.server_host))
        if exp.publishing and not exp.server.publish_token and not _is_loopback(exp.server.host):
            raise CapacityError(
                exp.server_host,
                "publish token",
                f"the server binds {exp.server.host!r} (not loopback), so publishing needs a token",
                "set server.publish_token (-p server.publish_token=<secret>)",
            )
    shares = agent_shares(exp, limits)
    _check_memory(exp, limits, shares, workers)
    used = [exp.server_host] + [s.host for s in shares]
    in_use = [h.name for h in exp.hosts if h.name in used]
    launches = [_monitor_launch(exp, h) for h in in_use]
    server = _server_launch(exp, workers)
    if server:
        launches.append(server)
    launches += [_agent_launch(exp, s, i, len(shares)) for i, s in enumerate(shares)]
    hosts = tuple(h for h in exp.hosts if h.name in in_use)
    delay = max(START_DELAY_S, 2.0 + START_DELAY_PER_PROC_S * max(s.procs for s in shares))
    return Plan(exp, hosts, tuple(launches), delay, exp.max_duration_s)


def describe_plan(plan: Plan) -> list[str]:
    """One human line per launch, for ``lab doctor`` and progress output."""
    lines = []
    for x in plan.launches:
        cmd = x.command or f"python -m lab.{'comet' if x.role is Role.SERVER else x.role.value}"
        lines.append(f"{x.host:>12}  {x.name:<16} {cmd} {' '.join(x.argv)}".rstrip())
    return lines
