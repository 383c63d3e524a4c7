"""What a run records about its machines: the host is part of the experiment.

``collect_host_metadata()`` runs ON a target host with the core dependencies only (python,
kernel, CPU model, sysctls, rlimits, memory, package versions); ``python -m lab.metadata``
prints it as one JSON object, which ``lab.run`` reads over SSH into ``run.json: hosts[]``.
Its keys are a superset of the facts ``lab.ssh.gather_facts`` reads, so ``lab.doctor.check_host``
takes either. ``collect_controller_metadata()`` runs on the controller (git commit, dirty flag,
package versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

SYSCTLS = (
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_tw_reuse",
    "net.core.netdev_max_backlog",
    "fs.file-max",
    "fs.nr_open",
    "net.ipv4.ip_nonlocal_bind",
)
CORE_PACKAGES = ("comet-lab", "uvloop", "httptools", "websockets", "psutil")
CONTROLLER_PACKAGES = (
    *CORE_PACKAGES,
    "asyncssh",
    "pyyaml",
    "pandas",
    "pyarrow",
    "plotly",
    "papermill",
    "nbconvert",
)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def read_sysctl(name: str, root: str = "/proc/sys") -> int | list[int] | str | None:
    """A sysctl's value: an int, a list of ints (``ip_local_port_range``), text, or None."""
    value = _read(f"{root}/{name.replace('.', '/')}")
    if value is None:
        return None
    parts = value.split()
    try:
        return [int(p) for p in parts] if len(parts) > 1 else int(parts[0])
    except ValueError:
        return value


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine()


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "MemFree") and rest.split():
            out[key] = int(rest.split()[0]) * 1024
    return out


def package_versions(names: tuple[str, ...] = CORE_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when missing)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def _rlimit(which: int) -> list[int | None]:
    soft, hard = resource.getrlimit(which)
    inf = resource.RLIM_INFINITY
    return [None if soft == inf else soft, None if hard == inf else hard]


def collect_host_metadata() -> dict[str, Any]:
    """Facts about this host that bound or explain a run (core deps only; no network)."""
    mem = _meminfo()
    nofile = _rlimit(resource.RLIMIT_NOFILE)
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "implementation": sys.implementation.name,
        "machine": platform.machine(),
        "libc": list(platform.libc_ver()),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "mem_total": mem.get("MemTotal"),
        "nofile_soft": nofile[0],
        "nofile_hard": nofile[1],
        "rlimits": {"nofile": nofile, "nproc": _rlimit(resource.RLIMIT_NPROC)},
        "sysctls": {name: read_sysctl(name) for name in SYSCTLS},
        "packages": package_versions(CORE_PACKAGES),
        "addresses": read_addresses(),
        "tcp_time_wait": _time_wait(),
        # what builds comet-lab's C parts (lab.cbuild), None if nothing
        "c_compiler": _c_compiler(),
        "time": time.time(),
    }


def _c_compiler() -> str | None:
    from lab.cbuild import find_compiler

    return find_compiler()


def _time_wait() -> int | None:
    """TCP sockets in TIME_WAIT (as the SSH facts script reads them), None if unreadable."""
    from lab.limits import time_wait_sockets

    try:
        return time_wait_sockets()
    except (OSError, KeyError, ValueError):
        return None


def read_addresses() -> list[list[Any]]:
    """The host's IP addresses as [address, prefix length, interface]: where an agent may bind
    its source addresses. IPv4 from the kernel's local routes (a whole loopback network is
    local; the interface is not named there), IPv6 from if_inet6. Standard library only: the
    same function runs in ``lab.ssh``'s facts script on a host with a bare python."""
    import ipaddress

    def text(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    out: list[list[Any]] = []
    last = None
    for line in text("/proc/net/fib_trie").splitlines():
        item = line.strip()
        if item.startswith(("|--", "+--")):
            last = item.split()[1].split("/")[0]
        elif item.endswith("host LOCAL") and last is not None:
            entry = [last, int(item.split()[0][1:]), ""]
            if entry not in out:
                out.append(entry)
    for line in text("/proc/net/if_inet6").splitlines():
        f = line.split()
        if len(f) >= 6:
            a = ":".join(f[0][i : i + 4] for i in range(0, 32, 4))
            out.append([str(ipaddress.ip_address(a)), int(f[2], 16), f[5]])
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def collect_controller_metadata(repo: Path | None = None) -> dict[str, Any]:
    """The controller's side: git commit and dirty flag of the lab, python, package versions."""
    repo = repo or Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "packages": package_versions(CONTROLLER_PACKAGES),
        "argv": sys.argv[1:],
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lab.metadata",
        description="Print this host's metadata (python, kernel, CPU, sysctls, rlimits) as JSON.",
    )
    parser.add_argument("--controller", action="store_true", help="controller metadata instead")
    args = parser.parse_args(argv)
    data = collect_controller_metadata() if args.controller else collect_host_metadata()
    print(json.dumps(data, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
