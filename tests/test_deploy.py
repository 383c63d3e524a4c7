"""lab.deploy: the wheel cache, the wheelhouse's platform tags, and a real deploy over SSH."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
from pathlib import Path

import pytest

from lab import deploy, ssh
from lab.experiment import LOCAL


def test_platform_tags_follow_the_hosts_glibc() -> None:
    target = deploy.TargetPython("3.11", "cpython", "x86_64", "glibc", "2.36")
    tags = target.platforms()
    assert tags[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert tags[-1] == "linux_x86_64"
    assert target.tag == "cp311-x86_64-glibc2.36"
    old = deploy.TargetPython("3.12", "cpython", "aarch64", "glibc", "2.12")
    assert "manylinux2014_aarch64" not in old.platforms()
    assert "manylinux2010_aarch64" in old.platforms()


def test_content_hash_changes_with_any_source_file(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "lab" / "__pycache__").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname='x'\ndependencies=['psutil>=5']\n")
    (root / "lab" / "__init__.py").write_text("")
    first = deploy.content_hash(root)
    (root / "lab" / "__pycache__" / "x.pyc").write_bytes(b"ignored")
    assert deploy.content_hash(root) == first
    (root / "lab" / "new.py").write_text("x = 1\n")
    assert deploy.content_hash(root) != first
    assert deploy.core_requirements(root) == ["psutil>=5"]


def test_wheel_is_built_once_per_content_hash(tmp_path: Path) -> None:
    root = tmp_path / "src"
    shutil.copytree(
        deploy.source_root() / "lab", root / "lab", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(deploy.source_root() / name, root / name)
    cache = tmp_path / "cache"
    wheel = deploy.build_wheel(root, cache)
    assert wheel.path.name.startswith("comet_lab-") and wheel.path.suffix == ".whl"
    assert wheel.path.parent.name == wheel.content_hash
    stamp = wheel.path.stat().st_mtime_ns
    again = deploy.build_wheel(root, cache)
    assert again == wheel and again.path.stat().st_mtime_ns == stamp
    (root / "lab" / "extra_module.py").write_text("VALUE = 1\n")
    changed = deploy.build_wheel(root, cache)
    assert changed.content_hash != wheel.content_hash


def test_source_root_is_this_checkout() -> None:
    root = deploy.source_root()
    assert (root / "pyproject.toml").is_file() and (root / "lab" / "deploy.py").is_file()


async def test_deploy_over_ssh_is_idempotent(tmp_path: Path) -> None:
    spec = dataclasses.replace(LOCAL, workdir=str(tmp_path / "work"))
    server = await ssh.EmbeddedServer().start()
    conn = await ssh.connect(spec, embedded=server)
    try:
        first = await deploy.deploy(conn)
        assert not first.reused
        assert first.workdir == str((tmp_path / "work").resolve())
        check = "import lab, uvloop, httptools, websockets, psutil; print(lab.__file__)"
        out = await conn.run(f"{shlex.quote(first.python)} -c {shlex.quote(check)}")
        # the venv runs the installed wheel, not this checkout
        assert out.stdout.strip().startswith(first.workdir + "/venv/")
        marker = Path(first.workdir) / "venv" / deploy.MARKER
        assert marker.read_text().strip() == first.content_hash
        second = await deploy.deploy(conn)
        assert second.reused and second.python == first.python
        # a different marker (other sources) makes it install again
        marker.write_text("stale\n")
        third = await deploy.deploy(conn)
        assert not third.reused
    finally:
        await conn.close()
        await server.close()


async def test_deploy_names_a_bad_python(tmp_path: Path) -> None:
    spec = dataclasses.replace(LOCAL, workdir=str(tmp_path / "w"), python="/nonexistent/python3")
    server = await ssh.EmbeddedServer().start()
    conn = await ssh.connect(spec, embedded=server)
    try:
        with pytest.raises(deploy.DeployError, match=r"host 'local'.*set `python:`"):
            await deploy.deploy(conn)
    finally:
        await conn.close()
        await server.close()
