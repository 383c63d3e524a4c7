"""The package's shape: the `lab` command, the dependency layers, environment.yml in step."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from lab.cli import VERBS

ROOT = Path(__file__).resolve().parent.parent


def _norm(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return dict(_norm(r) for r in reqs)


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, spec = _norm(dep)
            if name not in {"python", "pip"}:
                out[name] = spec
    return out


def test_environment_yml_matches_pyproject() -> None:
    pyproject, conda = _pyproject_requirements(), _conda_requirements()
    missing = sorted(set(pyproject) - set(conda))
    extra = sorted(set(conda) - set(pyproject))
    differ = sorted(n for n in set(pyproject) & set(conda) if pyproject[n] != conda[n])
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert not extra, f"in environment.yml but not pyproject.toml: {extra}"
    assert not differ, "version specifiers differ: " + ", ".join(
        f"{n} {pyproject[n]!r} vs {conda[n]!r}" for n in differ
    )


def test_environment_yml_installs_the_project_and_python_311() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert any(line.strip() in {"-e .", "."} for line in pip_section)


def test_core_dependencies_are_only_what_roles_need() -> None:
    core = {
        _norm(r)[0]
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert core <= {"uvloop", "httptools", "websockets", "psutil", "orjson"}, core
    assert not core & {"pandas", "plotly", "asyncssh", "jupyterlab", "pyarrow"}


def test_lab_help_lists_the_seven_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lab", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for verb in ("run", "report", "compare", "doctor", "serve", "agent", "monitor"):
        assert re.search(rf"^\s+{verb}\s+\S", out, re.M), f"{verb} missing from:\n{out}"
    assert set(VERBS) == {"run", "report", "compare", "doctor", "serve", "agent", "monitor"}


def test_unknown_subcommand_fails_with_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "lab" / "py.typed").exists()


def test_import_lab_has_no_side_effects() -> None:
    code = "import sys, lab; print(sorted(m for m in sys.modules if m.startswith('lab')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['lab']"
