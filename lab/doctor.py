"""Preflight: can these hosts run this experiment? ``lab doctor [experiment] [-p key=value]``.

Per host (``check_host(facts)``): Python version, open-file limits, ip_local_port_range,
somaxconn, tcp_max_syn_backlog, free memory, clock offset to the controller. For the
experiment (``check_plan(exp, facts_by_host)``): the plan's capacity — files per process,
ports × source addresses × destinations, memory — via ``lab.plan.make_plan``. Both are pure
functions over *facts*: the dict ``lab.metadata.collect_host_metadata()`` returns on a host, or
``lab.ssh.gather_facts`` over SSH (same keys). ``main`` gathers the facts (the embedded local
host directly, others over SSH) and prints one line per finding; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.limits import HostLimits

MIN_PYTHON = (3, 11)
MIN_NOFILE = 4096
MIN_PORTS = 10000
MIN_SOMAXCONN = 1024
MIN_SYN_BACKLOG = 1024
MIN_MEM_AVAILABLE = 1 << 30
MAX_CLOCK_OFFSET_S = 1.0
# TIME_WAIT sockets above which a host is still busy with an earlier run's connections
# (lab.engine.SETTLE_TIME_WAIT: a run waits for them to expire)
MAX_TIME_WAIT = 5000
UNLIMITED = 1 << 20


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One preflight result: what was checked on which host, the value seen, and the fix."""

    host: str
    check: str
    level: Level
    value: str
    message: str = ""
    fix: str = ""

    def text(self) -> str:
        """The finding in a sentence, for a run's notes and reason: check, value, why, fix."""
        text = f"{self.check} {self.value}"
        if self.message:
            text += f": {self.message}"
        return text + (f" (fix: {self.fix})" if self.fix else "")

    def as_dict(self) -> dict[str, str]:
        """As run.json keeps it (``hosts[].checks``)."""
        return {
            "check": self.check,
            "value": self.value,
            "message": self.message,
            "fix": self.fix,
            "level": self.level.value,
        }

    def line(self) -> str:
        text = f"{self.level.value.upper():<4}  {self.host:<10} {self.check:<24} {self.value}"
        if self.message:
            text += f"  — {self.message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _port_range(facts: Mapping[str, Any]) -> tuple[int, int] | None:
    v = (facts.get("sysctls") or {}).get("net.ipv4.ip_local_port_range")
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    return None


def limits_from_facts(facts: Mapping[str, Any]) -> HostLimits:
    """The ``HostLimits`` that ``make_plan`` needs, from a host's facts."""
    hard = _int(facts.get("nofile_hard"))
    soft = _int(facts.get("nofile_soft"))
    hard = UNLIMITED if hard is None else hard
    low, high = _port_range(facts) or (32768, 60999)
    return HostLimits(
        nofile_soft=hard if soft is None else soft,
        nofile_hard=hard,
        port_low=low,
        port_high=high,
        mem_available_bytes=_int(facts.get("mem_available_bytes")) or 0,
    )


def check_host(facts: Mapping[str, Any], host: str | None = None) -> list[Finding]:
    """Findings for one host's facts (``host`` defaults to the facts' hostname)."""
    name = host or str(facts.get("name") or facts.get("hostname") or "?")
    out: list[Finding] = []

    def add(check: str, level: Level, value: str, message: str = "", fix: str = "") -> None:
        out.append(Finding(name, check, level, value, message, fix))

    if facts.get("error"):
        error = str(facts["error"])
        fix = "" if "fix" in error.lower() else "check address, port, user and key"
        if "did not run there" in error:  # reached, but its python is not there (lab.ssh)
            add("python", Level.FAIL, "not runnable", error, fix)
        else:
            add("reachable", Level.FAIL, "no", error, fix)
        return out
    py = str(facts.get("python") or "")
    try:
        version = tuple(int(x) for x in py.split(".")[:2])
    except ValueError:
        version = ()
    if len(version) == 2 and version >= MIN_PYTHON:
        add("python", Level.OK, py)
    else:
        want = ".".join(map(str, MIN_PYTHON))
        add(
            "python",
            Level.FAIL,
            py or "unknown",
            f"needs Python >= {want}",
            "set `python:` of the host",
        )
    hard, soft = _int(facts.get("nofile_hard")), _int(facts.get("nofile_soft"))
    lim = limits_from_facts(facts)
    value = f"soft {soft or 'unlimited'}, hard {hard or 'unlimited'}"
    if hard is not None and hard < MIN_NOFILE:
        add(
            "open files (nofile)",
            Level.FAIL,
            value,
            f"one process may hold only {lim.conns_per_process} connections",
            "raise the hard limit (limits.conf / systemd LimitNOFILE)",
        )
    else:
        msg = f"{lim.conns_per_process} connections per process" + (
            "; roles raise soft to hard" if soft is not None and soft != hard else ""
        )
        add("open files (nofile)", Level.OK, value, msg)
    ports = _port_range(facts)
    if ports is None:
        add("ip_local_port_range", Level.WARN, "unknown", "assuming 32768-60999")
    else:
        n = ports[1] - ports[0] + 1
        level = Level.OK if n >= MIN_PORTS else Level.WARN
        fix = "" if level is Level.OK else 'sysctl -w net.ipv4.ip_local_port_range="1024 65535"'
        add("ip_local_port_range", level, f"{ports[0]}-{ports[1]}", f"{n} ports per pair", fix)
    sysctls = facts.get("sysctls") or {}
    for key, minimum, label in (
        ("net.core.somaxconn", MIN_SOMAXCONN, "somaxconn"),
        ("net.ipv4.tcp_max_syn_backlog", MIN_SYN_BACKLOG, "tcp_max_syn_backlog"),
    ):
        v = _int(sysctls.get(key))
        if v is None:
            add(label, Level.WARN, "unknown")
        elif v < minimum:
            add(
                label,
                Level.WARN,
                str(v),
                "a fast ramp can overflow the accept queue",
                f"sysctl -w {key}={minimum * 4}",
            )
        else:
            add(label, Level.OK, str(v))
    avail = _int(facts.get("mem_available_bytes"))
    if avail is None:
        add("free memory", Level.WARN, "unknown")
    else:
        level = Level.OK if avail >= MIN_MEM_AVAILABLE else Level.WARN
        add("free memory", level, f"{avail >> 20} MiB available")
    tw = _int(facts.get("tcp_time_wait"))
    if tw is not None:
        level = Level.OK if tw <= MAX_TIME_WAIT else Level.WARN
        add(
            "TIME_WAIT sockets",
            level,
            str(tw),
            ""
            if level is Level.OK
            else "left by an earlier run: they slow connect() and every "
            "lookup of an established socket, and so the figures",
            ""
            if level is Level.OK
            else "lab run waits for them to expire (TIME_WAIT lasts 60 s) before it starts",
        )
    offset = facts.get("clock_offset_s")
    if isinstance(offset, int | float):
        level = Level.OK if abs(offset) <= MAX_CLOCK_OFFSET_S else Level.WARN
        fix = "" if level is Level.OK else "run NTP (chrony/timesyncd) on the host"
        add("clock offset", level, f"{offset * 1000:+.1f} ms", "corrected in the tables", fix)
    else:
        add("clock offset", Level.WARN, "unknown", "not measured")
    return out


def source_ip_usable(ip: str, facts: Mapping[str, Any]) -> bool | None:
    """Can an agent on the host with these facts bind ``ip``? None when the facts do not
    say (an older lab on the host). On Linux a whole loopback network is local."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    if addr.version == 4 and addr.is_loopback:  # 127/8 is local on any Linux host
        return True
    addresses = facts.get("addresses")
    if addresses is None:
        return None
    if addr.version == 4 and (facts.get("sysctls") or {}).get("net.ipv4.ip_nonlocal_bind") == 1:
        return True
    for address, prefix, *_ in addresses:
        own = ipaddress.ip_address(address)
        if own == addr:
            return True
        if own.is_loopback and addr in ipaddress.ip_network(f"{own}/{prefix}", strict=False):
            return True
    return False


def _compiler_findings(
    exp: Any, agent_hosts: list[str], facts: Mapping[str, Mapping[str, Any]]
) -> list[Finding]:
    """For a WebSocket plan, a warning for each host that would build comet-lab's C parts
    (``lab.cbuild``) but has no compiler: the agents' fast path, the server's fan-out."""
    from lab.experiment import ServerKind

    loses: dict[str, list[str]] = {}
    if exp.server.kind is ServerKind.LAB_COMET:
        loses[exp.server_host] = [
            "the server's broadcasts take its Python loop (~1 us more CPU per subscriber)"
        ]
    for host in dict.fromkeys(agent_hosts):
        loses.setdefault(host, []).append(
            "the agent's connections take its Python path (~40 us more CPU per new one)"
        )
    out = []
    for host, what in loses.items():
        host_facts = facts.get(host) or {}
        if "c_compiler" in host_facts and not host_facts["c_compiler"]:
            out.append(
                Finding(
                    host,
                    "C compiler",
                    Level.WARN,
                    "none",
                    f"comet-lab builds its C parts with cc: without one {'; '.join(what)}",
                    "apt-get install gcc on the host",
                )
            )
    return out


def plan_host_findings(
    exp: Any, limits: Mapping[str, HostLimits], facts_by_host: Mapping[str, Mapping[str, Any]]
) -> list[Finding]:
    """What the plan asks of each agent host that its facts can refuse: source addresses it
    cannot bind (fail), a rate its cores cannot drive (warn). ``lab run`` checks these too."""
    from lab.agent.capacity import RATE_PER_PROCESS_WARN
    from lab.plan import agent_shares

    out: list[Finding] = []
    kind = getattr(getattr(exp.session, "kind", None), "value", "websocket")
    shares = agent_shares(exp, limits)
    if kind in ("websocket", "generic"):  # the sessions that use the C parts
        out += _compiler_findings(exp, [s.host for s in shares], facts_by_host)
    for share in shares:
        facts = facts_by_host.get(share.host) or {}
        unsure = [ip for ip in share.source_ips if source_ip_usable(ip, facts) is None]
        if unsure:
            out.append(
                Finding(
                    share.host,
                    "source address",
                    Level.WARN,
                    "not checked",
                    "the host's facts do not list its addresses",
                    "the agent checks them when it starts",
                )
            )
        for ip in share.source_ips:
            if source_ip_usable(ip, facts) is False:
                out.append(
                    Finding(
                        share.host,
                        "source address",
                        Level.FAIL,
                        ip,
                        "not an address of this host (nor in its loopback network)",
                        f"assign it (ip addr add {ip}/32 dev lo) or change agents.source_ips",
                    )
                )
        cores = _int(facts.get("cpu_affinity")) or _int(facts.get("cpu_count"))
        if cores and share.rate_per_s > cores * RATE_PER_PROCESS_WARN:
            out.append(
                Finding(
                    share.host,
                    "agent rate",
                    Level.WARN,
                    f"{share.rate_per_s:,.0f}/s on {cores} core(s)",
                    f"past the ~{RATE_PER_PROCESS_WARN:,.0f}/s per core beyond which an agent "
                    "process falls behind its schedule: expect schedule lag and a ramp below plan",
                    "lower the rate or spread it over more agent hosts",
                )
            )
    return out


def check_plan(exp: Any, facts_by_host: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Findings for the experiment's plan on these hosts: fits (one line per launch) or the
    CapacityError naming the limit and the fix."""
    from lab.plan import CapacityError, describe_plan, make_plan

    limits: dict[str, HostLimits] = {}
    out: list[Finding] = []
    for h in exp.hosts:
        facts = facts_by_host.get(h.name)
        if facts is None or facts.get("error"):
            out.append(Finding(h.name, "plan", Level.FAIL, "no facts", "host not checked"))
            continue
        limits[h.name] = limits_from_facts(facts)
    if out:
        return out
    try:
        plan = make_plan(exp, limits)
    except CapacityError as exc:
        return [Finding(exc.host, f"capacity: {exc.limit}", Level.FAIL, "no", exc.problem, exc.fix)]
    out.append(
        Finding(
            "plan",
            "capacity",
            Level.OK,
            f"{exp.peak_connections} connections",
            f"{len(plan.launches)} launches on {len(plan.hosts)} host(s)",
        )
    )
    out += plan_host_findings(exp, limits, facts_by_host)
    out += [Finding("plan", "launch", Level.OK, line.strip()) for line in describe_plan(plan)]
    return out


def gather_facts(exp: Any | None) -> dict[str, dict[str, Any]]:
    """Facts of every host: the embedded local host directly, the others over SSH."""
    from lab.metadata import collect_host_metadata

    hosts = list(exp.hosts) if exp is not None else []
    facts: dict[str, dict[str, Any]] = {}
    remote = [h for h in hosts if not h.embedded]
    for h in hosts:
        if h.embedded:
            facts[h.name] = {**collect_host_metadata(), "clock_offset_s": 0.0}
    if not hosts:
        facts["local"] = {**collect_host_metadata(), "clock_offset_s": 0.0}
    if remote:
        try:
            from lab.ssh import gather_facts_sync

            facts.update(gather_facts_sync(remote))
        except ImportError as exc:
            for h in remote:
                facts[h.name] = {"error": f"cannot reach over SSH ({exc})"}
    return facts


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lab.doctor",
        description=(
            "Preflight the hosts (python, open files, port range, somaxconn, syn backlog, "
            "memory, clock) and the experiment's plan capacity. Exit 1 on any failure."
        ),
    )
    parser.add_argument("experiment", nargs="?", help="experiment YAML (default: hosts only)")
    parser.add_argument(
        "-p",
        "--param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an experiment key, as with lab run (repeatable), e.g. -p agents.procs=4",
    )
    parser.add_argument("--inventory", help="inventory YAML replacing the experiment's hosts")
    args = parser.parse_args(list(argv) if argv is not None else None)
    exp = None
    if args.experiment:
        from lab.experiment import ExperimentError, load_experiment, parse_overrides

        try:
            exp = load_experiment(
                args.experiment, parse_overrides(args.overrides), inventory=args.inventory
            )
        except ExperimentError as exc:
            print(f"{parser.prog}: {exc}", file=sys.stderr)
            return 2
    elif args.overrides:
        parser.error("-p needs an experiment")
    facts = gather_facts(exp)
    findings: list[Finding] = []
    for name, f in facts.items():
        findings += check_host(f, host=name)
    if exp is not None:
        findings += check_plan(exp, facts)
    for finding in findings:
        print(finding.line())
    failed = sum(f.level is Level.FAIL for f in findings)
    warned = sum(f.level is Level.WARN for f in findings)
    print(f"{len(findings)} checks, {warned} warnings, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
