"""The results folder of a run, and the tidy Parquet tables built from what the roles wrote.

``RunFolder.create(results_root, experiment_name)`` makes ``results/<run-id>/`` with ``raw/``
and ``logs/``; ``write_run_json(record)`` replaces ``run.json`` atomically (call it as often as
the run has news). After the files are fetched into ``raw/<host>/``, ``build_tables(folder,
clock_offsets)`` turns the JSON-line streams and the agents' ``.rec`` files into the tables of
results/README.md, with times corrected to the controller's clock. It works on partial data
(an interrupted run, a truncated last line, a missing role): every table is written, empty
when nothing fed it. Then ``lab.stats.load_tables`` reads them.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.histogram import Histogram

SCHEMA_VERSION = 1
FAILURES = ("refused", "timeout", "reset", "no_port", "no_files", "http", "other")

# Table name → ordered columns and their pandas dtypes (results/README.md).
_F, _I, _S, _B = "float64", "Int64", "string", "boolean"
TABLES: dict[str, dict[str, str]] = {
    "agent": {
        "t": _F,
        "host": _S,
        "agent": _S,
        "end": _B,
        "elapsed_s": _F,
        "planned": _I,
        "started": _I,
        "connected": _I,
        "open": _I,
        "closed": _I,
        "dropped": _I,
        **{f"failed_{r}": _I for r in FAILURES},
        "msgs_in": _I,
        "msgs_out": _I,
        "bytes_in": _I,
        "bytes_out": _I,
        "lost": _I,
        "dup": _I,
        "reordered": _I,
        "untimed": _I,
        "publish_errors": _I,
        "lag_ms": _F,
        "cpu_percent": _F,
        "uss": _I,
        "saturated": _B,
        "connect_p50_ms": _F,
        "connect_p99_ms": _F,
        "connect_max_ms": _F,
        "delivery_p50_ms": _F,
        "delivery_p99_ms": _F,
        "delivery_max_ms": _F,
        "read_p50_ms": _F,
        "read_p99_ms": _F,
        "read_max_ms": _F,
    },
    "server": {
        "t": _F,
        "host": _S,
        "worker": _I,
        "pid": _I,
        "uptime_s": _F,
        "online": _I,
        "events": _I,
        "connects": _I,
        "messages": _I,
        "closes": _I,
        "pcs": _I,
        "restarts": _I,
        "fanout_ms": _F,
        "fanout_subscribers": _I,
        "fanout_id": _I,
        "fanout_c": _I,
    },
    "monitor_host": {
        "t": _F,
        "host": _S,
        "mem_total": _I,
        "mem_used": _I,
        "mem_available": _I,
        "tcp_inuse": _I,
        "tcp_orphan": _I,
        "tcp_tw": _I,
        "tcp_alloc": _I,
        "tcp_mem_bytes": _I,
        "tcp_slab_bytes": _I,
        "self_cpu_percent": _F,
    },
    "monitor_cpu": {"t": _F, "host": _S, "core": _I, "cpu_percent": _F},
    "monitor_procs": {
        "t": _F,
        "host": _S,
        "pid": _I,
        "role": _S,
        "cpu_percent": _F,
        "rss": _I,
        "uss": _I,
        "num_fds": _I,
        "threads": _I,
    },
    "connections": {
        "host": _S,
        "agent": _S,
        "proc": _I,
        "conn": _I,
        "scheduled": _F,
        "started": _F,
        "connected": _F,
        "closed": _F,
        "outcome": _S,
        "connect_ms": _F,
    },
}


LATEST = "latest"


def _point_latest(root: Path, run_id: str) -> None:
    """``<results>/latest`` → the newest run folder (what notebooks/report.ipynb opens by
    default). Replaced atomically; where links cannot be made, there is none."""
    tmp = root / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_id, target_is_directory=True)
        os.replace(tmp, root / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class RunFolder:
    """One run's folder: ``run.json``, ``raw/<host>/``, ``logs/``, the Parquet tables."""

    path: Path
    run_id: str

    @classmethod
    def create(
        cls, results_root: Path, experiment_name: str, *, now: float | None = None
    ) -> RunFolder:
        """A new folder ``<results_root>/<YYYYmmdd-HHMMSS>-<name>`` (UTC; ``-2``… if taken)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
        base = f"{stamp}-{experiment_name}"
        root = Path(results_root)
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            run_id = base if n == 1 else f"{base}-{n}"
            try:
                (root / run_id).mkdir()
            except FileExistsError:
                continue
            folder = cls(root / run_id, run_id)
            folder.raw_dir.mkdir()
            folder.logs_dir.mkdir()
            _point_latest(root, run_id)
            return folder
        raise FileExistsError(f"{root}: no free run folder name for {base}")

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """An existing run folder."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a run folder")
        return cls(path, path.name)

    @property
    def raw_dir(self) -> Path:
        return self.path / "raw"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def host_raw_dir(self, host: str) -> Path:
        """``raw/<host>/``, created; the controller fetches a host's role files here."""
        d = self.raw_dir / host
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_run_json(self, record: dict[str, Any]) -> Path:
        """Replace run.json atomically (NaN/inf become null: run.json is strict JSON)."""
        text = json.dumps(_json_safe(record), indent=2, sort_keys=False, allow_nan=False)
        fd, tmp = tempfile.mkstemp(prefix=".run.json.", dir=self.path)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.run_json)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.run_json

    def read_run_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run_json.read_text())
        return data


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- reading raw


def iter_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; skips blank, truncated or foreign lines."""
    try:
        f = path.open("rb")
    except OSError:
        return
    with f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and "kind" in obj:
                yield obj


def _num(d: Mapping[str, Any], key: str) -> Any:
    v = d.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _hist_ms(data: Any) -> tuple[float, float, float]:
    """p50, p99, max in ms of a histogram given in us (NaN when empty or absent)."""
    nan = math.nan
    if not isinstance(data, Mapping) or not data.get("buckets"):
        return nan, nan, nan
    try:
        h = Histogram.from_json(dict(data))
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "ns": 1e-6}.get(str(data.get("unit", "us")), 1e-3)
        vals = (h.percentile(50.0), h.percentile(99.0), h.max())
    except (ValueError, TypeError, KeyError, IndexError):
        return nan, nan, nan
    return tuple(nan if v is None else v * scale for v in vals)  # type: ignore[return-value]


def _agent_row(host: str, t: float, line: Mapping[str, Any]) -> dict[str, Any]:
    failed = line.get("failed") or {}
    procs = [p for p in line.get("procs") or [] if isinstance(p, Mapping)]
    row: dict[str, Any] = {
        "t": t,
        "host": host,
        "agent": str(line.get("agent", "")),
        "end": line.get("kind") == "agent_end",
        **{k: _num(line, k) for k in ("elapsed_s", "planned", "started", "connected", "open")},
        "closed": _num(line, "closed"),
        "dropped": _num(line, "dropped"),
        **{f"failed_{r}": _num(failed, r) or 0 for r in FAILURES},
        **{
            k: _num(line, k)
            for k in (
                "msgs_in",
                "msgs_out",
                "bytes_in",
                "bytes_out",
                "lost",
                "dup",
                "reordered",
                "untimed",
                "publish_errors",
            )
        },
        "lag_ms": _num(line, "lag_ms"),
        "cpu_percent": _sum_known(procs, "cpu_percent"),
        "uss": _sum_known(procs, "uss"),
        "saturated": bool(line.get("saturated", False)),
    }
    for name in ("connect", "delivery", "read"):
        p50, p99, mx = _hist_ms(line.get(f"{name}_hist"))
        row.update({f"{name}_p50_ms": p50, f"{name}_p99_ms": p99, f"{name}_max_ms": mx})
    return row


def _sum_known(procs: list[Mapping[str, Any]], key: str) -> float | None:
    """A figure summed over the agent's processes; null unless every process gave it (a
    process's first line has no CPU figure yet: a partial sum would read as a dip)."""
    values = [_num(p, key) for p in procs]
    if not values or any(v is None for v in values):
        return None
    return float(sum(v for v in values if v is not None))


def _server_rows(host: str, t: float, line: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i, w in enumerate(line.get("workers") or []):
        if not isinstance(w, Mapping):
            continue
        row: dict[str, Any] = {"t": t, "host": host, "worker": w.get("worker", i)}
        row["uptime_s"] = _num(line, "uptime_s")
        for k in (
            "pid", "online", "events", "connects", "messages", "closes", "pcs", "restarts",
            "fanout_ms", "fanout_subscribers", "fanout_id", "fanout_c",
        ):  # fmt: skip
            row[k] = _num(w, k)
        rows.append(row)
    return rows


def _monitor_rows(
    host: str, t: float, line: Mapping[str, Any], out: dict[str, list[dict[str, Any]]]
) -> None:
    mem = line.get("mem") or {}
    sock = line.get("sockstat") or {}
    page = _num(line, "page_size") or 4096
    pages = _num(sock, "tcp_mem_pages")
    out["monitor_host"].append(
        {
            "t": t,
            "host": host,
            "mem_total": _num(mem, "total"),
            "mem_used": _num(mem, "used"),
            "mem_available": _num(mem, "available"),
            **{k: _num(sock, k) for k in ("tcp_inuse", "tcp_orphan", "tcp_tw", "tcp_alloc")},
            "tcp_mem_bytes": None if pages is None else pages * page,
            "tcp_slab_bytes": _num(line, "tcp_slab_bytes"),
            "self_cpu_percent": _num(line, "self_cpu_percent"),
        }
    )
    for core, pct in enumerate(line.get("cpu_percent") or []):
        out["monitor_cpu"].append({"t": t, "host": host, "core": core, "cpu_percent": pct})
    for p in line.get("procs") or []:
        if isinstance(p, Mapping):
            row = {"t": t, "host": host, "role": str(p.get("role", ""))}
            for k in ("pid", "cpu_percent", "rss", "uss", "num_fds", "threads"):
                row[k] = _num(p, k)
            out["monitor_procs"].append(row)


_REC_AGENT = re.compile(r"^(?P<agent>.+?)(?:[.-]p\d+)?$")


def _connection_rows(host: str, path: Path, offset: float) -> dict[str, list[Any]]:
    from lab.agent.records import read_records

    cols = read_records(path)
    n = len(cols["conn"])
    stem = path.name.split(".rec")[0]
    m = _REC_AGENT.match(stem)
    agent = m.group("agent") if m else stem
    out: dict[str, list[Any]] = {"host": [host] * n, "agent": [agent] * n}
    out["proc"], out["conn"], out["outcome"] = cols["proc"], cols["conn"], cols["outcome"]
    for k in ("scheduled", "started", "connected", "closed"):
        out[k] = [v - offset for v in cols[k]]
    out["connect_ms"] = [
        (c - s) * 1000.0 for c, s in zip(cols["connected"], cols["scheduled"], strict=True)
    ]
    return out


def read_raw(
    folder: Path, clock_offsets: Mapping[str, float]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, list[Any]]], list[str]]:
    """Rows of each stream table, column blocks of connections, and problems met."""
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in TABLES if k != "connections"}
    conn_blocks: list[dict[str, list[Any]]] = []
    problems: list[str] = []
    raw = Path(folder) / "raw"
    hosts = sorted(p for p in raw.iterdir() if p.is_dir()) if raw.is_dir() else []
    for host_dir in hosts:
        host = host_dir.name
        offset = float(clock_offsets.get(host, 0.0))
        for path in sorted(host_dir.glob("*.jsonl")):
            for line in iter_lines(path):
                t_raw = _num(line, "t")
                if t_raw is None:
                    continue
                t = t_raw - offset
                kind = line["kind"]
                if kind in ("agent", "agent_end"):
                    rows["agent"].append(_agent_row(host, t, line))
                elif kind == "server":
                    rows["server"].extend(_server_rows(host, t, line))
                elif kind == "monitor":
                    _monitor_rows(host, t, line, rows)
        # the coordinator joins its processes' <name>.rec.pN parts into <name>.rec; when it was
        # killed before joining, the parts are all there is
        recs = sorted(host_dir.glob("*.rec"))
        recs += sorted(
            p
            for p in host_dir.glob("*.rec.p*")
            if not p.with_name(p.name.split(".rec.")[0] + ".rec").exists()
        )
        for path in recs:
            try:
                conn_blocks.append(_connection_rows(host, path, offset))
            except Exception as exc:  # a damaged file must not cost the other tables
                problems.append(f"{path}: {exc}")
    return rows, conn_blocks, problems


def _frame(name: str, data: Any) -> Any:
    import pandas as pd

    schema = TABLES[name]
    df = pd.DataFrame(data, columns=list(schema))
    for col, dtype in schema.items():
        if dtype == _F:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        elif dtype == _I:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif dtype == _B:
            df[col] = df[col].astype("boolean")
        else:
            df[col] = df[col].astype("string")
    return df


def build_tables(folder: Path, clock_offsets: Mapping[str, float]) -> list[Path]:
    """Write the Parquet tables of results/README.md from ``raw/``; return their paths.

    ``clock_offsets``: host name → host clock minus controller clock (s); times become the
    controller's. Every table is written (empty with its columns when nothing fed it).
    """
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows, conn_blocks, problems = read_raw(folder, clock_offsets)
    written = []
    for name, table_rows in rows.items():
        df = _frame(name, table_rows).sort_values(["t", "host"], kind="stable")
        written.append(_write(df, folder / f"{name}.parquet"))
    if conn_blocks:
        conns = pd.concat([_frame("connections", b) for b in conn_blocks], ignore_index=True)
    else:
        conns = _frame("connections", [])
    written.append(_write(conns, folder / "connections.parquet"))
    if problems:
        (folder / "logs").mkdir(exist_ok=True)
        (folder / "logs" / "build_tables.log").write_text("\n".join(problems) + "\n")
    return written


def _write(df: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    df.reset_index(drop=True).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
