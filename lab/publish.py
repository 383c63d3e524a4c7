"""Publishing: executed notebooks turned into offline HTML, and the index of every run.

``publish_run(folder)`` executes ``notebooks/run.ipynb`` with papermill for a finished run
(``results_dir=<folder>``: the notebook loads the run, it does not run it again) into
``<folder>/run.ipynb``, converts it to ``<folder>/report.html`` (code hidden, plotly.js embedded
once, no CDN, so the page opens offline from a file) and regenerates ``index.html`` in the folder
holding the run (``results/index.html``), unless that file is a page comet-lab did not write.
``lab report RUN`` (``report_main``) does the same with ``notebooks/report.ipynb``;
``lab compare RUN RUN... [--out PATH]`` (``compare_main``) with ``notebooks/compare.ipynb``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
INDEX_NAME = "index.html"

# The lab HTML template without its CDN scripts (require.js, MathJax, mermaid): the page must
# open offline, and require.js would make the embedded plotly.js register as an AMD module
# instead of the global ``Plotly`` the figures call.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


class PublishError(RuntimeError):
    """A notebook or folder that cannot be published; the message says why and the fix."""


class OutputPathError(PublishError):
    """``lab compare --out`` names a place that cannot be written (a usage error: exit 2)."""


class RunFolderError(PublishError):
    """A path given as a run that is not one (missing, no run.json, not a run's record): a
    usage error, exit 2."""


class ForeignIndexError(PublishError):
    """An ``index.html`` comet-lab did not write: it is left alone, the index is not written."""


def notebook_path(name: str) -> Path:
    """The source notebook ``notebooks/<name>.ipynb`` of this checkout."""
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.exists():
        raise PublishError(
            f"{path} is missing: publishing needs the notebooks/ folder of a comet-lab checkout "
            "(run `lab` from the repository, installed with `pip install -e '.[lab]'`)"
        )
    return path


def execute_notebook(name: str, output: Path, parameters: Mapping[str, Any]) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``output`` (the record of what
    ran, with its outputs). Raises PublishError naming the failing cell's error."""
    import papermill
    from traitlets.config import Config

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lab-kernel-") as sockets:
        # IPC sockets in a private folder: TCP ports picked free can be taken by the time the
        # kernel binds them on a busy machine ("Address already in use"), and stay unencrypted
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "k")}})
        try:
            papermill.execute_notebook(
                str(notebook_path(name)),
                str(output),
                parameters=dict(parameters),
                kernel_name="python3",
                progress_bar=False,
                cwd=os.getcwd(),
                config=ipc,
            )
        except papermill.PapermillExecutionError as exc:
            raise PublishError(
                f"notebooks/{name}.ipynb failed in cell {exc.exec_count}: {exc.ename}: "
                f"{exc.evalue} (the executed notebook with the traceback is {output})"
            ) from exc
    return output


def to_html(notebook: Path, output: Path) -> Path:
    """Convert an executed notebook to a standalone HTML page with the code hidden."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"comet_lab_offline.html.j2": OFFLINE_TEMPLATE})],
        template_file="comet_lab_offline.html.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    try:
        _write_replacing(output, body)
    except OSError as exc:
        raise PublishError(
            f"cannot write {output}: {exc.strerror}; free that path or write the page elsewhere"
        ) from exc
    return output


def _write_replacing(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` renamed over it, so a reader never sees
    half a page; the .tmp file is removed when anything fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_run(folder: Path | str) -> Path:
    """Render a finished run: ``<folder>/run.ipynb`` (executed), ``<folder>/report.html``,
    and ``results/index.html`` regenerated (``refresh_index``). Returns the report's path."""
    folder = _run_folder(folder)
    record = _read_record(folder)
    experiment = record.get("experiment") or {}
    parameters = {
        "experiment": str(experiment.get("path") or ""),
        "inventory": "",
        "overrides": dict(record.get("overrides") or {}),
        "results_dir": str(folder),
    }
    notebook = execute_notebook("run", folder / "run.ipynb", parameters)
    report = to_html(notebook, folder / "report.html")
    refresh_index(folder.parent)
    return report


def publish_report(folder: Path | str) -> Path:
    """Re-render an existing run with ``notebooks/report.ipynb`` into ``<folder>/report.ipynb``
    and ``<folder>/report.html``; regenerate the index (``refresh_index``). Returns the
    report's path."""
    folder = _run_folder(folder)
    _read_record(folder)  # a run's record, not any JSON
    notebook = execute_notebook("report", folder / "report.ipynb", {"results_dir": str(folder)})
    report = to_html(notebook, folder / "report.html")
    refresh_index(folder.parent)
    return report


def publish_compare(folders: list[Path | str], out: Path | str | None = None) -> Path:
    """Compare runs with ``notebooks/compare.ipynb``: writes the HTML page where
    ``compare_output`` says and the executed notebook beside it (same name, ``.ipynb``)."""
    runs = [_run_folder(f) for f in folders]
    for run in runs:
        _read_record(run)
    if len(runs) < 2:
        raise PublishError("compare needs at least two results folders: lab compare RUN RUN...")
    page = compare_output(runs, out)
    notebook = execute_notebook(
        "compare", page.with_suffix(".ipynb"), {"runs": [str(r) for r in runs]}
    )
    return to_html(notebook, page)


def compare_output(runs: list[Path], out: Path | str | None) -> Path:
    """The comparison page's path: ``out`` itself; inside ``out`` under the default name
    ``compare-<first>-vs-<last>.html`` when ``out`` is a folder; by default that name beside
    the first run (in ``results/``). Raises OutputPathError when ``out``'s folder is missing."""
    default = f"compare-{runs[0].name}-vs-{runs[-1].name}.html"
    if out is None:
        return runs[0].parent / default
    path = Path(out).expanduser().resolve()
    if path.is_dir():
        return path / default
    # a trailing slash means a folder, even one that does not exist (Path() drops the slash)
    folder = path if str(out).endswith(("/", os.sep)) else path.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise OutputPathError(
            f"--out {out}: {folder} {problem}; create the folder first (mkdir -p {folder}) "
            "or pass --out an existing folder or a file in one"
        )
    return path


def _run_folder(folder: Path | str) -> Path:
    path = Path(folder).expanduser().resolve()
    if not path.exists():
        raise RunFolderError(
            f"{path} does not exist; pass results/<run-id>/ as written by `lab run` "
            "(`ls results/` lists them)"
        )
    if not (path / "run.json").is_file():
        raise RunFolderError(
            f"{path} is not a results folder (no run.json); pass results/<run-id>/ "
            "as written by `lab run`"
        )
    return path


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{folder / 'run.json'} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise RunFolderError(f"{folder / 'run.json'} does not hold a JSON object")
    if "run_id" not in record or "experiment" not in record:
        raise RunFolderError(
            f"{folder / 'run.json'} is not a run's record (no run_id or experiment): pass a "
            "results/<run-id>/ folder as written by `lab run`"
        )
    return record


# ---------------------------------------------------------------- results/index.html

INDEX_COLUMNS = (
    ("peak_connections", "peak", 1, ""),
    ("ramp_rate_min_per_s", "slowest ramp s", 1, "/s"),
    ("connect_errors", "errors", 1, ""),
    ("server_bytes_per_conn", "server", 1024, " KiB/conn"),
    ("agent_bytes_per_conn", "agent", 1024, " KiB/conn"),
    ("connect_ms_p99", "connect p99", 1, " ms"),
    ("delivery_ms_p99", "delivery p99", 1, " ms"),
)


def _cell(value: Any, scale: float, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        scaled = value / scale
        whole = abs(scaled) >= 100 or (scale == 1 and scaled == int(scaled))
        text = f"{scaled:,.0f}" if whole else f"{scaled:,.2f}"
        return text + unit
    return html.escape(str(value))


def index_rows(results: Path) -> list[dict[str, Any]]:
    """One entry per run folder under ``results`` (newest first): id, date, experiment,
    outcome, reason, summary, thresholds, and which files exist."""
    rows = []
    for run_json in sorted(results.glob("*/run.json"), reverse=True):
        if run_json.parent.is_symlink():  # results/latest: the newest run, listed already
            continue
        try:
            record = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict):
            continue
        folder = run_json.parent
        created = record.get("created") or record.get("started")
        rows.append(
            {
                "run_id": folder.name,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))
                if isinstance(created, int | float)
                else "",
                "experiment": (record.get("experiment") or {}).get("name", ""),
                "outcome": record.get("outcome", ""),
                "reason": record.get("reason", ""),
                "summary": record.get("summary") or {},
                "thresholds": record.get("thresholds") or [],
                "report": (folder / "report.html").exists(),
            }
        )
    return rows


# The mark of an index page comet-lab wrote: only such a page is ever replaced.
GENERATOR = '<meta name="generator" content="comet-lab">'
# Index pages written before GENERATOR existed all began with exactly these two lines.
LEGACY_INDEX_HEAD = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>comet-lab runs</title>\n'
)


def index_is_ours(path: Path) -> bool:
    """True when ``write_index`` may write ``path``: it does not exist, or it is an index page
    comet-lab wrote (it carries GENERATOR, or begins like the pages written before it)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as page:
            head = page.read(4096)
    except FileNotFoundError:
        return True
    except OSError:  # a folder, or unreadable: not ours to replace
        return False
    return GENERATOR in head or head.startswith(LEGACY_INDEX_HEAD)


def refresh_index(results: Path) -> Path | None:
    """``write_index(results)`` after publishing a run in ``results``; when the index.html
    there is not comet-lab's, print one line saying it was not written and why, and return
    None. Publishing does not fail for it."""
    try:
        return write_index(results)
    except ForeignIndexError as exc:
        print(f"index not written: {exc}", file=sys.stderr)
        return None


def write_index(results: Path) -> Path:
    """Regenerate ``results/index.html``: every run with its date, experiment, outcome,
    key figures and links to its report and record. Plain HTML, no script. Raises
    ForeignIndexError, leaving the file alone, when an index.html there is not comet-lab's
    (``index_is_ours``): a run folder copied into a web site must not replace the site's page."""
    path = results / INDEX_NAME
    if not index_is_ours(path):
        raise ForeignIndexError(
            f"{path} was not written by comet-lab (no {GENERATOR} in it), so it was left alone; "
            f"move it away to get an index of the runs in {results}"
        )
    rows = index_rows(results)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _, _ in INDEX_COLUMNS)
    lines = []
    for row in rows:
        run = html.escape(row["run_id"])
        failed = [t["name"] for t in row["thresholds"] if not t.get("passed")]
        verdict = "all thresholds pass" if row["thresholds"] and not failed else ""
        if failed:
            verdict = "failed: " + ", ".join(html.escape(str(n)) for n in failed)
        links = f'<a href="{run}/run.json">run.json</a>'
        if row["report"]:
            links = f'<a href="{run}/report.html">report</a> · ' + links
        outcome = html.escape(str(row["outcome"]))
        if row["reason"]:
            outcome += f' <span class="reason">({html.escape(str(row["reason"]))})</span>'
        cells = "".join(
            f"<td>{_cell(row['summary'].get(key), scale, unit)}</td>"
            for key, _, scale, unit in INDEX_COLUMNS
        )
        lines.append(
            f'<tr class="{html.escape(str(row["outcome"]))}"><td>{html.escape(row["date"])}</td>'
            f"<td>{run}</td><td>{html.escape(str(row['experiment']))}</td><td>{outcome}</td>"
            f"<td>{verdict}</td>{cells}<td>{links}</td></tr>"
        )
    page = INDEX_PAGE.format(generator=GENERATOR, head=head, rows="\n".join(lines), count=len(rows))
    _write_replacing(path, page)
    return path


INDEX_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{generator}<title>comet-lab runs</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.failed td, tr.interrupted td {{ background: #fff3f0; }}
.reason {{ color: #888; }}
</style></head>
<body><h1>comet-lab runs</h1><p>{count} run(s), newest first.</p>
<table><thead><tr><th>date</th><th>run</th><th>experiment</th><th>outcome</th>
<th>thresholds</th>{head}<th>links</th></tr></thead>
<tbody>
{rows}
</tbody></table></body></html>
"""


# ---------------------------------------------------------------- command lines


def report_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``lab report RUN_DIR``: re-render a run's report.html (and the index)."""
    parser = argparse.ArgumentParser(
        prog=prog or "lab report",
        description="Render report.html for an existing results folder (notebooks/report.ipynb)"
        " and regenerate index.html in the folder that holds it (results/index.html); an"
        " index.html comet-lab did not write is left alone, with a line saying so.",
    )
    parser.add_argument("run_dir", type=Path, help="a results/<run-id>/ folder")
    args = parser.parse_args(argv)
    try:
        print(publish_report(args.run_dir))
    except RunFolderError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except PublishError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def compare_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``lab compare RUN RUN... [--out PATH]``: one HTML page comparing the runs."""
    parser = argparse.ArgumentParser(
        prog=prog or "lab compare",
        description="Compare runs side by side (notebooks/compare.ipynb): summary ratios to the "
        "first run, overlaid figures, a warning when the hosts differ.",
    )
    parser.add_argument("runs", type=Path, nargs="+", help="results/<run-id>/ folders")
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="the HTML file to write, its executed notebook beside it (.ipynb); an existing "
        "folder gets compare-<first>-vs-<last>.html and .ipynb inside it (default: that name "
        "beside the first run, in results/)",
    )
    args = parser.parse_args(argv)
    try:
        print(publish_compare(args.runs, args.out))
    except (OutputPathError, RunFolderError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except PublishError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m lab.publish RUN_DIR``: the same as ``lab report``."""
    return report_main(argv, prog or "python -m lab.publish")


if __name__ == "__main__":
    sys.exit(main())
