"""lab.report: the figures draw what lab.stats computed, for full, empty and compared runs."""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import pytest
import runfolder

from lab import report, stats
from lab.stats import Tables


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Tables:
    return stats.load_tables(runfolder.build(tmp_path_factory.mktemp("run") / "run"))


def test_report_has_the_eleven_sections(synthetic: Tables) -> None:
    figures = report.report_figures(synthetic)
    titles = [f.layout.title.text for f in figures]
    assert titles == [
        "Summary",
        "Simultaneous connections",
        "New connections per second",
        "Server console per worker",
        "CPU",
        "Memory",
        "Sockets and open files",
        "Messages and broadcasts",
        "Latency",
        "Errors by reason",
        "Environment",
    ]
    assert all(isinstance(f, go.Figure) and f.data for f in figures)


def test_figures_draw_the_stats_numbers(synthetic: Tables) -> None:
    summary = stats.summarize(synthetic, synthetic.run)
    figures = {f.layout.title.text: f for f in report.report_figures(synthetic)}
    table = figures["Summary"].data[0]
    figure_column = list(table.cells.values[0])
    achieved = list(table.cells.values[2])
    assert achieved[figure_column.index("peak simultaneous connections")] == (
        f"{summary['peak_connections']:,}"
    )
    conns = {t.name: t for t in figures["Simultaneous connections"].data}
    assert set(conns) >= {*runfolder.AGENTS, "total", "server online"}
    assert max(conns["total"].y) == stats.connections_frame(synthetic)["connections"].max()
    rate = {t.name: t for t in figures["New connections per second"].data}
    assert list(rate["achieved /s"].y) == list(stats.rate_frame(synthetic)["achieved"])
    fit_names = [t.name for t in figures["Memory"].data if t.name and "KiB/conn" in t.name]
    assert "server: 4.88 KiB/conn" in fit_names
    console = [t for t in figures["Server console per worker"].data if t.xaxis == "x"]
    online = synthetic.server[synthetic.server["worker"] == 0]["online"].tolist()
    assert [list(t.y) for t in console if t.name == "worker 0"] == [online]
    # one colour per memory series in both panels
    colors: dict[str, set[str]] = {}
    for t in figures["Memory"].data:
        color = (t.line.color if t.mode == "lines" else t.marker.color) or "?"
        colors.setdefault(t.legendgroup, set()).add(color)
    assert colors and all(len(c) == 1 for c in colors.values()), colors
    # each process's USS: one worker growing apart from the others shows
    per_process = {t.name: t for t in figures["Memory"].data if t.xaxis == "x3"}
    assert set(per_process) == {"server 100", "server 101", "agent 200", "agent 201", "monitor 300"}
    uss = synthetic.monitor_procs[synthetic.monitor_procs["pid"] == 101]["uss"] / 2**20
    assert list(per_process["server 101"].y) == uss.tolist()
    # every latency point carries the number of samples of its second
    latency = {t.name: t for t in figures["Latency"].data}
    delivery = stats.delivery_frame(synthetic)
    assert list(latency["delivery p50"].customdata) == delivery["count"].tolist()
    assert "samples" in latency["delivery p50"].hovertemplate
    sockets = {t.name: t for t in figures["Sockets and open files"].data}
    assert max(sockets["TCP in use"].y) == synthetic.monitor_host["tcp_inuse"].max()
    assert set(sockets["TCP TIME_WAIT"].y) == {7}
    assert set(sockets["open files: server"].y) == {10 + 100 + 10 + 101}  # summed per role
    messages = {t.name: t for t in figures["Messages and broadcasts"].data}
    received = stats.messages_frame(synthetic)
    assert (
        sum(messages["received /s"].y) == received[received["series"] == "received"]["per_s"].sum()
    )
    assert sum(messages["received /s"].y) == synthetic.agent.groupby("agent")["msgs_in"].max().sum()
    fanout = messages["fan-out (ms)"]
    # each broadcast once, at its slowest worker (worker 1: FANOUT_MS + id + 1)
    assert list(fanout.y) == [runfolder.FANOUT_MS + i + 1 for i in fanout.x]
    assert list(fanout.x) == list(range(1, len(fanout.x) + 1)) and len(fanout.x) > 2
    errors = figures["Errors by reason"].data
    assert [t.name for t in errors] == ["refused"]
    assert sum(errors[0].y) == runfolder.REFUSED


def test_figure_bundle_is_offline_html_plus_plotly_json(synthetic: Tables) -> None:
    fig = report.report_figures(synthetic)[1]
    bundle = report.figure_bundle(fig)
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html
    assert "<script src=" not in html  # plotly.js is put once per page by show_plotlyjs
    assert "mathjax" not in html.lower()
    json.dumps(bundle["application/vnd.plotly.v1+json"])


def test_empty_run_still_draws_every_section(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"outcome": "failed", "reason": "test"}))
    figures = report.report_figures(stats.load_tables(tmp_path))
    assert len(figures) == 11
    for fig in figures:
        fig.to_json()


def test_compare_overlays_each_run(tmp_path: Path) -> None:
    runs = [stats.load_tables(runfolder.build(tmp_path / name)) for name in ("run-a", "run-b")]
    figures = report.compare_figures(runs)
    assert figures[0].layout.title.text == "Summary, ratios to the first run"
    header = list(figures[0].data[0].header.values)
    assert header == ["figure", "unit", "run-a", "run-b", "run-b ÷ first"]
    connections = figures[1]
    assert [t.name for t in connections.data] == ["run-a", "run-b"]


def test_the_title_carries_the_verdict_the_overrides_and_the_notes() -> None:
    run = {
        "experiment": {"name": "smoke", "path": "experiments/smoke.yaml"},
        "outcome": "completed",
        "overrides": {"phases.0.rate_per_s": "2000"},
        "thresholds": [
            {"name": "connect_errors", "op": "==", "value": 0, "actual": 0, "passed": True},
            {
                "name": "delivery_ms_max",
                "op": "<=",
                "value": 600,
                "actual": 606.207,
                "passed": False,
            },
            {"name": "messages_lost", "op": "==", "value": 0, "actual": None, "passed": False},
        ],
        "notes": ["server: 1 worker restart(s) during the run", "ramp: 6,700 connections/s"],
    }
    text = report.title_markdown(run, "20261127-000000-smoke")
    assert "outcome **completed**" in text and "`experiments/smoke.yaml`" in text
    # a run that went to its end but failed a threshold says so at the top
    assert "**Thresholds: 1 passed, 2 FAILED**: delivery_ms_max <= 600 (actual 606.2)" in text
    assert "messages_lost == 0 (actual not measured)" in text
    assert "`-p phases.0.rate_per_s=2000`" in text
    assert "\n- server: 1 worker restart(s) during the run\n- ramp: 6,700" in text
    assert "`lab report 20261127-000000-smoke`" in text
    quiet = report.title_markdown({**run, "notes": [], "thresholds": []}, "x")
    assert "Notes" not in quiet and "Thresholds" not in quiet
