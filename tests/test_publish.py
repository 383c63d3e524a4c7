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
    # a path that is not a run is a usage error (2), as elsewhere in the lab command
    assert publish.report_main([str(tmp_path)], prog="lab report") == 2
    assert "not a results folder (no run.json)" in capsys.readouterr().err
    assert publish.report_main([str(tmp_path / "typo")], prog="lab report") == 2
    assert f"{tmp_path / 'typo'} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    assert publish.report_main([str(empty)], prog="lab report") == 2
    assert "is not a run's record (no run_id or experiment)" in capsys.readouterr().err
    assert not (empty / "report.html").exists()
    empty.joinpath("run.json").unlink()
    empty.rmdir()
    a = runfolder.build(tmp_path / "run-a")
    assert publish.compare_main([str(a)], prog="lab compare") == 1
    assert "at least two" in capsys.readouterr().err
    assert publish.compare_main([str(a), str(tmp_path / "typo")], prog="lab compare") == 2
    assert f"{tmp_path / 'typo'} does not exist" in capsys.readouterr().err


# The first lines of results/index.html as written before the generator tag existed.
LEGACY_INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>comet-lab runs</title>
<style>
body { font-family: sans-serif; margin: 2em; }
</style></head>
<body><h1>comet-lab runs</h1><p>1 run(s), newest first.</p>
"""


def test_lab_report_leaves_an_index_it_did_not_write_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"  # a run folder copied into a web site that has its own index
    run = runfolder.build(site / "myrun")
    foreign = site / "index.html"
    foreign.write_text("<html>MINE</html>")
    assert publish.report_main([str(run)], prog="lab report") == 0
    assert foreign.read_text() == "<html>MINE</html>"
    assert (run / "report.html").is_file()
    said = [line for line in capsys.readouterr().err.splitlines() if "index" in line]
    assert len(said) == 1, said
    assert said[0].startswith(f"index not written: {foreign} was not written by comet-lab")
    assert "move it away" in said[0]
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "myrun"]


def test_index_replaces_only_pages_comet_lab_wrote(tmp_path: Path) -> None:
    results = tmp_path / "results"
    runfolder.build(results / "20261126-100000-synthetic")
    index = results / "index.html"
    for foreign in ("<html>MINE</html>", LEGACY_INDEX.replace("comet-lab runs", "my runs")):
        index.write_text(foreign)
        with pytest.raises(publish.PublishError, match=f"{index} was not written by comet-lab"):
            publish.write_index(results)
        assert index.read_text() == foreign
    index.write_text(LEGACY_INDEX)  # written before the generator tag: still ours
    assert publish.write_index(results) == index
    page = index.read_text()
    assert publish.GENERATOR in page and "20261126-100000-synthetic" in page
    runfolder.build(results / "20261126-110000-synthetic")
    publish.write_index(results)  # the tagged page is replaced too
    assert "20261126-110000-synthetic" in index.read_text()
    assert sorted(p.name for p in results.iterdir() if p.is_file()) == ["index.html"]


def test_lab_compare_into_a_folder_writes_the_default_name_inside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = runfolder.build(tmp_path / "run-a")
    b = runfolder.build(tmp_path / "run-b", cpu_model="Another CPU")
    site = tmp_path / "site"
    site.mkdir()
    assert publish.compare_main([str(a), str(b), "--out", str(site)], prog="lab compare") == 0
    page = site / "compare-run-a-vs-run-b.html"
    assert capsys.readouterr().out.strip() == str(page)
    assert "CPU model differs" in page.read_text()
    assert sorted(p.name for p in site.iterdir()) == [page.name, page.with_suffix(".ipynb").name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-a", "run-b", "site"]


def test_lab_compare_out_in_a_missing_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = runfolder.build(tmp_path / "run-a")
    b = runfolder.build(tmp_path / "run-b")
    missing = tmp_path / "missing"
    for out in (str(missing / "c.html"), f"{missing}/"):
        assert publish.compare_main([str(a), str(b), "--out", out], prog="lab compare") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{missing} does not exist" in err
        assert f"mkdir -p {missing}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-a", "run-b"]


def test_to_html_leaves_no_tmp_file_when_it_cannot_write(tmp_path: Path) -> None:
    import nbformat

    notebook = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), notebook)
    taken = tmp_path / "page.html"
    taken.mkdir()  # a folder where the page should go
    with pytest.raises(publish.PublishError, match=f"cannot write {taken}"):
        publish.to_html(notebook, taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.ipynb", "page.html"]
