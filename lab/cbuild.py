"""Building comet-lab's plain-C helpers with the host's C compiler, at first use: the load
agent's fast path (``lab/agent/fastpath.c``) and the server's broadcast loop
(``lab/comet/fanout.c``).

Each is plain C with no Python API, loaded with ctypes, so no Python headers are needed. It
is compiled with ``$CC`` (or ``cc``/``gcc``) into ``~/.cache/comet-lab/c/``
(``$COMET_LAB_CACHE/c``), named by a hash of its source and the machine, so each host builds
each version once. Several processes may build at once: the file appears whole, by rename.
Without a compiler the caller says why (``build``'s second value) and uses its Python path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where libraries are built: ``c/`` in ``lab.deploy``'s cache (``$COMET_LAB_CACHE``, else
    ``~/.cache/comet-lab``)."""
    from lab.deploy import cache_dir as lab_cache

    return lab_cache() / "c"


def switched_off(switch: str) -> bool:
    """The environment variable ``switch`` is ``0``: that C part is not to be used."""
    return os.environ.get(switch, "1") == "0"


def library_path(source: Path) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{digest}-{os.uname().machine}.so"


def find_compiler() -> str | None:
    """The C compiler ``build()`` uses: ``$CC`` if set (a name on PATH or a path), else
    ``cc`` or ``gcc`` on PATH; None if there is none (``lab doctor`` reports it)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def build(source: Path, switch: str, compile_it: bool = True) -> tuple[Path | None, str]:
    """``source`` compiled, now if needed: ``(path, "")``, or ``(None, why)`` naming the
    problem and the fix. The environment variable ``switch`` set to ``0`` turns it off.
    ``compile_it`` False: only a library already built."""
    if switched_off(switch):
        return None, f"turned off by {switch}=0"
    try:
        out = library_path(source)
    except OSError as exc:
        return None, f"cannot read {source}: {exc.strerror}"
    if out.exists():
        return out, ""
    if not compile_it:
        return None, f"{out} is not built (no C compiler?)"
    cc = find_compiler()
    if not cc:
        if os.environ.get("CC"):
            cc_env = os.environ["CC"]
            return None, f"CC={cc_env} is not a program on this host (unset CC, or fix it)"
        return None, "no C compiler on this host (install one: apt-get install gcc)"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        return None, f"cannot write to {out.parent} ({exc.strerror}): set COMET_LAB_CACHE"
    try:
        res = subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            return None, f"{cc} failed on {source.name}: {detail[0] if detail else res.returncode}"
        os.replace(tmp, out)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{cc} could not build {source.name}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out, ""


_loaded: dict[tuple[Path, bool], tuple[ctypes.CDLL | None, str]] = {}


def load(
    source: Path,
    switch: str,
    build_it: bool = True,
    setup: Callable[[ctypes.CDLL], None] | None = None,
) -> tuple[ctypes.CDLL | None, str]:
    """``source``'s library loaded, once per process: ``(lib, "")`` or ``(None, why)``;
    ``setup(lib)`` (its functions' argument types) runs once, when it is loaded.
    ``build_it`` False: only a library already built (a process whose parent built it, or
    failed to, does not run the compiler again)."""
    got = _loaded.get((source, build_it))
    if got is not None:
        return got
    path, why = build(source, switch, compile_it=build_it)
    lib: ctypes.CDLL | None = None
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            why = f"cannot load {path}: {exc}"
        else:
            if setup is not None:
                setup(lib)
    _loaded[(source, build_it)] = (lib, why)
    return lib, why
