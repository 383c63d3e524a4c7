"""The tables of a results folder, read once: ``load_tables(folder) -> Tables``.

What ``lab.stats`` computes from: ``run.json``, the six Parquet tables of results/README.md
(empty frames with the documented columns when one is missing, as after an interrupted run),
and what only the agents' raw streams hold (latency histograms, their process ids).
``lab.stats`` re-exports ``load_tables`` and ``Tables``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab.results import TABLES

# The columns of each table and their dtypes: one source, the writer's (lab.results.TABLES).
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {name: tuple(cols) for name, cols in TABLES.items()}


class StatsError(ValueError):
    """A results folder or a threshold that the statistics cannot use; says what and the fix."""


@dataclass(frozen=True, slots=True)
class Tables:
    """The tables of one results folder (empty frames with the documented columns when a
    table is missing) and its ``run.json`` (``{}`` when missing). Made by ``load_tables``."""

    folder: Path
    run: dict[str, Any]
    agent: pd.DataFrame
    server: pd.DataFrame
    monitor_host: pd.DataFrame
    monitor_cpu: pd.DataFrame
    monitor_procs: pd.DataFrame
    connections: pd.DataFrame
    histograms: pd.DataFrame  # metric (connect|delivery|read), index, count: merged over the run
    pids: pd.DataFrame  # host, role, pid: the processes known to be this run's own


def empty_table(name: str) -> pd.DataFrame:
    """An empty frame with the documented columns of table ``name``."""
    return pd.DataFrame({col: pd.Series(dtype=dtype) for col, dtype in TABLES[name].items()})


def load_tables(folder: Path | str) -> Tables:
    """Read ``run.json`` and the Parquet tables of a results folder (missing ones are empty)."""
    path = Path(folder)
    if not path.is_dir():
        raise StatsError(f"results folder {path} does not exist; pass a results/<run-id> folder")
    run_json = path / "run.json"
    try:
        run = json.loads(run_json.read_text()) if run_json.exists() else {}
    except json.JSONDecodeError as exc:
        raise StatsError(f"{run_json} is not valid JSON ({exc}); re-run `lab run`") from exc
    frames: dict[str, pd.DataFrame] = {}
    for name, columns in TABLE_COLUMNS.items():
        file = path / f"{name}.parquet"
        frame = pd.read_parquet(file) if file.exists() else empty_table(name)
        for col in columns:
            if col not in frame.columns:  # a folder written before the column existed
                frame[col] = pd.Series(index=frame.index, dtype=TABLES[name][col])
        frames[name] = frame
    histograms, agent_pids = read_agent_streams(path / "raw")
    server = frames["server"]
    server_pids = server[["host", "pid"]].dropna().drop_duplicates().assign(role="server")
    pids = pd.concat([server_pids, agent_pids], ignore_index=True)
    return Tables(folder=path, run=run, histograms=histograms, pids=pids, **frames)


def read_agent_streams(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From the agents' raw streams (every ``agent`` line under ``raw/<host>/``): their latency
    histograms merged over the run (columns metric, index, count; unit us) and their process
    ids (columns host, pid, role)."""
    counts: dict[tuple[str, int], int] = {}
    pids: set[tuple[str, int]] = set()
    for file in sorted(raw.glob("*/*.jsonl")) if raw.is_dir() else []:
        with file.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if '"agent"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run
                if not isinstance(record, dict) or record.get("kind") != "agent":
                    continue
                for proc in record.get("procs") or []:
                    if isinstance(proc, dict) and isinstance(proc.get("pid"), int):
                        pids.add((file.parent.name, proc["pid"]))
                for metric in ("connect", "delivery", "read"):
                    hist = record.get(f"{metric}_hist") or {}
                    if hist.get("unit", "us") != "us":
                        continue
                    for index, count in hist.get("buckets") or []:
                        key = (metric, int(index))
                        counts[key] = counts.get(key, 0) + int(count)
    histograms = pd.DataFrame(
        {
            "metric": [k[0] for k in counts],
            "index": np.array([k[1] for k in counts], dtype="int64"),
            "count": np.array(list(counts.values()), dtype="int64"),
        }
    )
    agent_pids = pd.DataFrame(
        {"host": [h for h, _ in pids], "pid": [p for _, p in pids], "role": "agent"}
    )
    return histograms, agent_pids
