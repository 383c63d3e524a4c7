"""`lab run`: run an experiment on its hosts and write ``results/<run-id>/``, tearing down always.

``execute(experiment, overrides, inventory, results_root, progress)`` loads the experiment,
connects to every host over SSH (the embedded server for ``local``), deploys the lab, reads
metadata, clock offsets and limits, plans (``lab.plan.make_plan``), starts monitors, the server
(waits until healthy) and the agents (one common start time), streams their JSON lines as
progress, waits for the agents, and then, whatever happened (success, error, Ctrl-C, SIGTERM,
a host that dropped out), stops every role's process group, checks that nothing of the run is
left, fetches the files by SFTP, builds the tables, summarizes, judges thresholds and writes
``run.json``. ``lab run`` is ``main``; notebooks call ``run_or_load``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab.engine import Engine, Outcome, describe
from lab.progress import Progress, make_progress
from lab.results import RunFolder


def open_folder(results_root: Path, name: str, folder: Path | None = None) -> RunFolder:
    """A new run folder under ``results_root``, or ``folder`` itself (made if missing)."""
    if folder is None:
        return RunFolder.create(Path(results_root), name)
    for sub in ("raw", "logs"):
        (Path(folder) / sub).mkdir(parents=True, exist_ok=True)
    return RunFolder.open(Path(folder))


def execute(
    experiment_path: str | Path,
    overrides: Mapping[str, str] | None = None,
    inventory_path: str | Path | None = None,
    results_root: str | Path = "results",
    progress: str | Progress = "auto",
    *,
    folder: str | Path | None = None,
) -> Path:
    """Run an experiment end to end; return its results folder (also when failed/interrupted).

    Ctrl-C (KeyboardInterrupt) and SIGTERM stop the run cleanly: roles are torn down, files
    fetched and run.json says ``interrupted``; a second Ctrl-C shortens the grace period.
    Bad input (experiment, inventory) raises ``ExperimentError`` before any folder is made.
    """
    from lab.experiment import load_experiment

    overrides = dict(overrides or {})
    exp = load_experiment(experiment_path, overrides, inventory=inventory_path)
    run_folder = open_folder(Path(results_root), exp.name, Path(folder) if folder else None)
    engine = Engine(exp, run_folder, make_progress(progress), overrides)
    box: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()

    def work() -> None:
        async def main() -> None:
            box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
            ready.set()
            if engine.stop_reason:  # stopped before the loop was up
                box["task"].cancel()
            await engine.run()

        try:
            asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            ready.set()
            done.set()

    def stop(reason: str) -> None:
        """Ask the engine to stop (first time) or to hurry its teardown (second time)."""
        if engine.stop_reason:
            engine.hurry = True
            return
        engine.stop_reason = reason
        loop, task = box.get("loop"), box.get("task")
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    # Not a daemon: the interpreter waits for the teardown even if this thread dies.
    thread = threading.Thread(target=work, name="lab-run")
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # Own handlers for both (SIGINT too: a background job inherits it ignored).
        for signum, reason in (
            (signal.SIGINT, "stopped by SIGINT"),
            (signal.SIGTERM, "stopped by SIGTERM"),
        ):

            def handler(_signum: int, _frame: Any, reason: str = reason) -> None:
                stop(reason)

            previous[signum] = signal.signal(signum, handler)
    thread.start()
    try:
        # Event.wait, not Thread.join: a KeyboardInterrupt inside join can make is_alive() lie.
        while not done.is_set():
            try:
                done.wait(0.2)
            except KeyboardInterrupt:  # a notebook kernel's interrupt
                stop("stopped by KeyboardInterrupt")
        thread.join()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if "error" in box:
        raise box["error"]
    return Path(run_folder.path)


def run_or_load(
    experiment: str | Path,
    *,
    inventory: str | Path | None = None,
    overrides: Mapping[str, str] | None = None,
    results_dir: str | Path = "",
    results_root: str | Path = "results",
) -> Path:
    """For notebooks: the folder of ``results_dir`` if it holds a run.json, else run into it
    (into a new folder under ``results_root`` when ``results_dir`` is empty); text progress."""
    if results_dir and (Path(results_dir) / "run.json").is_file():
        return Path(results_dir)
    return execute(
        experiment,
        overrides,
        inventory,
        results_root,
        Progress(sys.stdout),
        folder=results_dir or None,
    )


def exit_code(record: Mapping[str, Any]) -> int:
    """0 when the run completed and every threshold passed; 130 interrupted; 1 otherwise."""
    if record.get("outcome") == Outcome.INTERRUPTED.value:
        return 130
    if record.get("outcome") != Outcome.COMPLETED.value:
        return 1
    return 0 if all(t.get("passed") for t in record.get("thresholds") or []) else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lab.run",
        description="Run an experiment end to end over SSH and write results/<run-id>/; "
        "the last line printed is the folder's path. A host still holding an earlier run's "
        "TIME_WAIT sockets (over 5,000) is given up to 70 s for them to expire first.",
    )
    parser.add_argument("experiment", help="experiment file, e.g. experiments/smoke.yaml")
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the experiment (dotted: phases.0.rate_per_s=500)",
    )
    parser.add_argument("--inventory", help="inventory file: the hosts (replaces the experiment's)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    parser.add_argument("--no-report", action="store_true", help="do not publish report.html")
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "text"),
        default="auto",
        help="progress on stdout: a live bar (rich), or a text line every few seconds; auto "
        "(the default) picks the bar on a terminal, text otherwise",
    )
    args = parser.parse_args(argv)
    from lab.experiment import ExperimentError, parse_overrides

    try:
        folder = execute(
            args.experiment,
            parse_overrides(args.param),
            args.inventory,
            args.results,
            args.progress,
        )
    except (ExperimentError, FileNotFoundError) as exc:
        print(f"lab run: {exc}", file=sys.stderr)
        return 2
    record = json.loads((folder / "run.json").read_text())
    code = exit_code(record)
    reason = f" ({record['reason']})" if record.get("reason") else ""
    print(f"outcome: {record.get('outcome')}{reason}", file=sys.stderr)
    for t in record.get("thresholds") or []:
        verdict = "pass" if t.get("passed") else "FAIL"
        actual = t.get("actual")
        got = "not measured: no data" if actual is None else f"actual {actual}"
        print(f"  {verdict}: {t['name']} {t['op']} {t['value']} ({got})", file=sys.stderr)
    if not args.no_report:
        try:
            from lab.publish import publish_run

            report = publish_run(folder)
            print(f"report: {report}", file=sys.stderr)
        except Exception as exc:
            print(f"lab run: publishing the report failed: {describe(exc)}", file=sys.stderr)
            code = code or 1
    print(folder)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
