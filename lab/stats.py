"""Statistics of a run: pure functions over the Parquet tables of ``results/README.md``.

``load_tables(folder)`` (from ``lab.tables``) reads a results folder once;
``summarize(tables, run_record)`` computes the summary fields that ``run.json`` stores and the
thresholds judge; ``evaluate_thresholds(summary, thresholds)`` judges them. The ``*_frame``
functions compute the data every report figure draws, so ``lab.report`` only draws and
numbers and figures cannot disagree. Times in frames are ``elapsed_s``: seconds since the
run started (``run_start``).

Definitions (also in results/README.md):
- the ramp is the span of the connections' scheduled times; its whole seconds are counted from
  the first scheduled time; the achieved rate of a second is the connections that *connected*
  in it (``connections.parquet``), the planned rate those *scheduled* in it;
- bytes per connection of a role is the least-squares slope of the role's RSS (read every
  sample) against the open connections, over the monitor samples up to the first close,
  summed over hosts; kernel memory is ``tcp_mem_bytes + tcp_slab_bytes``;
- CPU per new connection of a role is its CPU time while connections were being opened,
  divided by the connections opened.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# re-exported: callers use lab.stats.load_tables / lab.stats.Tables
from lab.tables import TABLE_COLUMNS as TABLE_COLUMNS
from lab.tables import StatsError as StatsError
from lab.tables import Tables as Tables
from lab.tables import empty_table as empty_table
from lab.tables import load_tables as load_tables

ROLES = ("server", "agent", "monitor")
# Scheduled times are start + i / rate: a time computed to land on a second's boundary may
# come out a hair below it; bin with this tolerance (well above float64 unix-time resolution).
EPSILON_S = 1e-6


def histogram_ms(tables: Tables, metric: str) -> tuple[float | None, float | None, float | None]:
    """p50, p99 and max in ms of a merged latency histogram (None when it is empty)."""
    from lab.histogram import Histogram

    rows = tables.histograms[tables.histograms["metric"] == metric]
    if rows.empty:
        return None, None, None
    hist = Histogram("us")
    for index, count in zip(rows["index"], rows["count"], strict=True):
        hist.counts[int(index)] = hist.counts.get(int(index), 0) + int(count)
        hist.total += int(count)
    values = (hist.percentile(50.0), hist.percentile(99.0), hist.max())
    p50, p99, top = (None if v is None else v / 1000.0 for v in values)
    return p50, p99, top


# ---------------------------------------------------------------- time and connections


def run_start(tables: Tables) -> float:
    """The time origin of the figures: ``run.json: started``, else the earliest timestamp."""
    started = tables.run.get("started")
    if isinstance(started, int | float) and started > 0:
        return float(started)
    candidates = [
        frame["t"].min()
        for frame in (tables.agent, tables.server, tables.monitor_host, tables.monitor_procs)
        if len(frame)
    ]
    if len(tables.connections):
        candidates.append(tables.connections["scheduled"].min())
    finite = [float(c) for c in candidates if pd.notna(c)]
    return min(finite) if finite else 0.0


def _times(frame: pd.DataFrame, column: str) -> np.ndarray:
    return np.sort(frame[column].dropna().to_numpy(dtype="float64"))


def open_connections_at(tables: Tables, times: Iterable[float]) -> np.ndarray:
    """Connections open at each time: from the per-connection records when there are any,
    else the agents' per-second ``open`` summed over agents (linearly interpolated)."""
    ts = np.asarray(list(times), dtype="float64")
    conns = tables.connections
    if len(conns) and conns["connected"].notna().any():
        connected = conns[conns["connected"].notna()]
        up = _times(connected, "connected")
        down = _times(connected, "closed")
        return (np.searchsorted(up, ts, "right") - np.searchsorted(down, ts, "right")).astype(
            "float64"
        )
    total = _agent_total(tables.agent, "open")
    if total.empty:
        return np.zeros_like(ts)
    return np.interp(ts, total.index.to_numpy(dtype="float64"), total.to_numpy("float64"))


def _agent_total(agent: pd.DataFrame, column: str) -> pd.Series:
    """A cumulative/level column of the agents summed over agents per whole second (agents
    that have not reported in a second keep their last value)."""
    if agent.empty:
        return pd.Series(dtype="float64")
    frame = agent.assign(sec=np.floor(agent["t"].astype("float64")))
    wide = frame.pivot_table(index="sec", columns="agent", values=column, aggfunc="last")
    return wide.sort_index().ffill().fillna(0).sum(axis=1)


def peak_connections(tables: Tables) -> int | None:
    """The most connections open at once (records; else the agents' summed ``open``); None
    when no agent reported anything."""
    conns = tables.connections
    if len(conns) and conns["connected"].notna().any():
        connected = conns[conns["connected"].notna()]
        up = connected["connected"].to_numpy("float64")
        down = connected["closed"].dropna().to_numpy("float64")
        times = np.concatenate([up, down])
        steps = np.concatenate([np.ones(len(up)), -np.ones(len(down))])
        order = np.lexsort((steps, times))  # a close before an open at the same instant
        return int(max(0.0, np.cumsum(steps[order]).max()))
    total = _agent_total(tables.agent, "open")
    return int(total.max()) if len(total) else None


# ---------------------------------------------------------------- the ramp


@dataclass(frozen=True, slots=True)
class Ramp:
    """When connections were scheduled: ``start``/``end`` (unix s) and the whole seconds."""

    start: float
    end: float
    whole_seconds: int


def ramp_of(tables: Tables) -> Ramp | None:
    """The span of the scheduled times (None without per-connection records)."""
    sched = tables.connections["scheduled"].dropna()
    if sched.empty:
        return None
    start, end = float(sched.min()), float(sched.max())
    return Ramp(start, end, math.floor(end - start + EPSILON_S))


def rate_frame(tables: Tables) -> pd.DataFrame:
    """New connections per second of the ramp, planned vs achieved, with the schedule lag.

    Columns: second (since the ramp start), elapsed_s, planned, started, achieved, lag_ms_mean,
    lag_ms_max (started − scheduled of the connections scheduled in that second), whole (the
    second lies entirely inside the ramp). From the agents' per-second stream when there are
    no per-connection records (then ``whole`` is False throughout)."""
    columns = ["second", "elapsed_s", "planned", "started", "achieved", "lag_ms_mean"]
    columns += ["lag_ms_max", "whole"]
    ramp = ramp_of(tables)
    origin = run_start(tables)
    if ramp is None:
        return _rate_from_agents(tables, origin, columns)
    conns = tables.connections
    seconds = math.floor(max(ramp.end, conns["connected"].max(skipna=True) or ramp.end))
    n = max(1, seconds - math.floor(ramp.start) + 2)

    def per_second(column: str) -> np.ndarray:
        values = conns[column].dropna().to_numpy("float64")
        k = np.floor(values - ramp.start + EPSILON_S).astype("int64")
        return np.bincount(k[(k >= 0) & (k < n)], minlength=n)

    sched = conns["scheduled"].to_numpy("float64")
    lag_ms = (conns["started"].to_numpy("float64") - sched) * 1000.0
    k = np.floor(sched - ramp.start + EPSILON_S).astype("int64")
    lag = pd.DataFrame({"k": k, "lag": lag_ms}).dropna().groupby("k")["lag"].agg(["mean", "max"])
    frame = pd.DataFrame({"second": np.arange(n)})
    frame["elapsed_s"] = ramp.start - origin + frame["second"]
    frame["planned"] = per_second("scheduled")
    frame["started"] = per_second("started")
    ok = conns[conns["outcome"] == "ok"] if conns["outcome"].notna().any() else conns
    values = ok["connected"].dropna().to_numpy("float64")
    kk = np.floor(values - ramp.start + EPSILON_S).astype("int64")
    frame["achieved"] = np.bincount(kk[(kk >= 0) & (kk < n)], minlength=n)
    frame["lag_ms_mean"] = frame["second"].map(lag["mean"])
    frame["lag_ms_max"] = frame["second"].map(lag["max"])
    frame["whole"] = (frame["second"] < ramp.whole_seconds) & (frame["planned"] > 0)
    # a run stopped early (interrupted, max_duration): only the seconds that ended before the
    # first connection it never started count; the rest were cut short by the stop, not slow
    unstarted = conns.loc[conns["outcome"] == "not_started", "scheduled"].dropna()
    if len(unstarted):
        cut = math.floor(float(unstarted.min()) - ramp.start + EPSILON_S)
        frame["whole"] &= frame["second"] < cut
    # trim trailing seconds after the last event
    busy = frame[(frame["planned"] > 0) | (frame["achieved"] > 0) | (frame["started"] > 0)]
    last = int(busy["second"].max()) if len(busy) else 0
    return frame[frame["second"] <= last].reset_index(drop=True)[columns]


def _rate_from_agents(tables: Tables, origin: float, columns: list[str]) -> pd.DataFrame:
    planned = _agent_total(tables.agent, "planned").diff().fillna(0)
    if planned.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    started = _agent_total(tables.agent, "started").diff().fillna(0)
    achieved = _agent_total(tables.agent, "connected").diff().fillna(0)
    lag = tables.agent.assign(sec=np.floor(tables.agent["t"])).groupby("sec")["lag_ms"]
    frame = pd.DataFrame({"planned": planned, "started": started, "achieved": achieved})
    frame["lag_ms_mean"] = lag.mean()
    frame["lag_ms_max"] = lag.max()
    frame["elapsed_s"] = frame.index.to_numpy("float64") - origin
    frame["second"] = np.arange(len(frame))
    frame["whole"] = False
    return frame.reset_index(drop=True)[columns]


# ---------------------------------------------------------------- memory and CPU per role


def own_procs(tables: Tables) -> pd.DataFrame:
    """The monitor's process rows that belong to this run: for a role whose process ids are
    known on a host (server workers from ``server.parquet``, agent processes from the agents'
    streams), only those; other rows as they are. (A monitor matches every lab process on its
    host, including other runs' on a shared machine.)"""
    procs = tables.monitor_procs
    if procs.empty or tables.pids.empty:
        return procs
    known = {
        (str(h), str(r)): set(g["pid"].astype("int64"))
        for (h, r), g in tables.pids.groupby(["host", "role"])
    }

    def mine(row_host: Any, row_role: Any, pid: Any) -> bool:
        pids = known.get((str(row_host), str(row_role)))
        return pids is None or (pd.notna(pid) and int(pid) in pids)

    keep = [
        mine(h, r, p) for h, r, p in zip(procs["host"], procs["role"], procs["pid"], strict=True)
    ]
    return procs[np.asarray(keep, dtype=bool)]


def _proc_memory(procs: pd.DataFrame) -> pd.Series:
    """Memory of each process row: its USS, gaps filled from the same process's neighbouring
    samples (so a missed USS reading does not swap in RSS for a second); RSS for a process
    with no USS at all."""
    uss = procs["uss"].astype("float64").where(lambda v: v > 0)
    keys = [procs["host"].astype(str), procs["pid"].astype("float64")]
    filled = uss.groupby(keys, dropna=False).transform(lambda v: v.ffill().bfill())
    return filled.fillna(procs["rss"].astype("float64"))


def memory_frame(tables: Tables) -> pd.DataFrame:
    """Memory over time per host and series: each role's processes, ``system used`` and
    ``kernel tcp``. Columns: elapsed_s, t, host, series, bytes (roles: USS, the memory that is
    the process's own), fit_bytes (roles: RSS, read every sample — the monitor reads USS only
    now and then to stay within its CPU budget, and new per-connection pages count in both;
    host series: as bytes), connections (open at that time)."""
    origin = run_start(tables)
    parts = []
    procs = own_procs(tables).sort_values("t", kind="stable")
    if len(procs):
        mem = procs.assign(bytes=_proc_memory(procs), fit_bytes=procs["rss"].astype("float64"))
        by_role = mem.groupby(["t", "host", "role"])[["bytes", "fit_bytes"]].sum().reset_index()
        parts.append(by_role.rename(columns={"role": "series"}))
    host = tables.monitor_host
    if len(host):
        used = host["mem_used"].astype("float64")
        kernel = host["tcp_mem_bytes"].fillna(0) + host["tcp_slab_bytes"].fillna(0)
        for series, values in (("system used", used), ("kernel tcp", kernel)):
            part = host[["t", "host"]].assign(series=series, bytes=values, fit_bytes=values)
            parts.append(part)
    columns = ["elapsed_s", "t", "host", "series", "bytes", "fit_bytes", "connections"]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    frame = pd.concat(parts, ignore_index=True).sort_values("t", kind="stable")
    frame["elapsed_s"] = frame["t"] - origin
    frame["connections"] = open_connections_at(tables, frame["t"])
    return frame[columns].reset_index(drop=True)


@dataclass(frozen=True, slots=True)
class MemoryFit:
    """Memory of one series against open connections: ``bytes = intercept + slope × conns``,
    fitted per host over the samples up to the first close and summed over hosts."""

    series: str
    bytes_per_conn: float | None
    intercept_bytes: float
    samples: int
    until_t: float  # the last sample time used (the first close)


def fit_window_end(tables: Tables) -> float:
    """The last time used for the memory fits: the first close, else forever."""
    closed = tables.connections["closed"].dropna()
    return float(closed.min()) if len(closed) else math.inf


def memory_fits(tables: Tables, memory: pd.DataFrame | None = None) -> dict[str, MemoryFit]:
    """Bytes per connection of every series of ``memory_frame`` (server, agent, kernel tcp…)."""
    memory = memory_frame(tables) if memory is None else memory
    until = fit_window_end(tables)
    window = memory[memory["t"] <= until]
    fits: dict[str, MemoryFit] = {}
    for series, rows in window.groupby("series"):
        slope_sum, intercept_sum, usable, n = 0.0, 0.0, False, 0
        for _, host_rows in rows.groupby("host"):
            x = host_rows["connections"].to_numpy("float64")
            y = host_rows["fit_bytes"].to_numpy("float64")
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            n += len(x)
            if len(x) < 2 or x.max() - x.min() < 1:
                continue
            slope, intercept = np.polyfit(x, y, 1)
            slope_sum += float(slope)
            intercept_sum += float(intercept)
            usable = True
        name = str(series)
        fits[name] = MemoryFit(name, slope_sum if usable else None, intercept_sum, n, until)
    return fits


def cpu_role_frame(tables: Tables) -> pd.DataFrame:
    """CPU per role over time: columns elapsed_s, t, host, role, cpu_percent (% of one core,
    summed over the role's processes on the host)."""
    procs = own_procs(tables)
    if procs.empty:
        cols = ["elapsed_s", "t", "host", "role", "cpu_percent"]
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    frame = procs.groupby(["t", "host", "role"])["cpu_percent"].sum().reset_index()
    frame.insert(0, "elapsed_s", frame["t"] - run_start(tables))
    return frame


def cpu_core_frame(tables: Tables) -> pd.DataFrame:
    """CPU per core over time: columns elapsed_s, t, host, core, cpu_percent."""
    frame = tables.monitor_cpu.copy()
    frame.insert(0, "elapsed_s", frame["t"] - run_start(tables))
    return frame


def cpu_seconds_by_role(tables: Tables, start: float, end: float) -> dict[str, float]:
    """CPU seconds each role used in (start, end]: cpu_percent × the sample interval."""
    procs = own_procs(tables)
    if procs.empty:
        return {}
    out: dict[str, float] = {}
    for _, rows in procs.groupby("host"):
        stamps = np.sort(rows["t"].unique())
        step = float(np.median(np.diff(stamps))) if len(stamps) > 1 else 1.0
        dt = pd.Series(np.diff(stamps, prepend=stamps[0] - step), index=stamps)
        inside = rows[(rows["t"] > start) & (rows["t"] <= end)]
        seconds = inside["cpu_percent"].astype("float64") / 100.0 * inside["t"].map(dt)
        for role, value in seconds.groupby(inside["role"]).sum().items():
            out[str(role)] = out.get(str(role), 0.0) + float(value)
    return out


# ---------------------------------------------------------------- other per-figure frames


def connections_frame(tables: Tables) -> pd.DataFrame:
    """Simultaneous connections over time: columns elapsed_s, series (each agent, ``total``,
    ``server online``), connections. From the per-second streams."""
    origin = run_start(tables)
    parts = []
    agent = tables.agent
    if len(agent):
        per_agent = agent[["t", "agent", "open"]].rename(
            columns={"agent": "series", "open": "connections"}
        )
        per_agent["series"] = per_agent["series"].astype(str)
        total = _agent_total(agent, "open")
        # drawn at the latest report summed in each second, not at the second's start (which
        # would put the total up to a second before the agents' own lines)
        when = agent.groupby(np.floor(agent["t"].astype("float64")))["t"].max()
        parts += [
            per_agent,
            pd.DataFrame(
                {
                    "t": when.reindex(total.index).to_numpy(),
                    "series": "total",
                    "connections": total.to_numpy(),
                }
            ),
        ]
    server = tables.server
    if len(server):
        by_sec = server.groupby(np.floor(server["t"].astype("float64")))
        online, when = by_sec["online"].sum(), by_sec["t"].max()
        parts.append(
            pd.DataFrame(
                {"t": when.to_numpy(), "series": "server online", "connections": online.to_numpy()}
            )
        )
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64") for c in ("elapsed_s", "series", "connections")}
        )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(0, "elapsed_s", frame["t"].astype("float64") - origin)
    return frame.drop(columns="t").reset_index(drop=True)


def messages_frame(tables: Tables) -> pd.DataFrame:
    """Messages per second over time, summed over the agents: elapsed_s, series (``received``:
    delivered envelopes; ``sent``: what the agents sent, publishes included), per_s."""
    agent = tables.agent
    parts = []
    for column, series in (("msgs_in", "received"), ("msgs_out", "sent")):
        if agent.empty or agent[column].isna().all():
            continue
        total = _agent_total(agent, column)
        per_s = total.diff().fillna(total).clip(lower=0)
        parts.append(
            pd.DataFrame(
                {"elapsed_s": total.index - run_start(tables), "series": series, "per_s": per_s}
            )
        )
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64") for c in ("elapsed_s", "series", "per_s")}
        )
    return pd.concat(parts, ignore_index=True)


def fanout_frame(tables: Tables) -> pd.DataFrame:
    """Each broadcast's fan-out on the server: fanout_id (the message's id on its channel),
    fanout_ms (the slowest worker's time to write it to all its subscribers), subscribers
    (summed over the workers), from the workers' lines (``fanout_id`` names the message)."""
    server = tables.server
    if server.empty or server["fanout_id"].isna().all():
        return pd.DataFrame(
            {c: pd.Series(dtype="float64") for c in ("fanout_id", "fanout_ms", "subscribers")}
        )
    rows = server[server["fanout_id"].fillna(0) > 0]
    keys = ["host", "worker", "fanout_id"]
    last = rows.sort_values("t").groupby(keys, as_index=False).last()
    out = last.groupby("fanout_id").agg(
        fanout_ms=("fanout_ms", "max"), subscribers=("fanout_subscribers", "sum")
    )
    return out.reset_index().astype({"fanout_id": "int64"})


def sockets_frame(tables: Tables) -> pd.DataFrame:
    """Sockets and open files over time: elapsed_s, host, series, count. The host's TCP
    sockets in use, in TIME_WAIT and orphaned (/proc/net/sockstat: in use and TIME_WAIT are
    the host's network namespace, orphans the whole kernel's), and open files per role."""
    origin = run_start(tables)
    parts = []
    mon = tables.monitor_host
    for column, series in (
        ("tcp_inuse", "TCP in use"),
        ("tcp_tw", "TCP TIME_WAIT"),
        ("tcp_orphan", "TCP orphaned"),
    ):
        if len(mon) and mon[column].notna().any():
            parts.append(
                pd.DataFrame(
                    {
                        "elapsed_s": mon["t"].astype("float64") - origin,
                        "host": mon["host"].astype(str),
                        "series": series,
                        "count": mon[column].astype("float64"),
                    }
                )
            )
    procs = tables.monitor_procs
    if len(procs) and procs["num_fds"].notna().any():
        fds = procs.groupby(["t", "host", "role"], as_index=False)["num_fds"].sum()
        parts.append(
            pd.DataFrame(
                {
                    "elapsed_s": fds["t"].astype("float64") - origin,
                    "host": fds["host"].astype(str),
                    "series": "open files: " + fds["role"].astype(str),
                    "count": fds["num_fds"].astype("float64"),
                }
            )
        )
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64") for c in ("elapsed_s", "host", "series", "count")}
        )
    return pd.concat(parts, ignore_index=True)


def process_memory_frame(tables: Tables) -> pd.DataFrame:
    """Memory per process of the run over time (USS): elapsed_s, process (``<role> <pid>``,
    host-prefixed when there are several hosts), bytes. One worker that grows apart from the
    others (a leak, an uneven share) shows here, not in the per-role sums."""
    procs = own_procs(tables)
    cols = ("elapsed_s", "process", "bytes")
    if procs.empty or procs["uss"].isna().all():
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    procs = procs[procs["uss"].notna()]
    several = procs["host"].nunique() > 1
    name = procs["role"].astype(str) + " " + procs["pid"].astype("int64").astype(str)
    if several:
        name = procs["host"].astype(str) + ": " + name
    return pd.DataFrame(
        {
            "elapsed_s": procs["t"].astype("float64") - run_start(tables),
            "process": name,
            "bytes": procs["uss"].astype("float64"),
        }
    ).reset_index(drop=True)


def server_console_frame(tables: Tables) -> pd.DataFrame:
    """The server console per worker: elapsed_s, worker, pid, online, events (so far), pcs
    (events in the last second), restarts."""
    server = tables.server
    frame = server[["t", "worker", "pid", "online", "events", "pcs", "restarts"]].copy()
    frame.insert(0, "elapsed_s", frame["t"] - run_start(tables))
    return frame.drop(columns="t").reset_index(drop=True)


def latency_frame(tables: Tables) -> pd.DataFrame:
    """Connect latency (from the scheduled time) per second of connecting: elapsed_s,
    p50_ms, p99_ms, max_ms, count. From the records, else the agents' per-second figures."""
    origin = run_start(tables)
    conns = tables.connections
    ok = conns[(conns["outcome"] == "ok") & conns["connected"].notna()]
    if len(ok):
        sec = np.floor(ok["connected"].astype("float64") - origin)
        grouped = ok["connect_ms"].astype("float64").groupby(sec)
        frame = pd.DataFrame(
            {
                "p50_ms": grouped.quantile(0.5),
                "p99_ms": grouped.quantile(0.99),
                "max_ms": grouped.max(),
                "count": grouped.size(),
            }
        )
        return frame.rename_axis("elapsed_s").reset_index()
    return _agent_percentiles(tables, "connect", origin)


def delivery_frame(tables: Tables, metric: str = "delivery") -> pd.DataFrame:
    """Delivery latency per second: elapsed_s, p50_ms, p99_ms, max_ms, count (messages).
    ``metric``: ``delivery`` (arrival at the agent host's socket, the kernel's receive time)
    or ``read`` (when the agent process read it)."""
    return _agent_percentiles(tables, metric, run_start(tables))


def _agent_percentiles(tables: Tables, metric: str, origin: float) -> pd.DataFrame:
    agent = tables.agent.sort_values("t", kind="stable")
    cols = ["elapsed_s", "p50_ms", "p99_ms", "max_ms", "count"]
    if agent.empty or agent[f"{metric}_p50_ms"].isna().all():
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    counter = "connected" if metric == "connect" else "msgs_in"
    count = agent.groupby("agent")[counter].diff().fillna(agent[counter]).clip(lower=0)
    frame = agent.assign(sec=np.floor(agent["t"] - origin), count=count)
    frame = frame[frame[f"{metric}_p50_ms"].notna()]
    grouped = frame.groupby("sec")
    out = pd.DataFrame(
        {
            "p50_ms": grouped[f"{metric}_p50_ms"].median(),
            "p99_ms": grouped[f"{metric}_p99_ms"].max(),
            "max_ms": grouped[f"{metric}_max_ms"].max(),
            "count": grouped["count"].sum(),
        }
    )
    return out.rename_axis("elapsed_s").reset_index()[cols]


# Per-connection outcomes that are not errors: never started (the run ended first), or still
# connecting when the run was interrupted (``pending``, counted in ``connections_pending``).
NOT_ERRORS = ("ok", "not_started", "pending")


def errors_frame(tables: Tables) -> pd.DataFrame:
    """Connect errors by reason per second: elapsed_s, reason, errors. From the agents'
    cumulative ``failed_<reason>`` counters (the per-connection outcomes when there are none)."""
    origin = run_start(tables)
    agent = tables.agent.sort_values("t", kind="stable")
    columns = [c for c in agent.columns if c.startswith("failed_")]
    if len(agent) and columns:
        diffs = agent.groupby("agent")[columns].diff().fillna(agent[columns]).clip(lower=0)
        diffs["elapsed_s"] = np.floor(agent["t"] - origin)
        long = diffs.melt(id_vars="elapsed_s", var_name="reason", value_name="errors")
        long["reason"] = long["reason"].str.removeprefix("failed_")
    else:
        conns = tables.connections
        failed = ~conns["outcome"].isin(NOT_ERRORS) & conns["outcome"].notna()
        bad = conns[failed & conns["connected"].isna()]  # never up: not a drop
        when = bad["started"].fillna(bad["scheduled"]).astype("float64")
        long = pd.DataFrame(
            {"elapsed_s": np.floor(when - origin), "reason": bad["outcome"], "errors": 1.0}
        )
    long = long.groupby(["elapsed_s", "reason"])["errors"].sum().reset_index()
    return long[long["errors"] > 0].reset_index(drop=True)


def errors_by_reason(tables: Tables) -> dict[str, int]:
    """Connect errors per reason over the whole run."""
    frame = errors_frame(tables)
    return {str(k): int(v) for k, v in frame.groupby("reason")["errors"].sum().items()}


# ---------------------------------------------------------------- the summary


def _quantiles(values: pd.Series) -> tuple[float | None, float | None, float | None]:
    clean = values.dropna().astype("float64")
    if clean.empty:
        return None, None, None
    p50, p99 = np.percentile(clean, [50, 99])
    return float(p50), float(p99), float(clean.max())


def _last_per_agent(agent: pd.DataFrame, column: str) -> int | None:
    """The agents' last value of a counter, summed over agents; None when none reported it
    (a run with no agent data measured nothing: it must not read as zero errors; nor does a
    run recorded before the counter existed, whose column ``load_tables`` fills with
    missing values)."""
    if agent.empty or agent[column].isna().all():
        return None
    return int(agent.sort_values("t").groupby("agent")[column].last().fillna(0).sum())


def summarize(tables: Tables, run_record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary fields of ``run.json`` (results/README.md), plus the per-role CPU ones.

    ``run_record`` is the run's record (``tables.run`` when None); only its hosts and times
    are used. Values that cannot be measured from the data are None."""
    record = tables.run if run_record is None else run_record
    conns = tables.connections
    has_records = bool(len(conns)) and conns["scheduled"].notna().any()
    summary: dict[str, Any] = {"peak_connections": peak_connections(tables)}

    if has_records:
        outcomes = conns["outcome"].astype("string")
        bad = outcomes.notna() & ~outcomes.isin(NOT_ERRORS)
        up = conns["connected"].notna()
        # a connection cut after it was up (a dying worker, a reset) did connect: a drop
        summary["connect_errors"] = int((bad & ~up).sum())
        summary["connections_dropped"] = int((bad & up).sum())
        summary["connections_pending"] = int((outcomes == "pending").sum())
        summary["planned_connections"] = len(conns)
    else:
        failed = [c for c in tables.agent.columns if c.startswith("failed_")]
        counts = [n for c in failed if (n := _last_per_agent(tables.agent, c)) is not None]
        summary["connect_errors"] = sum(counts) if len(tables.agent) else None
        summary["connections_dropped"] = _last_per_agent(tables.agent, "dropped")
        summary["connections_pending"] = None  # only the per-connection records tell
        summary["planned_connections"] = _last_per_agent(tables.agent, "planned")

    rates = rate_frame(tables)
    ramp = ramp_of(tables)
    whole = rates[rates["whole"].astype(bool)] if len(rates) else rates
    if ramp is not None:
        ok = conns[(conns["outcome"] == "ok") & conns["connected"].notna()]
        span = float(ok["connected"].max() - ramp.start) if len(ok) else 0.0
        summary["ramp_rate_mean_per_s"] = len(ok) / span if span > 0 else None
        planned_span = ramp.end - ramp.start
        summary["ramp_rate_planned_per_s"] = len(conns) / planned_span if planned_span else None
        summary["ramp_s"] = planned_span
    else:
        achieved = rates[rates["achieved"] > 0]["achieved"] if len(rates) else pd.Series()
        summary["ramp_rate_mean_per_s"] = float(achieved.mean()) if len(achieved) else None
        summary["ramp_rate_planned_per_s"] = None
        summary["ramp_s"] = None
    summary["ramp_rate_min_per_s"] = float(whole["achieved"].min()) if len(whole) else None
    summary["ramp_whole_seconds"] = len(whole) if len(rates) else None
    summary["schedule_lag_ms_max"] = (
        float(rates["lag_ms_max"].max()) if len(rates) and rates["lag_ms_max"].notna().any()
        else None
    )  # fmt: skip
    summary["hold_s"] = _hold_seconds(tables, summary["peak_connections"] or 0)

    memory = memory_frame(tables)
    fits = memory_fits(tables, memory)
    for series, key in (("server", "server"), ("agent", "agent"), ("kernel tcp", "kernel")):
        fit = fits.get(series)
        summary[f"{key}_bytes_per_conn"] = fit.bytes_per_conn if fit else None

    if has_records:
        ok = conns[(conns["outcome"] == "ok")]
        p50, p99, top = _quantiles(ok["connect_ms"])
    else:
        lat = _agent_percentiles(tables, "connect", 0.0)
        p50, p99, top = _overall_from_seconds(lat)
    summary.update(connect_ms_p50=p50, connect_ms_p99=p99, connect_ms_max=top)
    p50, p99, top = histogram_ms(tables, "delivery")
    if p50 is None:
        p50, p99, top = _overall_from_seconds(delivery_frame(tables))
    summary.update(delivery_ms_p50=p50, delivery_ms_p99=p99, delivery_ms_max=top)
    p50, p99, top = histogram_ms(tables, "read")
    if p50 is None and "read_p50_ms" in tables.agent:
        p50, p99, top = _overall_from_seconds(delivery_frame(tables, "read"))
    summary.update(read_ms_p50=p50, read_ms_p99=p99, read_ms_max=top)
    summary["messages_lost"] = _last_per_agent(tables.agent, "lost")
    summary["messages_received"] = _last_per_agent(tables.agent, "msgs_in")
    # followed in their read by later bytes of the connection: no arrival time of their own
    summary["messages_untimed"] = _last_per_agent(tables.agent, "untimed")
    sat = tables.agent["saturated"]
    summary["agent_saturated"] = bool(sat.fillna(False).astype(bool).any()) if len(sat) else None

    summary["server_restarts"] = server_restarts(tables)
    summary.update(_cpu_summary(tables, ramp))
    summary["errors_by_reason"] = errors_by_reason(tables)
    summary.update(planned_from_record(record))
    return summary


def server_restarts(tables: Tables) -> int | None:
    """Server workers restarted during the run (each died: a crash, or a kill), summed over
    the workers; None without lines from a lab.comet server."""
    server = tables.server
    if server.empty or server["restarts"].isna().all():
        return None
    return int(server.groupby(["host", "worker"], dropna=False)["restarts"].max().fillna(0).sum())


def planned_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the experiment planned (``run.json: experiment.resolved.phases``): peak
    connections, the fastest opening rate and the hold time. None where it says nothing."""
    resolved = (record.get("experiment") or {}).get("resolved") or {}
    phases = [p for p in resolved.get("phases") or [] if isinstance(p, Mapping)]
    open_, peak, rate, hold = 0.0, 0.0, None, None
    for phase in phases:
        kind = phase.get("kind")
        if kind == "ramp":
            open_ = max(open_, float(phase.get("until_connections") or 0))
        elif kind == "rate":
            open_ += float(phase.get("rate_per_s") or 0) * float(phase.get("duration_s") or 0)
        elif kind == "close":
            peak, open_ = max(peak, open_), 0.0
        elif kind == "hold":
            hold = (hold or 0.0) + float(phase.get("hold_s") or 0)
        if kind in ("ramp", "rate") and phase.get("rate_per_s"):
            rate = max(rate or 0.0, float(phase["rate_per_s"]))
        peak = max(peak, open_)
    return {
        "planned_peak_connections": round(peak) if phases else None,
        "planned_rate_per_s": rate,
        "planned_hold_s": hold,
    }


def _overall_from_seconds(frame: pd.DataFrame) -> tuple[float | None, float | None, float | None]:
    """Whole-run percentiles from per-second ones: p50 the count-weighted median of the
    per-second medians, p99 the worst per-second p99 (an upper bound), max the maximum."""
    if frame.empty or frame["p50_ms"].isna().all():
        return None, None, None
    rows = frame.dropna(subset=["p50_ms"]).sort_values("p50_ms")
    weights = rows["count"].fillna(0).clip(lower=0).to_numpy("float64")
    if weights.sum() <= 0:
        weights = np.ones(len(rows))
    cumulative = np.cumsum(weights) / weights.sum()
    p50 = float(rows["p50_ms"].to_numpy("float64")[np.searchsorted(cumulative, 0.5)])
    return p50, float(rows["p99_ms"].max()), float(rows["max_ms"].max())


def _hold_seconds(tables: Tables, peak: int) -> float | None:
    """How long at least 99% of the peak stayed open (per-connection records only)."""
    conns = tables.connections
    if peak <= 0 or conns.empty or conns["connected"].isna().all():
        return None
    up = _times(conns[conns["connected"].notna()], "connected")
    down = _times(conns[conns["connected"].notna()], "closed")
    times = np.unique(np.concatenate([up, down]))
    level = np.searchsorted(up, times, "right") - np.searchsorted(down, times, "right")
    above = level >= 0.99 * peak
    if not above.any():
        return 0.0
    first = times[np.argmax(above)]
    after = np.nonzero(~above & (times > first))[0]
    last = times[after[0]] if len(after) else times[-1]
    return float(last - first)


def _cpu_summary(tables: Tables, ramp: Ramp | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu = cpu_role_frame(tables)
    for role in ROLES:
        rows = cpu[cpu["role"] == role]
        per_t = rows.groupby("t")["cpu_percent"].sum()
        out[f"{role}_cpu_percent_mean"] = float(per_t.mean()) if len(per_t) else None
        out[f"{role}_cpu_percent_max"] = float(per_t.max()) if len(per_t) else None
        out[f"{role}_cpu_us_per_conn"] = None
    conns = tables.connections
    if ramp is None or conns["connected"].isna().all():
        return out
    end = float(conns["connected"].max()) + 1.0
    opened = int(conns["connected"].between(ramp.start, end).sum())
    if opened <= 0:
        return out
    for role, seconds in cpu_seconds_by_role(tables, ramp.start, end).items():
        out[f"{role}_cpu_us_per_conn"] = seconds / opened * 1e6
    return out


# ---------------------------------------------------------------- thresholds

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def _field(threshold: Any, name: str) -> Any:
    if isinstance(threshold, Mapping):
        return threshold[name]
    return getattr(threshold, name)


def evaluate_thresholds(summary: Mapping[str, Any], thresholds: Iterable[Any]) -> list[dict]:
    """Judge each threshold (objects or mappings with name, op, value) against the summary:
    one dict per threshold with name, op, value, actual, passed (False when not measured)."""
    results: list[dict[str, Any]] = []
    for threshold in thresholds:
        name, op, value = (_field(threshold, k) for k in ("name", "op", "value"))
        if op not in OPERATORS:
            raise StatsError(
                f"threshold {name!r}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}"
            )
        if name not in summary:
            known = ", ".join(sorted(k for k, v in summary.items() if not isinstance(v, dict)))
            raise StatsError(f"threshold {name!r} is not a summary field; use one of: {known}")
        actual = summary[name]
        passed = actual is not None and bool(OPERATORS[op](actual, value))
        results.append({"name": name, "op": op, "value": value, "actual": actual, "passed": passed})
    return results
