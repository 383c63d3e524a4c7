"""The report's figures: plotly drawings of what ``lab.stats`` computed, nothing more.

Each ``*_figure`` function takes the frames ``lab.stats`` returns and gives a
``plotly.graph_objects.Figure``; ``report_figures(tables)`` gives the eleven sections of a run's
report in order, ``compare_figures(tables_list)`` the overlaid ones of several runs.
``show_report(folder)`` and ``show_compare(folders)`` display them in a notebook, embedding
plotly.js once, so the notebook exported by nbconvert (``lab.publish``) opens offline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab import stats, summary_table
from lab.stats import Tables

HEIGHT = 420
TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, height: int = HEIGHT, **kwargs: Any) -> go.Figure:
    settings: dict[str, Any] = {
        "title": title,
        "template": TEMPLATE,
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
        "legend": {"orientation": "h", "y": -0.2},
    }
    settings.update(kwargs)
    fig.update_layout(**settings)
    return fig


def table_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    """A frame drawn as a plotly table (so it is part of the figure count and the HTML)."""
    height = min(1400, 90 + 24 * (len(frame) + 1))
    fig = go.Figure(
        go.Table(
            header={"values": [str(c) for c in frame.columns], "align": "left"},
            cells={
                "values": [frame[c].astype(str).tolist() for c in frame.columns],
                "align": "left",
            },
        )
    )
    return _layout(fig, title, height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10})


# ---------------------------------------------------------------- the eleven sections


def summary_figure(summary: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]]) -> go.Figure:
    """1. The summary table: planned vs achieved, memory, CPU, latency, thresholds."""
    return table_figure(summary_table.summary_rows(summary, verdicts), "Summary")


def connections_figure(frame: pd.DataFrame) -> go.Figure:
    """2. Simultaneous connections over time, per agent and total (``connections_frame``)."""
    fig = go.Figure()
    for series, rows in frame.groupby("series", sort=False):
        total = series in ("total", "server online")
        fig.add_trace(
            go.Scatter(
                x=rows["elapsed_s"],
                y=rows["connections"],
                name=str(series),
                mode="lines",
                line={
                    "width": 3 if total else 1.5,
                    "dash": "dot" if series == "server online" else "solid",
                },
            )
        )
    return _layout(
        fig, "Simultaneous connections", xaxis_title="time (s)", yaxis_title="connections"
    )


def rate_figure(frame: pd.DataFrame) -> go.Figure:
    """3. New connections per second, planned vs achieved, with the schedule lag
    (``rate_frame``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=frame["elapsed_s"], y=frame["planned"], name="planned /s", opacity=0.5))
    fig.add_trace(go.Bar(x=frame["elapsed_s"], y=frame["achieved"], name="achieved /s"))
    fig.add_trace(
        go.Scatter(
            x=frame["elapsed_s"],
            y=frame["lag_ms_max"],
            name="schedule lag max (ms)",
            mode="lines+markers",
        ),
        secondary_y=True,
    )
    fig.update_yaxes(title_text="new connections / s", secondary_y=False)
    fig.update_yaxes(title_text="lag (ms)", secondary_y=True, rangemode="tozero")
    return _layout(fig, "New connections per second", barmode="group", xaxis_title="time (s)")


def server_console_figure(frame: pd.DataFrame) -> go.Figure:
    """4. The server console, as the field report's: per worker, connections online, events
    so far (connect, message, close) and events per second (``server_console_frame``). A
    broadcast's sends are not events: they are in "Messages and broadcasts"."""
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("connections online", "events so far", "events / s (PcS)"),
    )
    for worker, rows in frame.groupby("worker"):
        name = f"worker {worker}"
        for col, column in enumerate(("online", "events", "pcs"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=rows["elapsed_s"],
                    y=rows[column],
                    name=name,
                    mode="lines",
                    legendgroup=name,
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="time (s)")
    fig.update_yaxes(title_text="connections", row=1, col=1)
    fig.update_yaxes(title_text="events", row=1, col=2)
    fig.update_yaxes(title_text="events / s", row=1, col=3)
    return _layout(fig, "Server console per worker")


def cpu_figure(cores: pd.DataFrame, roles: pd.DataFrame) -> go.Figure:
    """5. CPU per core and per role over time, per host (``cpu_core_frame``,
    ``cpu_role_frame``)."""
    hosts = sorted(
        set(cores["host"].dropna().astype(str)) | set(roles["host"].dropna().astype(str))
    )
    hosts = hosts or ["(no host)"]
    titles = [f"{h}: {what}" for h in hosts for what in ("per core", "per role")]
    fig = make_subplots(rows=len(hosts), cols=2, subplot_titles=titles)
    for i, host in enumerate(hosts, start=1):
        for core, rows in cores[cores["host"].astype(str) == host].groupby("core"):
            fig.add_trace(
                go.Scatter(
                    x=rows["elapsed_s"],
                    y=rows["cpu_percent"],
                    mode="lines",
                    name=f"{host} core {core}",
                ),
                row=i,
                col=1,
            )
        for role, rows in roles[roles["host"].astype(str) == host].groupby("role"):
            fig.add_trace(
                go.Scatter(
                    x=rows["elapsed_s"], y=rows["cpu_percent"], mode="lines", name=f"{host} {role}"
                ),
                row=i,
                col=2,
            )
    fig.update_yaxes(title_text="% of a core", rangemode="tozero")
    fig.update_xaxes(title_text="time (s)")
    return _layout(fig, "CPU", height=max(HEIGHT, 320 * len(hosts)))


def memory_figure(
    memory: pd.DataFrame,
    fits: Mapping[str, stats.MemoryFit],
    processes: pd.DataFrame | None = None,
) -> go.Figure:
    """6. Memory per role over time, memory vs connections with the fitted bytes per
    connection, and each process's USS (``memory_frame``, ``memory_fits``,
    ``process_memory_frame``)."""
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "memory over time (roles: USS)",
            "RSS vs open connections, fitted",
            "USS per process",
        ),
    )
    if processes is not None:
        for process, rows in processes.groupby("process", sort=True):
            fig.add_trace(
                go.Scatter(
                    x=rows["elapsed_s"],
                    y=rows["bytes"] / 2**20,
                    name=str(process),
                    mode="lines",
                    line={"width": 1},
                    legendgroup=f"process {process}",
                ),
                row=1,
                col=3,
            )
    # hosts sample at slightly different instants: add them up per whole second
    per_second = memory.assign(second=memory["elapsed_s"].round())
    per_series = per_second.groupby(["series", "second"]).agg(
        bytes=("bytes", "sum"),
        fit_bytes=("fit_bytes", "sum"),
        connections=("connections", "first"),
        t=("t", "max"),
    )
    palette = plotly.colors.qualitative.Plotly
    for i, (series, rows) in enumerate(per_series.groupby(level="series")):
        rows = rows.droplevel("series")
        name = str(series)
        color = palette[i % len(palette)]  # one colour per series in both panels
        fig.add_trace(
            go.Scatter(
                x=rows.index,
                y=rows["bytes"] / 2**20,
                name=name,
                mode="lines",
                line={"color": color},
                legendgroup=name,
                # the whole host's memory dwarfs the roles': one click away in the legend
                visible="legendonly" if series == "system used" else True,
            ),
            row=1,
            col=1,
        )
        fit = fits.get(name)
        if fit is None or fit.bytes_per_conn is None or series == "system used":
            continue
        window = rows[rows["t"] <= fit.until_t]
        fig.add_trace(
            go.Scatter(
                x=window["connections"],
                y=window["fit_bytes"] / 2**20,
                name=name,
                mode="markers",
                legendgroup=name,
                showlegend=False,
                marker={"size": 5, "color": color},
            ),
            row=1,
            col=2,
        )
        xs = [0.0, float(window["connections"].max())]
        ys = [(fit.intercept_bytes + fit.bytes_per_conn * v) / 2**20 for v in xs]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"dash": "dash", "color": color},
                legendgroup=name,
                name=f"{name}: {fit.bytes_per_conn / 1024:,.2f} KiB/conn",
            ),
            row=1,
            col=2,
        )
    fig.update_yaxes(title_text="MiB")
    fig.update_xaxes(title_text="time (s)", row=1, col=1)
    fig.update_xaxes(title_text="open connections", row=1, col=2)
    fig.update_xaxes(title_text="time (s)", row=1, col=3)
    return _layout(fig, "Memory", height=HEIGHT + 60)


def latency_figure(
    connect: pd.DataFrame, delivery: pd.DataFrame, read: pd.DataFrame | None = None
) -> go.Figure:
    """7. Connect latency percentiles over time; delivery latency when messages were
    published: arrival at the agent host's socket (kernel receive time) and, dotted grey,
    when the agent process read it (``latency_frame``, ``delivery_frame``). Each point's
    hover says how many samples the second held."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("connect (from the scheduled time)", "delivery")
    )
    panels: list[tuple[int, str, pd.DataFrame, str | None]] = [
        (1, "connect", connect, None),
        (2, "delivery", delivery, None),
    ]
    if read is not None and not read.empty:
        panels.append((2, "read by agent", read, "#999999"))
    for col, name, frame, color in panels:
        for key, dash in (("p50_ms", "solid"), ("p99_ms", "dash"), ("max_ms", "dot")):
            fig.add_trace(
                go.Scatter(
                    x=frame["elapsed_s"],
                    y=frame[key],
                    mode="lines+markers",
                    name=f"{name} {key[:-3]}",
                    line={"dash": dash, **({"color": color} if color else {})},
                    # a second's percentile is only as good as its samples: show how many
                    customdata=frame["count"],
                    hovertemplate="%{y:.1f} ms at %{x:.0f} s, of %{customdata:,.0f} samples",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(title_text="ms", rangemode="tozero")
    fig.update_xaxes(title_text="time (s)")
    return _layout(fig, "Latency")


def errors_figure(frame: pd.DataFrame) -> go.Figure:
    """8. Errors by reason over time (``errors_frame``)."""
    fig = go.Figure()
    for reason, rows in frame.groupby("reason"):
        fig.add_trace(go.Bar(x=rows["elapsed_s"], y=rows["errors"], name=str(reason)))
    if frame.empty:
        fig.add_annotation(
            text="no errors",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
            font={"size": 20},
        )
    return _layout(
        fig, "Errors by reason", barmode="stack", xaxis_title="time (s)", yaxis_title="errors / s"
    )


def environment_figure(frame: pd.DataFrame) -> go.Figure:
    """9. Hosts, versions, sysctls, limits (``environment_frame``)."""
    return table_figure(frame, "Environment")


def sockets_figure(frame: pd.DataFrame) -> go.Figure:
    """7. Sockets and open files over time, per host (``sockets_frame``)."""
    fig = go.Figure()
    hosts = frame["host"].nunique() if len(frame) else 0
    for (host, series), rows in frame.groupby(["host", "series"], sort=False):
        name = f"{host}: {series}" if hosts > 1 else str(series)
        fig.add_trace(go.Scatter(x=rows["elapsed_s"], y=rows["count"], name=name, mode="lines"))
    return _layout(fig, "Sockets and open files", xaxis_title="time (s)", yaxis_title="count")


def messages_figure(messages: pd.DataFrame, fanout: pd.DataFrame) -> go.Figure:
    """9. Messages per second over time, and each broadcast's fan-out on the server (its
    slowest worker writing it to all its subscribers) (``messages_frame``, ``fanout_frame``)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "messages per second (all agents)",
            "server fan-out per broadcast (slowest worker)",
        ),
    )
    for series, rows in messages.groupby("series", sort=False):
        fig.add_trace(
            go.Scatter(x=rows["elapsed_s"], y=rows["per_s"], name=f"{series} /s", mode="lines"),
            row=1,
            col=1,
        )
    if len(fanout):
        fig.add_trace(
            go.Bar(
                x=fanout["fanout_id"],
                y=fanout["fanout_ms"],
                name="fan-out (ms)",
                customdata=fanout["subscribers"],
                hovertemplate="message %{x}: %{y:.0f} ms to %{customdata:,} subscribers",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="time (s)", row=1, col=1)
    fig.update_xaxes(title_text="message id", row=1, col=2)
    fig.update_yaxes(title_text="messages / s", row=1, col=1, rangemode="tozero")
    fig.update_yaxes(title_text="ms", row=1, col=2, rangemode="tozero")
    return _layout(fig, "Messages and broadcasts")


def report_figures(tables: Tables) -> list[go.Figure]:
    """The eleven sections of a run's report, in order."""
    summary = stats.summarize(tables, tables.run)
    thresholds = tables.run.get("thresholds") or []
    verdicts = stats.evaluate_thresholds(summary, thresholds) if thresholds else []
    memory = stats.memory_frame(tables)
    return [
        summary_figure(summary, verdicts),
        connections_figure(stats.connections_frame(tables)),
        rate_figure(stats.rate_frame(tables)),
        server_console_figure(stats.server_console_frame(tables)),
        cpu_figure(stats.cpu_core_frame(tables), stats.cpu_role_frame(tables)),
        memory_figure(
            memory, stats.memory_fits(tables, memory), stats.process_memory_frame(tables)
        ),
        sockets_figure(stats.sockets_frame(tables)),
        messages_figure(stats.messages_frame(tables), stats.fanout_frame(tables)),
        latency_figure(
            stats.latency_frame(tables),
            stats.delivery_frame(tables),
            stats.delivery_frame(tables, "read"),
        ),
        errors_figure(stats.errors_frame(tables)),
        environment_figure(summary_table.environment_frame(tables.run)),
    ]


# ---------------------------------------------------------------- several runs


def _label(tables: Tables) -> str:
    return str(tables.run.get("run_id") or tables.folder.name)


def compare_figures(runs: Sequence[Tables]) -> list[go.Figure]:
    """Several runs overlaid: the summary with ratios to the first run, then connections,
    rate, memory vs connections, CPU per role and connect latency of every run."""
    labelled = [(_label(t), t) for t in runs]
    summaries = [(label, stats.summarize(t, t.run)) for label, t in labelled]
    figures = [
        table_figure(summary_table.compare_rows(summaries), "Summary, ratios to the first run")
    ]
    conns, rate, memory, cpu, latency = (go.Figure() for _ in range(5))
    for label, t in labelled:
        c = stats.connections_frame(t)
        total = c[c["series"] == "total"]
        conns.add_trace(go.Scatter(x=total["elapsed_s"], y=total["connections"], name=label))
        r = stats.rate_frame(t)
        rate.add_trace(go.Scatter(x=r["second"], y=r["achieved"], name=label, mode="lines+markers"))
        m = stats.memory_frame(t)
        m = m[m["series"].isin(["server", "agent"])]
        for series, rows in m.groupby("series"):
            memory.add_trace(
                go.Scatter(
                    x=rows["connections"],
                    y=rows["bytes"] / 2**20,
                    mode="markers",
                    name=f"{label} {series}",
                )
            )
        roles = stats.cpu_role_frame(t).groupby(["role", "elapsed_s"])["cpu_percent"].sum()
        for role, values in roles.groupby(level="role"):
            values = values.droplevel("role")
            cpu.add_trace(
                go.Scatter(
                    x=values.index, y=values.to_numpy(), mode="lines", name=f"{label} {role}"
                )
            )
        lat = stats.latency_frame(t)
        latency.add_trace(
            go.Scatter(x=lat["elapsed_s"], y=lat["p99_ms"], mode="lines", name=f"{label} p99")
        )
    figures += [
        _layout(conns, "Simultaneous connections (total)", xaxis_title="time (s)"),
        _layout(rate, "New connections per second (achieved)", xaxis_title="second of ramp"),
        _layout(
            memory, "Memory vs open connections", xaxis_title="open connections", yaxis_title="MiB"
        ),
        _layout(cpu, "CPU per role", xaxis_title="time (s)", yaxis_title="% of a core"),
        _layout(latency, "Connect latency p99", xaxis_title="time (s)", yaxis_title="ms"),
    ]
    return figures


# ---------------------------------------------------------------- notebook display


class _Page:
    """Whether plotly.js was already put into this kernel's output (put it once)."""

    plotlyjs_shown = False


def figure_bundle(fig: go.Figure) -> dict[str, Any]:
    """A display bundle: plotly's own mimetype (JupyterLab draws it) and HTML that calls the
    page's plotly.js (nbconvert keeps the HTML), so the figure shows in both."""
    html = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        include_mathjax=False,
        default_width="100%",
        default_height=fig.layout.height or HEIGHT,
    )
    return {"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/html": html}


def show_plotlyjs() -> None:
    """Put plotly.js into the notebook's output once (offline: no CDN, no require.js)."""
    if _Page.plotlyjs_shown:
        return
    from IPython.display import display_html
    from plotly.offline import get_plotlyjs

    display_html(f'<script type="text/javascript">{get_plotlyjs()}</script>', raw=True)
    _Page.plotlyjs_shown = True


def show(figures: Sequence[go.Figure]) -> None:
    """Display figures in a notebook (plotly.js first, once)."""
    from IPython.display import display

    show_plotlyjs()
    for fig in figures:
        display(figure_bundle(fig), raw=True)


def show_report(folder: Path | str) -> None:
    """Display a run's report in a notebook: its title line, then the eleven sections."""
    from IPython.display import Markdown, display

    tables = stats.load_tables(folder)
    display(Markdown(title_markdown(tables.run, _label(tables))))
    show(report_figures(tables))


def title_markdown(run: Mapping[str, Any], label: str) -> str:
    """The report's first lines: the run, its experiment and outcome; the thresholds' verdict
    (a failed one named, beside an outcome that only says the run went to its end); the
    overrides; the run's notes (a worker that died, a ramp below plan, a host check's
    warning); where the data is and how to draw this again."""
    exp = run.get("experiment") or {}
    path = f" (`{exp['path']}`)" if exp.get("path") else ""
    outcome = run.get("outcome", "?")
    reason = f" — {run['reason']}" if run.get("reason") else ""
    lines = [
        f"**Run** `{label}` · experiment **{exp.get('name', '?')}**{path} · "
        f"outcome **{outcome}**{reason}"
    ]
    verdicts = run.get("thresholds") or []
    failed = [t for t in verdicts if not t.get("passed")]
    if verdicts:
        text = f"**Thresholds: {len(verdicts) - len(failed)} passed"
        text += f", {len(failed)} FAILED**: " if failed else "**"
        text += "; ".join(
            f"{t['name']} {t['op']} {t['value']} (actual "
            f"{'not measured' if t.get('actual') is None else _fmt(t['actual'])})"
            for t in failed
        )
        lines.append(text)
    overrides = run.get("overrides") or {}
    if overrides:
        lines.append("Overrides: " + " ".join(f"`-p {k}={v}`" for k, v in overrides.items()))
    notes = [str(n) for n in run.get("notes") or []]
    if notes:
        lines.append("**Notes**\n\n" + "\n".join(f"- {n}" for n in notes))
    lines.append(
        f"Data: `run.json`, the Parquet tables, `raw/` and `logs/` in `{label}/` (format: "
        f"results/README.md); draw this report again with `lab report {label}`."
    )
    return "\n\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def show_compare(folders: Sequence[Path | str]) -> None:
    """Display several runs compared: warnings when their hosts differ, then the figures."""
    from IPython.display import Markdown, display

    runs = [stats.load_tables(f) for f in folders]
    labelled = [(_label(t), t.run) for t in runs]
    for difference in summary_table.run_differences(labelled):
        display(Markdown(f"**Differs:** {difference}"))
    warnings = summary_table.host_differences(labelled)
    for warning in warnings:
        display(Markdown(f"**Warning:** {warning}"))
    if not warnings:
        display(Markdown("The runs' hosts agree on CPU model, kernel and key sysctls."))
    show(compare_figures(runs))
