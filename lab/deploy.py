"""Put the lab on a host: a wheel of this checkout plus a wheelhouse, installed offline in a venv.

``deploy(conn)`` makes ``<workdir>/venv`` on the host run exactly this checkout's ``lab``:
1. ``build_wheel()`` builds the lab wheel once per content hash of the package sources
   (cached under ``~/.cache/comet-lab/wheels/<hash>/``);
2. ``build_wheelhouse(target)`` downloads wheels of the core dependencies for the host's
   Python version and platform once (``~/.cache/comet-lab/wheelhouse/<tag>-<reqs>/``), so hosts
   without internet work;
3. both go up by SFTP, the host creates a venv and installs with ``pip --no-index``;
4. a marker file holds the content hash: the next deploy of the same code skips all of it.
Set ``COMET_LAB_CACHE`` to move the cache. Next: ``lab.run`` starts roles with
``Deployment.python``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.ssh import HostConnection

MARKER = ".comet-lab-deployed"
PIP_TIMEOUT_S = 600.0


class DeployError(RuntimeError):
    """The lab could not be built or installed: the message names the host or step and the fix."""


@dataclass(frozen=True, slots=True)
class Wheel:
    """The lab wheel built from this checkout, named by the hash of its sources."""

    path: Path
    content_hash: str


@dataclass(frozen=True, slots=True)
class TargetPython:
    """A host's interpreter as far as wheels care: version, implementation, CPU, C library."""

    version: str  # "3.11"
    implementation: str  # "cpython"
    machine: str  # "x86_64"
    libc: str  # "glibc"
    libc_version: str  # "2.36"

    @property
    def tag(self) -> str:
        """Names the wheelhouse: ``cp311-x86_64-glibc2.36``."""
        impl = "cp" if self.implementation == "cpython" else self.implementation
        return (
            f"{impl}{self.version.replace('.', '')}-{self.machine}-{self.libc}{self.libc_version}"
        )

    def platforms(self) -> list[str]:
        """The wheel platform tags this host accepts, newest first (as pip computes them)."""
        arch = self.machine
        out: list[str] = []
        if self.libc == "glibc":
            major, _, minor = self.libc_version.partition(".")
            if major == "2" and minor.isdigit():
                out += [f"manylinux_2_{m}_{arch}" for m in range(int(minor), 4, -1)]
                legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
                out += [f"{name}_{arch}" for m, name in legacy.items() if int(minor) >= m]
        out.append(f"linux_{arch}")
        return out


@dataclass(frozen=True, slots=True)
class Deployment:
    """The lab installed on one host: run roles with ``python -m lab.<role>``."""

    host: str
    workdir: str  # absolute, on the host
    python: str  # the venv's interpreter, absolute, on the host
    content_hash: str
    reused: bool  # True when the marker matched and nothing was installed


def cache_dir() -> Path:
    """Where built wheels and wheelhouses are kept (``$COMET_LAB_CACHE`` or ~/.cache/comet-lab)."""
    env = os.environ.get("COMET_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comet-lab"


def source_root() -> Path:
    """The checkout that holds ``pyproject.toml`` and ``lab/``; the wheel is built from it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise DeployError(
            f"no pyproject.toml beside the lab package ({root}): deploying needs a source "
            "checkout; install the lab with `pip install -e .` from the repository"
        )
    return root


def _source_files(root: Path) -> list[Path]:
    files = [root / n for n in ("pyproject.toml", "README.md", "LICENSE") if (root / n).is_file()]
    for path in sorted((root / "lab").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    return files


def content_hash(root: Path | None = None) -> str:
    """A hash of everything that goes into the wheel: changes when any source file changes."""
    root = root or source_root()
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def core_requirements(root: Path | None = None) -> list[str]:
    """The core dependencies (what a host needs to run the roles), from pyproject.toml."""
    root = root or source_root()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [str(r) for r in project.get("dependencies", [])]


def _pip(args: Sequence[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-3000:]
        raise DeployError(f"{what} failed (`{shlex.join(cmd)}`): {tail}")


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Move a finished build into the cache in one step, so readers never see half of it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process got there first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def build_wheel(root: Path | None = None, cache: Path | None = None) -> Wheel:
    """The lab wheel for the current sources, built once per content hash (hatchling via pip)."""
    root = root or source_root()
    cache = cache or cache_dir()
    digest = content_hash(root)
    dest = cache / "wheels" / digest
    found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if not found:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache / "wheels"))
        _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(root)],
            "building the lab wheel",
        )
        _publish_dir(tmp, dest)
        found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise DeployError(f"expected one wheel in {dest}, found {len(found)}: delete the folder")
    return Wheel(found[0], digest)


def _requirements_key(requirements: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]


def build_wheelhouse(
    target: TargetPython, requirements: Sequence[str], cache: Path | None = None
) -> Path:
    """Wheels of ``requirements`` (and their dependencies) for ``target``, downloaded once."""
    cache = cache or cache_dir()
    dest = cache / "wheelhouse" / f"{target.tag}-{_requirements_key(requirements)}"
    if (dest / ".complete").is_file():
        return dest
    if target.implementation != "cpython":
        raise DeployError(
            f"the host's python is {target.implementation}: the lab needs CPython {target.version}"
        )
    (cache / "wheelhouse").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.tag}-", dir=cache / "wheelhouse"))
    args = ["download", "-q", "--only-binary=:all:", "-d", str(tmp)]
    args += ["--python-version", target.version, "--implementation", "cp"]
    for platform in target.platforms():
        args += ["--platform", platform]
    _pip([*args, *requirements], f"downloading the core dependencies for {target.tag}")
    (tmp / ".complete").write_text(json.dumps(sorted(p.name for p in tmp.glob("*.whl"))))
    _publish_dir(tmp, dest)
    return dest


_PROBE = (
    "import json, platform, sys; "
    "print(json.dumps([sys.implementation.name, '%d.%d' % sys.version_info[:2], "
    "platform.machine(), *platform.libc_ver()]))"
)


async def probe_target(conn: HostConnection, python: str) -> TargetPython:
    """Ask the host's python what wheels it takes."""
    from lab.ssh import RemoteCommandError

    try:
        result = await conn.run(f"{shlex.quote(python)} -c {shlex.quote(_PROBE)}", timeout_s=60)
    except RemoteCommandError as exc:
        raise DeployError(
            f"host {conn.name!r}: cannot run its python {python!r} ({exc}); set `python:` for the "
            "host in the inventory to a Python >= 3.11 with the venv module"
        ) from exc
    impl, version, machine, libc, libc_version = json.loads(result.stdout.strip().splitlines()[-1])
    if tuple(int(x) for x in version.split(".")) < (3, 11):
        raise DeployError(
            f"host {conn.name!r}: {python} is Python {version}; the lab needs >= 3.11: set "
            "`python:` for the host to a newer interpreter"
        )
    return TargetPython(version, impl, machine, libc or "unknown", libc_version or "0")


async def _upload_dir(conn: HostConnection, local: Path, remote: str) -> None:
    present = set(await conn.listdir(remote))
    for path in sorted(local.glob("*.whl")):
        if path.name not in present:
            await conn.put(path, f"{remote}/{path.name}")


def _requirement_names(requirements: Sequence[str]) -> list[str]:
    return [m.group(0) for r in requirements if (m := re.match(r"[A-Za-z0-9_.\-]+", r))]


async def deploy(
    conn: HostConnection,
    *,
    python: str | None = None,
    workdir: str | None = None,
    root: Path | None = None,
    cache: Path | None = None,
) -> Deployment:
    """Install this checkout's lab in ``<workdir>/venv`` on the host; skip when already there."""
    python = python or conn.spec.python
    workdir_abs = await conn.resolve_dir(workdir or conn.spec.workdir)
    root = root or source_root()
    digest = content_hash(root)
    venv = f"{workdir_abs}/venv"
    venv_python = f"{venv}/bin/python"
    marker = f"{venv}/{MARKER}"
    check = await conn.run(f"cat {shlex.quote(marker)} 2>/dev/null", check=False)
    if check.stdout.strip() == digest:
        return Deployment(conn.name, workdir_abs, venv_python, digest, reused=True)

    target = await probe_target(conn, python)
    wheel = build_wheel(root, cache)
    requirements = core_requirements(root)
    house = build_wheelhouse(target, requirements, cache)
    remote_wheel_dir = f"{workdir_abs}/wheels/{digest}"
    remote_house = f"{workdir_abs}/wheelhouse/{house.name}"
    await conn.run(f"mkdir -p {shlex.quote(remote_wheel_dir)} {shlex.quote(remote_house)}")
    await _upload_dir(conn, wheel.path.parent, remote_wheel_dir)
    await _upload_dir(conn, house, remote_house)

    q = shlex.quote
    pip = f"{q(venv_python)} -m pip --disable-pip-version-check -q install --no-index"
    script = " && ".join(
        [
            f"cd {q(workdir_abs)}",
            # another controller may have finished the same install while we waited for the lock
            f'{{ test "$(cat {q(marker)} 2>/dev/null)" != {digest} || exit 0; }}',
            f"{{ test -x {q(venv_python)} || {q(python)} -m venv {q(venv)}; }}",
            f"rm -f {q(marker)}",
            f"{pip} --find-links {q(remote_house)} "
            + " ".join(q(r) for r in _requirement_names(requirements)),
            f"{pip} --no-deps --force-reinstall {q(remote_wheel_dir + '/' + wheel.path.name)}",
            f"{q(venv_python)} -c 'import lab'",
            f"echo {digest} > {q(marker)}",
        ]
    )
    # flock serializes two controllers deploying to one host at once (util-linux; else plain).
    lock = q(f"{workdir_abs}/.deploy.lock")
    command = (
        f"if command -v flock >/dev/null; then flock {lock} sh -c {q(script)}; "
        f"else sh -c {q(script)}; fi"
    )
    from lab.ssh import RemoteCommandError

    try:
        await conn.run(command, timeout_s=PIP_TIMEOUT_S)
    except RemoteCommandError as exc:
        raise DeployError(
            f"installing the lab on host {conn.name!r} in {venv} failed: {exc}. Fix: check that "
            f"`{python} -m venv` works there (Debian: apt-get install python3-venv) and that "
            f"{workdir_abs} is writable"
        ) from exc
    return Deployment(conn.name, workdir_abs, venv_python, digest, reused=False)
