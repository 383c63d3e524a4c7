"""The report's tables: one run's summary (planned vs achieved, thresholds), several runs side
by side (ratios to the first run, warnings when their hosts differ), and the environment
(hosts, versions, sysctls, limits).

Pure functions over ``lab.stats.summarize`` output and ``run.json`` records; ``lab.report``
draws the frames they return as tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

# sysctls whose difference makes two runs incomparable
KEY_SYSCTLS = (
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "fs.file-max",
    "net.ipv4.tcp_mem",
    "net.core.rmem_default",
    "net.core.wmem_default",
)


def summary_rows(
    summary: Mapping[str, Any], thresholds: Iterable[Mapping[str, Any]] = ()
) -> pd.DataFrame:
    """The report's summary table: one row per figure with planned, achieved, unit and the
    threshold verdicts (``evaluate_thresholds`` output) on it."""
    verdicts: dict[str, list[Mapping[str, Any]]] = {}
    for verdict in thresholds:
        verdicts.setdefault(str(verdict["name"]), []).append(verdict)

    def judged(key: str) -> str:
        return "; ".join(
            f"{'PASS' if v['passed'] else 'FAIL'} ({v['op']} {v['value']})"
            for v in verdicts.get(key, [])
        )

    rows = []
    for key, planned_key, label, unit, scale in SUMMARY_LAYOUT:
        planned = summary.get(planned_key) if planned_key else None
        rows.append(
            {
                "figure": label,
                "planned": "" if planned is None else _format(planned, scale),
                "achieved": _format(summary.get(key), scale),
                "unit": unit,
                "threshold": judged(key),
            }
        )
    for reason, count in sorted((summary.get("errors_by_reason") or {}).items()):
        rows.append(
            {
                "figure": f"errors: {reason}",
                "planned": "",
                "achieved": f"{count:,}",
                "unit": "",
                "threshold": "",
            }
        )
    shown = {row[0] for row in SUMMARY_LAYOUT}
    for name in verdicts:
        if name not in shown:
            rows.append(
                {
                    "figure": name,
                    "planned": "",
                    "achieved": _format(summary.get(name), 1),
                    "unit": "",
                    "threshold": judged(name),
                }
            )
    return pd.DataFrame(rows)


def _format(value: Any, scale: float = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        scaled = value / scale
        if float(scaled).is_integer() or abs(scaled) >= 100:
            return f"{scaled:,.0f}"
        return f"{scaled:,.2f}"
    return str(value)


# (summary key, planned summary key, label, unit, divisor)
SUMMARY_LAYOUT: tuple[tuple[str, str, str, str, float], ...] = (
    ("peak_connections", "planned_peak_connections", "peak simultaneous connections", "", 1),
    ("ramp_rate_mean_per_s", "planned_rate_per_s", "ramp rate, mean", "/s", 1),
    ("ramp_rate_min_per_s", "planned_rate_per_s", "ramp rate, slowest whole second", "/s", 1),
    ("schedule_lag_ms_max", "", "schedule lag, max", "ms", 1),
    ("hold_s", "planned_hold_s", "held at ≥ 99% of peak", "s", 1),
    ("connect_errors", "", "connect errors", "", 1),
    ("server_bytes_per_conn", "", "server memory per connection", "KiB", 1024),
    ("agent_bytes_per_conn", "", "agent memory per connection", "KiB", 1024),
    ("kernel_bytes_per_conn", "", "kernel TCP memory per connection (host-wide)", "KiB", 1024),
    ("server_cpu_us_per_conn", "", "server CPU per new connection", "µs", 1),
    ("agent_cpu_us_per_conn", "", "agent CPU per new connection", "µs", 1),
    ("server_cpu_percent_mean", "", "server CPU, mean", "% of a core", 1),
    ("agent_cpu_percent_mean", "", "agent CPU, mean", "% of a core", 1),
    ("monitor_cpu_percent_mean", "", "monitor CPU, mean", "% of a core", 1),
    ("connect_ms_p50", "", "connect latency p50 (from schedule)", "ms", 1),
    ("connect_ms_p99", "", "connect latency p99", "ms", 1),
    ("connect_ms_max", "", "connect latency max", "ms", 1),
    ("delivery_ms_p50", "", "delivery latency p50", "ms", 1),
    ("delivery_ms_p99", "", "delivery latency p99", "ms", 1),
    ("delivery_ms_max", "", "delivery latency max", "ms", 1),
    ("read_ms_p50", "", "read by the agent p50", "ms", 1),
    ("read_ms_p99", "", "read by the agent p99", "ms", 1),
    ("read_ms_max", "", "read by the agent max", "ms", 1),
    ("messages_received", "", "messages received", "", 1),
    ("messages_lost", "", "messages lost", "", 1),
    ("messages_untimed", "", "messages followed by later bytes in a read (no arrival time)", "", 1),
    ("connections_dropped", "", "connections dropped after connecting", "", 1),
    ("server_restarts", "", "server worker restarts", "", 1),
    ("agent_saturated", "", "agent saturated", "", 1),
)


def compare_rows(summaries: Sequence[tuple[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """Several runs' summary figures side by side: one column per run (its label) and one
    ``÷ first`` column per later run with the ratio to the first run."""
    if not summaries:
        raise ValueError("compare needs at least one run; pass results/<run-id> folders")
    first = summaries[0][1]
    rows = []
    for key, _planned, label, unit, scale in SUMMARY_LAYOUT:
        row: dict[str, str] = {"figure": label, "unit": unit}
        for i, (run, summary) in enumerate(summaries):
            value = summary.get(key)
            row[run] = _format(value, scale)
            if i == 0:
                continue
            base = first.get(key)
            ratio = ""
            numeric = (int, float)
            if (
                isinstance(value, numeric)
                and isinstance(base, numeric)
                and not isinstance(value, bool)
                and base
            ):
                ratio = f"{value / base:.2f}×"
            row[f"{run} ÷ first"] = ratio
        rows.append(row)
    return pd.DataFrame(rows)


def _host_key(host: Mapping[str, Any]) -> dict[str, Any]:
    meta = host.get("metadata") or {}
    sysctls = meta.get("sysctls") or {}
    key = {
        "CPU model": meta.get("cpu_model"),
        "kernel": meta.get("kernel"),
        "CPU count": meta.get("cpu_count"),
    }
    key.update({k: sysctls.get(k) for k in KEY_SYSCTLS if k in sysctls})
    return key


def run_differences(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """What differs between the first run and each other one besides the hosts: the
    experiment (its resolved settings), the overrides, the lab's git commit. Not a reason
    not to compare, but what a ratio then also measures."""
    if not runs:
        return []
    out: list[str] = []
    base_label, base = runs[0]

    def facts(record: Mapping[str, Any]) -> dict[str, Any]:
        exp = record.get("experiment") or {}
        controller = record.get("controller") or {}
        return {
            "experiment": exp.get("name"),
            "experiment settings": json.dumps(exp.get("resolved"), sort_keys=True),
            "overrides": json.dumps(record.get("overrides") or {}, sort_keys=True),
            "lab commit": (controller.get("git_commit") or "")[:9]
            + (" (dirty)" if controller.get("git_dirty") else ""),
        }

    theirs = facts(base)
    for label, record in runs[1:]:
        mine = facts(record)
        for item, value in mine.items():
            if value != theirs[item]:
                shown = (
                    "differ"
                    if item == "experiment settings"
                    else f"{label}: {value!r}, {base_label}: {theirs[item]!r}"
                )
                out.append(f"{item} — {shown}")
    return out


def host_differences(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Warnings, one per difference in CPU model, kernel or key sysctls between the hosts of
    the first run and those of each other run (hosts matched by name, else by position)."""
    if not runs:
        return []
    warnings: list[str] = []
    base_label, base = runs[0]
    base_hosts = base.get("hosts") or []
    for label, record in runs[1:]:
        hosts = record.get("hosts") or []
        if len(hosts) != len(base_hosts):
            warnings.append(
                f"{label} ran on {len(hosts)} host(s), {base_label} on "
                f"{len(base_hosts)}: figures per host are not comparable"
            )
        by_name = {h.get("name"): h for h in base_hosts}
        for i, host in enumerate(hosts):
            other = by_name.get(host.get("name")) or (
                base_hosts[i] if i < len(base_hosts) else None
            )
            if other is None:
                continue
            mine, theirs = _host_key(host), _host_key(other)
            for item in sorted(set(mine) | set(theirs)):
                if mine.get(item) != theirs.get(item):
                    warnings.append(
                        f"host {host.get('name')}: {item} differs — {label}: {mine.get(item)!r}, "
                        f"{base_label}: {theirs.get(item)!r}"
                    )
    return warnings


def environment_frame(run_record: Mapping[str, Any]) -> pd.DataFrame:
    """Hosts, versions, sysctls and limits from ``run.json``: columns item, then one per host."""
    hosts = run_record.get("hosts") or []
    columns: dict[str, dict[str, str]] = {}
    for host in hosts:
        meta = host.get("metadata") or {}
        values: dict[str, str] = {"clock offset (s)": f"{host.get('clock_offset_s', 0.0):+.4f}"}
        for key in ("python", "kernel", "cpu_model", "cpu_count", "mem_total"):
            if key in meta:
                values[key] = str(meta[key])
        for group in ("sysctls", "rlimits", "packages"):
            for key, value in sorted((meta.get(group) or {}).items()):
                values[f"{group}: {key}"] = (
                    json.dumps(value) if not isinstance(value, str) else value
                )
        columns[str(host.get("name", f"host{len(columns)}"))] = values
    controller = run_record.get("controller") or {}
    if controller:
        columns.setdefault("controller", {})
        for key in ("git_commit", "git_dirty"):
            if key in controller:
                columns["controller"][key] = str(controller[key])
    items: list[str] = []
    for values in columns.values():
        items += [k for k in values if k not in items]
    frame = pd.DataFrame({"item": items})
    for name, values in columns.items():
        frame[name] = [values.get(item, "") for item in items]
    return frame
