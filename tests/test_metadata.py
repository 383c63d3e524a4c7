"""Host and controller metadata, collected for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lab.metadata import collect_controller_metadata, collect_host_metadata, read_sysctl

ROOT = Path(__file__).resolve().parent.parent


def test_host_metadata_has_what_run_json_records() -> None:
    meta = collect_host_metadata()
    for key in ("python", "kernel", "cpu_model", "cpu_count", "mem_total", "sysctls", "rlimits"):
        assert meta[key], key
    assert meta["rlimits"]["nofile"][1] is None or meta["rlimits"]["nofile"][1] > 0
    low, high = meta["sysctls"]["net.ipv4.ip_local_port_range"]
    assert 0 < low < high
    assert meta["packages"]["psutil"]
    json.dumps(meta)


def test_python_m_lab_metadata_prints_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lab.metadata"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["cpu_count"] >= 1


def test_controller_metadata_has_git_state() -> None:
    meta = collect_controller_metadata(ROOT)
    assert meta["packages"]["pandas"]
    if (ROOT / ".git").exists():
        assert len(meta["git_commit"]) == 40 and isinstance(meta["git_dirty"], bool)


def test_read_sysctl(tmp_path: Path) -> None:
    (tmp_path / "net" / "core").mkdir(parents=True)
    (tmp_path / "net" / "core" / "somaxconn").write_text("4096\n")
    assert read_sysctl("net.core.somaxconn", root=str(tmp_path)) == 4096
    assert read_sysctl("net.core.missing", root=str(tmp_path)) is None
