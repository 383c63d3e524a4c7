"""lab.publish: report.html opens offline in headless Chromium with every figure drawn and no
JavaScript error; results/index.html lists the runs; `lab compare` writes a comparison page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import runfolder
from browser import PageReport, load_page
from conftest import require

from lab import publish


def assert_offline_and_clean(page: PageReport, figures: int) -> None:
    assert not page.errors, f"JavaScript errors: {page.errors}"
    remote = [u for u in page.requests if not u.startswith(("file:", "data:", "about:"))]
    assert not remote, f"the page fetched {remote}: it must open offline"
    assert page.divs == figures, f"{page.divs} figures in the page, expected {figures}"
    assert page.drawn == page.divs, f"only {page.drawn} of {page.divs} figures were drawn"


@pytest.fixture(scope="module")
def chromium() -> str:
    return require("chromium", "the published HTML is checked in a real browser")


def test_smoke_run_report_opens_offline_with_every_figure(
    chromium: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = runfolder.published_smoke(tmp_path_factory)
    report = folder / "report.html"
    html = report.read_text()
    assert html.count("Plotly.newPlot") == 11
    assert "require.min.js" not in html and "cdnjs.cloudflare.com" not in html
    page = load_page(chromium, report)
    assert page.drawn >= 6
    assert_offline_and_clean(page, figures=11)
    index = (folder.parent / "index.html").read_text()
    assert f'href="{folder.name}/report.html"' in index
    assert "completed" in index and "smoke" in index


def test_index_lists_every_run_newest_first(tmp_path: Path) -> None:
    results = tmp_path / "results"
    older = runfolder.build(results / "20261126-100000-synthetic")
    record = json.loads((older / "run.json").read_text())
    record.update(outcome="interrupted", reason="SIGINT", summary={"peak_connections": 12})
    (older / "run.json").write_text(json.dumps(record))
    newer = runfolder.build(results / "20261126-110000-synthetic")
    (newer / "report.html").write_text("<html></html>")
    record = json.loads((newer / "run.json").read_text())
    record.update(
        summary={"peak_connections": 64000, "server_bytes_per_conn": 4096.0},
        thresholds=[
            {"name": "connect_errors", "op": "==", "value": 0, "actual": 3, "passed": False}
        ],
    )
    (newer / "run.json").write_text(json.dumps(record))
    index = publish.write_index(results).read_text()
    assert index.index("20261126-110000") < index.index("20261126-100000")  # newest first
    assert "interrupted" in index and "SIGINT" in index
    assert "64,000" in index and "4.00 KiB/conn" in index and "failed: connect_errors" in index
    assert f'href="{newer.name}/report.html"' in index
    assert f'href="{older.name}/run.json"' in index
    assert f'href="{older.name}/report.html"' not in index  # never published


def test_the_browser_check_catches_a_javascript_error(chromium: str, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    report = load_page(chromium, page, timeout_s=20)
    assert any("undefinedFunction" in e for e in report.errors)


def test_lab_compare_writes_html(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = runfolder.compared(tmp_path_factory)
    html = out.read_text()
    assert "CPU model differs" in html
    assert_offline_and_clean(load_page(chromium, out), figures=6)


def test_bad_folders_get_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert publish.report_main([str(tmp_path)], prog="lab report") == 1
    assert "not a results folder (no run.json)" in capsys.readouterr().err
    a = runfolder.build(tmp_path / "run-a")
    assert publish.compare_main([str(a)], prog="lab compare") == 1
    assert "at least two" in capsys.readouterr().err
