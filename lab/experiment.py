"""Experiments and inventories: YAML files validated once, at load, into frozen dataclasses.

An experiment says what to run (server, agents, session, arrival phases, publishing, monitor,
thresholds); an inventory says where (hosts reached over SSH: ``lab.inventory``, re-exported
here with ``HostSpec`` and ``LOCAL``; the validating reader is ``lab.validation``).
``load_experiment(path, overrides)`` reads, applies ``-p key=value`` overrides (dotted keys:
``phases.0.rate_per_s=100``), validates every key, type and range, and returns an
``Experiment``; a problem raises ``ExperimentError`` naming the file, the key and the fix.
Hand the result to ``lab.plan.make_plan``. ``experiments/template.yaml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.inventory import LOCAL, LOCAL_HOST, HostSpec, hosts_from_data, load_inventory
from lab.validation import (
    ExperimentError,
    Section,
    apply_overrides,
    expand_addresses,
    kind_of,
    parse_overrides,
    read_yaml,
)

__all__ = [
    "LOCAL",
    "LOCAL_HOST",
    "ExperimentError",
    "HostSpec",
    "expand_addresses",
    "load_experiment",
    "load_inventory",
    "parse_overrides",
]

DEFAULT_PORT = 18080

# The summary fields of results/README.md that thresholds may test.
SUMMARY_FIELDS = (
    "peak_connections",
    "connect_errors",
    "ramp_rate_mean_per_s",
    "ramp_rate_min_per_s",
    "server_bytes_per_conn",
    "agent_bytes_per_conn",
    "kernel_bytes_per_conn",
    "connect_ms_p50",
    "connect_ms_p99",
    "connect_ms_max",
    "delivery_ms_p50",
    "delivery_ms_p99",
    "delivery_ms_max",
    "read_ms_p50",
    "read_ms_p99",
    "read_ms_max",
    "messages_lost",
    "agent_saturated",
)
# More summary fields lab.stats computes (results/README.md "Summary fields"); thresholds
# may test these too.
MORE_SUMMARY_FIELDS = (
    "planned_connections",
    "connections_pending",
    "connections_dropped",
    "server_restarts",
    "planned_peak_connections",
    "planned_rate_per_s",
    "planned_hold_s",
    "ramp_rate_planned_per_s",
    "ramp_s",
    "ramp_whole_seconds",
    "schedule_lag_ms_max",
    "hold_s",
    "messages_received",
    "messages_untimed",
    *(
        f"{r}_{m}"
        for r in ("server", "agent", "monitor")
        for m in ("cpu_us_per_conn", "cpu_percent_mean", "cpu_percent_max")
    ),
)
THRESHOLD_OPS = (">=", "<=", "==", "!=", ">", "<")


class ServerKind(enum.Enum):
    LAB_COMET = "lab.comet"
    EXTERNAL = "external"


class SessionKind(enum.Enum):
    WEBSOCKET = "websocket"
    LONGPOLL = "longpoll"
    SSE = "sse"
    GENERIC = "generic"


class SubscribeBy(enum.Enum):
    QUERY = "query"
    MESSAGE = "message"


class ArrivalKind(enum.Enum):
    UNIFORM = "uniform"
    POISSON = "poisson"


class PhaseKind(enum.Enum):
    """RAMP opens at rate_per_s until until_connections are open; RATE opens at rate_per_s for
    duration_s; HOLD waits hold_s; CLOSE closes at close_rate_per_s (None: all at once)."""

    RAMP = "ramp"
    RATE = "rate"
    HOLD = "hold"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """The server under test: ``lab.comet`` with its options, or an external one."""

    kind: ServerKind = ServerKind.LAB_COMET
    on_host: str = ""  # inventory host that runs it ("" = the first host)
    host: str = "127.0.0.1"  # bind address
    port: int = DEFAULT_PORT
    workers: int | None = None  # None = auto (enough for the open-file limit)
    max_connections: int | None = None  # None = the experiment's peak
    history: int = 100
    max_message_bytes: int = 1 << 20
    publish_token: str | None = None
    ping_interval_s: float | None = None
    url: str | None = None  # external: the URL agents connect to
    publish_url: str | None = None  # external: where the publisher POSTs
    command: str | None = None  # external: shell command that starts it
    health_url: str | None = None
    match: str | None = None  # external: cmdline substring for the monitor


@dataclass(frozen=True, slots=True)
class AgentsSpec:
    """Where the load comes from: agent hosts, processes per host, source addresses."""

    hosts: tuple[str, ...] = ()  # () = the server host alone, or every other host
    procs: int | None = None  # per agent host; None = auto
    source_ips: tuple[str, ...] | None = None  # None = auto; applies to every agent host
    source_ips_by_host: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # nice increment of the load processes: agents sharing cores with the server give way to
    # it, as agents on other hosts would (0 = same priority)
    nice: int = 0


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What one connection does: its protocol, channels and how it subscribes."""

    kind: SessionKind = SessionKind.WEBSOCKET
    channels: tuple[str, ...] = ()
    subscribe_by: SubscribeBy = SubscribeBy.QUERY


@dataclass(frozen=True, slots=True)
class Phase:
    """One step of the arrival schedule (see PhaseKind)."""

    kind: PhaseKind
    rate_per_s: float | None = None
    until_connections: int | None = None
    duration_s: float | None = None
    hold_s: float | None = None
    close_rate_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: ArrivalKind = ArrivalKind.UNIFORM
    seed: int = 1


@dataclass(frozen=True, slots=True)
class PublishingSpec:
    """Messages published to the server while connections are open."""

    rate_per_s: float
    count: int
    payload_bytes: int = 64
    channel: str = ""
    start_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    interval_s: float = 1.0
    match: tuple[str, ...] = ()  # extra "ROLE=SUBSTRING" rules


@dataclass(frozen=True, slots=True)
class Threshold:
    """A pass/fail rule over one summary field: ``actual <op> value``."""

    name: str
    op: str
    value: float | bool

    def holds(self, actual: float | bool | None) -> bool:
        """True when ``actual`` satisfies the rule; a missing actual fails."""
        if actual is None or (isinstance(actual, float) and math.isnan(actual)):
            return False
        a, v = float(actual), float(self.value)
        return {
            ">=": a >= v,
            "<=": a <= v,
            "==": a == v,
            "!=": a != v,
            ">": a > v,
            "<": a < v,
        }[self.op]


@dataclass(frozen=True, slots=True)
class Experiment:
    """A validated experiment: everything ``lab.plan.make_plan`` needs, no I/O left."""

    name: str
    path: str
    description: str = ""
    hosts: tuple[HostSpec, ...] = (LOCAL,)
    server: ServerSpec = field(default_factory=ServerSpec)
    agents: AgentsSpec = field(default_factory=AgentsSpec)
    session: SessionSpec = field(default_factory=SessionSpec)
    phases: tuple[Phase, ...] = ()
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    publishing: PublishingSpec | None = None
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    thresholds: tuple[Threshold, ...] = ()
    max_duration_s: float = 0.0

    @property
    def peak_connections(self) -> int:
        """The most connections the phases hold open at once."""
        return peak_connections(self.phases)

    @property
    def server_host(self) -> str:
        return self.server.on_host or self.hosts[0].name

    @property
    def agent_hosts(self) -> tuple[str, ...]:
        if self.agents.hosts:
            return self.agents.hosts
        others = tuple(h.name for h in self.hosts if h.name != self.server_host)
        return others or (self.server_host,)

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved experiment as plain JSON types (for run.json); secrets masked."""
        out = _plain(self)
        if self.server.publish_token:
            out["server"]["publish_token"] = "***"
        return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [_plain(x) for x in obj]
    return obj


def peak_connections(phases: tuple[Phase, ...]) -> int:
    """Connections open at the peak of the schedule."""
    open_, peak = 0, 0
    for p in phases:
        if p.kind is PhaseKind.RAMP:
            open_ = max(open_, p.until_connections or 0)
        elif p.kind is PhaseKind.RATE:
            open_ += round((p.rate_per_s or 0) * (p.duration_s or 0))
        elif p.kind is PhaseKind.CLOSE:
            peak, open_ = max(peak, open_), 0
        peak = max(peak, open_)
    return peak


def estimated_duration_s(phases: tuple[Phase, ...]) -> float:
    """Seconds the schedule takes at its nominal rates."""
    open_, total = 0, 0.0
    for p in phases:
        if p.kind is PhaseKind.RAMP:
            target = p.until_connections or 0
            total += max(0, target - open_) / (p.rate_per_s or 1)
            open_ = max(open_, target)
        elif p.kind is PhaseKind.RATE:
            total += p.duration_s or 0
            open_ += round((p.rate_per_s or 0) * (p.duration_s or 0))
        elif p.kind is PhaseKind.HOLD:
            total += p.hold_s or 0
        elif p.kind is PhaseKind.CLOSE:
            total += open_ / p.close_rate_per_s if p.close_rate_per_s else 1.0
            open_ = 0
    return total


# --------------------------------------------------------------------------- sections


def _resolve_relative(base: Path, ref: str) -> Path:
    p = Path(ref).expanduser()
    if p.is_absolute():
        return p
    for candidate in (base.parent / p, Path.cwd() / p, base.parent.parent / p):
        if candidate.exists():
            return candidate
    return base.parent / p


def _server(file: str, raw: Any, host_names: tuple[str, ...]) -> ServerSpec:
    s = Section(file, "server", raw)
    kind = s.enum_("kind", ServerKind, ServerKind.LAB_COMET)
    if True in s.data:  # YAML 1.1 reads a bare `on:` key as true
        raise s.err("on", "unknown key", "did you mean `on_host`?")
    on = s.str_("on_host", "")
    if on and on not in host_names:
        raise s.err("on_host", f"no host named {on!r}", f"use one of: {', '.join(host_names)}")
    spec = ServerSpec(
        kind=kind,
        on_host=on,
        host=s.str_("host", "127.0.0.1"),
        port=int(s.num("port", DEFAULT_PORT, lo=1, hi=65535, integer=True)),
        workers=s.auto_int("workers", lo=1, hi=256),
        max_connections=s.auto_int("max_connections", lo=1),
        history=int(s.num("history", 100, lo=0, integer=True)),
        max_message_bytes=int(s.num("max_message_bytes", 1 << 20, lo=1, integer=True)),
        publish_token=s.str_("publish_token"),
        ping_interval_s=s.num("ping_interval_s", None, above=0),
        url=s.str_("url"),
        publish_url=s.str_("publish_url"),
        command=s.str_("command"),
        health_url=s.str_("health_url"),
        match=s.str_("match"),
    )
    s.done(tuple(f.name for f in dataclasses.fields(ServerSpec)))
    if kind is ServerKind.EXTERNAL and not spec.url:
        raise s.err("url", "an external server needs the URL agents connect to", "add `url:`")
    if kind is ServerKind.LAB_COMET and (spec.url or spec.command):
        key = "url" if spec.url else "command"
        raise s.err(key, "only for `kind: external`", "remove it or set `kind: external`")
    return spec


def _agents(file: str, raw: Any, host_names: tuple[str, ...]) -> AgentsSpec:
    s = Section(file, "agents", raw)
    hosts = s.str_list("hosts") or ()
    for i, h in enumerate(hosts):
        if h not in host_names:
            raise s.err(
                f"hosts.{i}", f"no host named {h!r}", f"use one of: {', '.join(host_names)}"
            )
    procs = s.auto_int("procs", lo=1, hi=512)
    source_ips: tuple[str, ...] | None = None
    by_host: list[tuple[str, tuple[str, ...]]] = []
    raw_ips = s.raw("source_ips", "auto")
    if isinstance(raw_ips, Mapping):
        for h, v in raw_ips.items():
            if h not in host_names:
                raise s.err(
                    f"source_ips.{h}", "no such host", f"use one of: {', '.join(host_names)}"
                )
            text = ",".join(v) if isinstance(v, list) else str(v)
            by_host.append((str(h), expand_addresses(text, file, f"agents.source_ips.{h}")))
    elif raw_ips not in ("auto", None):
        text = ",".join(map(str, raw_ips)) if isinstance(raw_ips, list) else str(raw_ips)
        source_ips = expand_addresses(text, file, "agents.source_ips")
    nice = int(s.num("nice", 0, lo=0, hi=19, integer=True))
    s.done(("hosts", "procs", "source_ips", "nice"))
    return AgentsSpec(hosts, procs, source_ips, tuple(by_host), nice)


def _session(file: str, raw: Any) -> SessionSpec:
    s = Section(file, "session", raw)
    kind = s.enum_("kind", SessionKind, SessionKind.WEBSOCKET)
    single = s.str_("channel")
    many = s.str_list("channels") or ()
    channels = ((single,) if single else ()) + many
    by = s.enum_("subscribe_by", SubscribeBy, SubscribeBy.QUERY)
    s.done(("kind", "channel", "channels", "subscribe_by"))
    return SessionSpec(kind, channels, by)


PHASE_FORMS = (
    "{rate_per_s, until_connections}",
    "{rate_per_s, duration_s}",
    "{hold_s}",
    "{close_rate_per_s}",
    "{close: all}",
)


def _phase(file: str, key: str, raw: Any) -> Phase:
    s = Section(file, key, raw)
    keys = set(s.data)
    if keys == {"rate_per_s", "until_connections"}:
        return Phase(
            PhaseKind.RAMP,
            rate_per_s=s.num("rate_per_s", above=0, hi=1e7),
            until_connections=int(s.num("until_connections", lo=1, integer=True)),
        )
    if keys == {"rate_per_s", "duration_s"}:
        return Phase(
            PhaseKind.RATE,
            rate_per_s=s.num("rate_per_s", above=0, hi=1e7),
            duration_s=s.num("duration_s", above=0),
        )
    if keys == {"hold_s"}:
        return Phase(PhaseKind.HOLD, hold_s=s.num("hold_s", lo=0))
    if keys == {"close_rate_per_s"}:
        return Phase(PhaseKind.CLOSE, close_rate_per_s=s.num("close_rate_per_s", above=0))
    if keys == {"close"}:
        if s.raw("close") != "all":
            raise s.err("close", "only `close: all` is known", "or use `close_rate_per_s: N`")
        return Phase(PhaseKind.CLOSE)
    known = ("rate_per_s", "until_connections", "duration_s", "hold_s", "close_rate_per_s", "close")
    for k in keys:
        if k not in known:
            s.done(known)  # raises with a suggestion
    raise ExperimentError(
        file, key, f"keys {sorted(keys)} are not a phase", f"use one of: {' | '.join(PHASE_FORMS)}"
    )


def _phases(file: str, raw: Any) -> tuple[Phase, ...]:
    if not isinstance(raw, list) or not raw:
        raise ExperimentError(
            file, "phases", "expected a non-empty list", f"items: {' | '.join(PHASE_FORMS)}"
        )
    phases = tuple(_phase(file, f"phases.{i}", p) for i, p in enumerate(raw))
    if not any(p.kind in (PhaseKind.RAMP, PhaseKind.RATE) for p in phases):
        raise ExperimentError(file, "phases", "no phase opens connections", "add {rate_per_s, ...}")
    open_ = 0
    for i, p in enumerate(phases):
        if p.kind is PhaseKind.RAMP and (p.until_connections or 0) <= open_:
            raise ExperimentError(
                file,
                f"phases.{i}.until_connections",
                f"{p.until_connections} is not above the {open_} already open",
                f"use a value > {open_}",
            )
        open_ = peak_connections(phases[: i + 1]) if p.kind is not PhaseKind.CLOSE else 0
    return phases


def _publishing(file: str, raw: Any, channels: tuple[str, ...]) -> PublishingSpec | None:
    if raw is None:
        return None
    s = Section(file, "publishing", raw)
    channel = s.str_("channel", channels[0] if channels else "")
    if not channel:
        raise s.err(
            "channel", "publishing needs a channel", "set publishing.channel or session.channel"
        )
    spec = PublishingSpec(
        rate_per_s=s.num("rate_per_s", required=True, above=0, hi=1e6),
        count=int(s.num("count", required=True, lo=1, integer=True)),
        payload_bytes=int(s.num("payload_bytes", 64, lo=1, hi=1 << 24, integer=True)),
        channel=channel,
        start_after_s=s.num("start_after_s", 0.0, lo=0),
    )
    s.done(("rate_per_s", "count", "payload_bytes", "channel", "start_after_s"))
    return spec


def _monitor(file: str, raw: Any) -> MonitorSpec:
    s = Section(file, "monitor", raw)
    interval = s.num("interval_s", 1.0, lo=0.05, hi=60)
    match = s.str_list("match") or ()
    for i, m in enumerate(match):
        if "=" not in m:
            raise s.err(f"match.{i}", f"{m!r} is not ROLE=SUBSTRING", "e.g. server=nginx")
    s.done(("interval_s", "match"))
    return MonitorSpec(interval, match)


def _threshold(file: str, key: str, raw: Any) -> Threshold:
    if isinstance(raw, str):
        parts = raw.split()
        if len(parts) != 3:
            raise ExperimentError(file, key, f"{raw!r} is not 'metric op value'", "e.g. 'x >= 1'")
        import yaml

        raw = {"metric": parts[0], "op": parts[1], "value": yaml.safe_load(parts[2])}
    s = Section(file, key, raw)
    metric = s.str_("metric", required=True)
    known = SUMMARY_FIELDS + MORE_SUMMARY_FIELDS
    if metric not in known:
        close = difflib.get_close_matches(metric, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise s.err("metric", f"unknown summary field {metric!r}", f"{hint}see results/README.md")
    op = s.str_("op", required=True)
    if op not in THRESHOLD_OPS:
        raise s.err("op", f"unknown operator {op!r}", f"use one of: {' '.join(THRESHOLD_OPS)}")
    value = s.raw("value")
    if not isinstance(value, int | float):
        raise s.err("value", f"expected a number or boolean, got {kind_of(value)}")
    s.done(("metric", "op", "value"))
    return Threshold(metric, op, value)


TOP_KEYS = (
    "name",
    "description",
    "hosts",
    "server",
    "agents",
    "session",
    "phases",
    "arrival",
    "publishing",
    "monitor",
    "thresholds",
    "max_duration_s",
)


def experiment_from_dict(
    data: Any, file: str, *, hosts: tuple[HostSpec, ...] | None = None
) -> Experiment:
    """Validate raw experiment data (after overrides) into an Experiment."""
    s = Section(file, "", data)
    name = s.str_("name", Path(file).stem or "experiment")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise s.err("name", f"{name!r} must be letters, digits, - and _", "it names the run folder")
    description = s.str_("description", "")
    raw_hosts = s.raw("hosts")
    if hosts is None:
        if raw_hosts is None:
            hosts = (LOCAL,)
        elif isinstance(raw_hosts, str):
            hosts = load_inventory(_resolve_relative(Path(file), raw_hosts))
        else:
            hosts = hosts_from_data(file, "hosts", raw_hosts)
    names = tuple(h.name for h in hosts)
    server = _server(file, s.raw("server"), names)
    agents = _agents(file, s.raw("agents"), names)
    session = _session(file, s.raw("session"))
    if "phases" not in s.data:
        raise s.missing("phases", f"add a list of: {' | '.join(PHASE_FORMS)}")
    phases = _phases(file, s.raw("phases"))
    a = Section(file, "arrival", s.raw("arrival"))
    arrival = ArrivalSpec(
        a.enum_("kind", ArrivalKind, ArrivalKind.UNIFORM),
        int(a.num("seed", 1, lo=0, integer=True)),
    )
    a.done(("kind", "seed"))
    publishing = _publishing(file, s.raw("publishing"), session.channels)
    if publishing and session.channels and publishing.channel not in session.channels:
        raise ExperimentError(
            file,
            "publishing.channel",
            f"{publishing.channel!r} is not a session channel: nobody would receive it",
            f"use one of {list(session.channels)} or add it to session.channels",
        )
    monitor = _monitor(file, s.raw("monitor"))
    raw_t = s.raw("thresholds") or []
    if not isinstance(raw_t, list):
        raise s.err("thresholds", "expected a list of {metric, op, value}")
    thresholds = tuple(_threshold(file, f"thresholds.{i}", t) for i, t in enumerate(raw_t))
    estimate = estimated_duration_s(phases)
    if publishing:
        estimate = max(
            estimate, publishing.start_after_s + publishing.count / publishing.rate_per_s
        )
    default_max = math.ceil(estimate * 1.5 + 60)
    max_duration_s = float(s.num("max_duration_s", default_max, above=0))
    if max_duration_s < estimate:
        raise s.err(
            "max_duration_s",
            f"{max_duration_s:g} s is shorter than the phases need ({estimate:.0f} s)",
            f"raise it to at least {math.ceil(estimate * 1.2 + 10)}",
        )
    s.done(TOP_KEYS)
    return Experiment(
        name=name,
        path=file,
        description=description,
        hosts=hosts,
        server=server,
        agents=agents,
        session=session,
        phases=phases,
        arrival=arrival,
        publishing=publishing,
        monitor=monitor,
        thresholds=thresholds,
        max_duration_s=max_duration_s,
    )


def load_experiment(
    path: str | Path,
    overrides: Mapping[str, str] | None = None,
    *,
    inventory: str | Path | None = None,
) -> Experiment:
    """Read, override (dotted keys), and validate an experiment; ``inventory`` replaces its
    hosts. Raises ExperimentError naming the file, the key and the fix."""
    p = Path(path)
    data = read_yaml(p, "experiment")
    if data is None:
        data = {}
    if overrides:
        data = apply_overrides(data, overrides, str(p))
    hosts = load_inventory(inventory) if inventory else None
    try:
        return experiment_from_dict(data, str(p), hosts=hosts)
    except ExperimentError as exc:
        raise _blame_override(exc, overrides or {}) from None


def _blame_override(exc: ExperimentError, overrides: Mapping[str, str]) -> ExperimentError:
    """The error as the user made it: a value given with ``-p`` is named as that flag, not as
    the file (which may not even hold the key)."""
    for key, value in overrides.items():
        if exc.key == key or exc.key.startswith(key + "."):
            fix = exc.fix
            # the file's wording ("write `workers: auto`") as the flag's: "-p server.workers=auto"
            yaml_fix = re.fullmatch(r"write `([\w-]+): (.+)`", fix)
            if yaml_fix and exc.key.endswith(yaml_fix[1]):
                fix = f"give `-p {exc.key}={yaml_fix[2]}`"
            return ExperimentError(f"-p {key}={value}", exc.key, exc.problem, fix)
    return exc
