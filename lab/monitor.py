"""The host monitor: CPU, memory and sockets of one host, and of every lab process on it.

``python -m lab.monitor --interval 1 [--out FILE] [--duration S] [--match ROLE=SUBSTRING]``
writes one JSON line per interval (``{"kind": "monitor", ...}``, results/README.md) to stdout
and to ``--out``: CPU per core, memory, ``/proc/net/sockstat``, TCP slab memory (root only),
and per process of each role CPU %, RSS, USS, open files, threads, plus its own CPU
(``self_cpu_percent``: it must stay below 1 % of a core). Started by the controller, it
watches only the processes of its run (``COMET_LAB_RUN_ID`` in their environment, which
``lab.launch`` sets), so other runs on a shared host do not leak into the figures.

Cost control: processes are discovered incrementally (only new pids are read, children of a
role process inherit its role) and the cheap figures are read every interval. Open files come
from ``stat(/proc/<pid>/fd).st_size`` (Linux >= 6.2 reports the count there: 45 us for 15,000
descriptors, where listing the directory takes 60 ms), falling back to listing it on the
expensive pass. USS (``/proc/<pid>/smaps_rollup`` walks the page tables, ~7 ms per 300 MB) is
read every Nth interval, N chosen so that the pass costs under 0.3 % of a core
(``HEAVY_BUDGET``, ``heavy_every`` in each line); between refreshes a line carries the last
USS read. Stops on SIGTERM/SIGINT or after ``--duration``, exit 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict

import psutil

HEAVY_BUDGET = 0.003  # fraction of a core the USS pass may use (the rest stays ~0.5 %)
HEAVY_MAX_EVERY = 30  # read USS/fds at least every this many intervals
RUN_ID_ENV = "COMET_LAB_RUN_ID"  # set by the controller on every process of a run (lab.launch)
ROLE_MODULES = {"lab.comet": "server", "lab.agent": "agent", "lab.monitor": "monitor"}
LAB_VERBS = {"serve": "server", "agent": "agent", "monitor": "monitor"}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SLAB_NAMES = ("TCP", "TCPv6", "tcp_bind_bucket", "request_sock_TCP", "tw_sock_TCP")


class ProcSample(TypedDict):
    pid: int
    role: str
    cpu_percent: float | None  # None in a process's first sample (no full interval yet)
    rss: int
    uss: int | None
    num_fds: int | None
    threads: int


def role_of(cmdline: Sequence[str], rules: Sequence[tuple[str, str]] = ()) -> str | None:
    """The lab role a command line runs (``python -m lab.comet`` → "server"), or a --match
    role whose substring it contains; None when it is none of them."""
    for i, arg in enumerate(cmdline[:-1]):
        module = cmdline[i + 1]
        if arg == "-m" and module.split(".")[0] == "lab" and module.count(".") >= 1:
            top = ".".join(module.split(".")[:2])  # lab.comet.worker → lab.comet
            if top in ROLE_MODULES:
                return ROLE_MODULES[top]
        if arg == "-m" and cmdline[i + 1] == "lab" and i + 2 < len(cmdline):
            return LAB_VERBS.get(cmdline[i + 2])
    if len(cmdline) >= 2 and os.path.basename(cmdline[0]) == "lab" and cmdline[1] in LAB_VERBS:
        return LAB_VERBS[cmdline[1]]
    if len(cmdline) >= 3 and os.path.basename(cmdline[1]) == "lab" and cmdline[2] in LAB_VERBS:
        return LAB_VERBS[cmdline[2]]  # "python /path/bin/lab serve"
    if rules:
        joined = " ".join(cmdline)
        for role, needle in rules:
            if needle and needle in joined:
                return role
    return None


def parse_sockstat(text: str) -> dict[str, int]:
    """``/proc/net/sockstat`` → tcp_inuse, tcp_orphan, tcp_tw, tcp_alloc, tcp_mem_pages."""
    out = {"tcp_inuse": 0, "tcp_orphan": 0, "tcp_tw": 0, "tcp_alloc": 0, "tcp_mem_pages": 0}
    for line in text.splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            pairs = dict(zip(parts[::2], parts[1::2], strict=False))
            for key, name in (("inuse", "tcp_inuse"), ("orphan", "tcp_orphan"), ("tw", "tcp_tw")):
                out[name] = int(pairs.get(key, 0))
            out["tcp_alloc"] = int(pairs.get("alloc", 0))
            out["tcp_mem_pages"] = int(pairs.get("mem", 0))
    return out


def parse_slabinfo(text: str, names: Iterable[str] = SLAB_NAMES) -> int:
    """Bytes held by the TCP slab caches (active objects × object size)."""
    wanted = set(names)
    total = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] in wanted:
            total += int(parts[1]) * int(parts[3])
    return total


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _in_run(pid: int, run_id: str) -> bool:
    """True when the process's environment carries ``COMET_LAB_RUN_ID=<run_id>``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"{RUN_ID_ENV}={run_id}".encode() in env


def _fd_count(pid: int) -> int | None:
    """Open descriptors from the size of /proc/<pid>/fd (Linux >= 6.2), else None."""
    try:
        size = os.stat(f"/proc/{pid}/fd").st_size
    except OSError:
        return None
    return size if size > 0 else None


@dataclass
class Tracked:
    """A process being watched; ``uss``/``num_fds`` keep the last expensive reading."""

    proc: psutil.Process
    role: str
    uss: int | None = None
    num_fds: int | None = None
    # found in this sample: its CPU counter was primed a moment ago, and a percentage over
    # milliseconds (clock ticks of 10 ms) can read 500 %: not reported until the next sample
    fresh: bool = True


@dataclass
class Monitor:
    """Samples the host; ``sample()`` returns one line's dict. Clock-free apart from
    ``time.time()`` stamps and its own CPU accounting, so tests can call it directly."""

    rules: tuple[tuple[str, str], ...] = ()
    run_id: str = ""  # when set, lab role processes must carry COMET_LAB_RUN_ID=<run_id>
    host: str = field(default_factory=lambda: os.uname().nodename)
    tracked: dict[int, Tracked] = field(default_factory=dict)
    ignored: set[int] = field(default_factory=set)
    heavy_every: int = 1
    ticks: int = 0
    _last_cpu: float = 0.0
    _last_wall: float = 0.0
    _heavy_cost_s: float = 0.0
    _next_heavy: int = 0

    def __post_init__(self) -> None:
        psutil.cpu_percent(percpu=True)  # prime: the first call has no interval
        self._last_cpu = self._own_cpu()
        self._last_wall = time.monotonic()

    def _own_cpu(self) -> float:
        return time.process_time()  # nanosecond resolution, unlike the 10 ms of cpu_times()

    def discover(self) -> None:
        """Track new lab processes; drop the ones that exited."""
        pids = set(psutil.pids())
        for gone in [p for p in self.tracked if p not in pids]:
            del self.tracked[gone]
        self.ignored &= pids
        for pid in sorted(pids - self.tracked.keys() - self.ignored):
            try:
                proc = psutil.Process(pid)
                parent = self.tracked.get(proc.ppid())
                if parent:
                    role: str | None = parent.role
                else:
                    cmdline = proc.cmdline()
                    role = role_of(cmdline)
                    if role is not None and self.run_id and not _in_run(pid, self.run_id):
                        role = None  # another run's process on a shared host
                    if role is None and self.rules:
                        role = role_of(cmdline, self.rules)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self.ignored.add(pid)
                continue
            if role is None:
                self.ignored.add(pid)
                continue
            proc.cpu_percent(None)  # prime its CPU counter
            self.tracked[pid] = Tracked(proc, role)

    def _procs(self, heavy: bool) -> list[ProcSample]:
        out: list[ProcSample] = []
        heavy_started = time.thread_time() if heavy else 0.0
        for pid, t in sorted(self.tracked.items()):
            p = t.proc
            try:
                with p.oneshot():
                    cpu: float | None = p.cpu_percent(None)
                    rss = p.memory_info().rss
                    threads = p.num_threads()
                fds = _fd_count(pid)
                if fds is not None:
                    t.num_fds = fds
                if heavy:
                    if fds is None:
                        t.num_fds = p.num_fds()
                    t.uss = p.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                cpu, rss, threads = 0.0, 0, 0
            if t.fresh:
                t.fresh = False
                cpu = None
            out.append(
                ProcSample(
                    pid=pid,
                    role=t.role,
                    cpu_percent=cpu,
                    rss=rss,
                    uss=t.uss,
                    num_fds=t.num_fds,
                    threads=threads,
                )
            )
        if heavy:
            self._heavy_cost_s = time.thread_time() - heavy_started
        return out

    def sample(self, interval_s: float = 1.0) -> dict[str, Any]:
        """One monitor line (see results/README.md)."""
        self.discover()
        heavy = self.ticks >= self._next_heavy
        procs = self._procs(heavy)
        if heavy:
            # The whole _procs pass with USS costs _heavy_cost_s; keep it under budget.
            every = math.ceil(self._heavy_cost_s / (HEAVY_BUDGET * interval_s)) if interval_s else 1
            self.heavy_every = max(1, min(HEAVY_MAX_EVERY, every))
            self._next_heavy = self.ticks + self.heavy_every
        self.ticks += 1
        mem = psutil.virtual_memory()
        sock = _read_text("/proc/net/sockstat")
        slab = _read_text("/proc/slabinfo")
        cpu_now, wall_now = self._own_cpu(), time.monotonic()
        wall = wall_now - self._last_wall
        self_cpu = 100.0 * (cpu_now - self._last_cpu) / wall if wall > 0 else 0.0
        self._last_cpu, self._last_wall = cpu_now, wall_now
        return {
            "kind": "monitor",
            "t": time.time(),
            "host": self.host,
            "cpu_percent": psutil.cpu_percent(percpu=True),
            "mem": {"total": mem.total, "used": mem.used, "available": mem.available},
            "procs": procs,
            "sockstat": parse_sockstat(sock or ""),
            "tcp_slab_bytes": parse_slabinfo(slab) if slab else None,
            "page_size": PAGE_SIZE,
            "heavy_every": self.heavy_every,
            "self_cpu_percent": round(self_cpu, 3),
        }


def _parse_rules(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--match`` values as (role, substring); ValueError naming the bad one and the fix."""
    rules = []
    for item in items:
        role, sep, needle = item.partition("=")
        if not sep or not role or not needle:
            raise ValueError(f"--match {item!r}: expected ROLE=SUBSTRING, e.g. server=nginx")
        rules.append((role, needle))
    return tuple(rules)


def run(
    monitor: Monitor,
    interval_s: float,
    duration_s: float | None,
    outputs: Sequence[IO[str]],
    stop: threading.Event,
) -> int:
    """Sample every ``interval_s`` (drift-free) until ``stop`` or ``duration_s``; lines written."""
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        due = start + (n + 1) * interval_s
        if duration_s is not None:
            due = min(due, start + duration_s)
        if stop.wait(max(0.0, due - time.monotonic())):
            break
        line = json.dumps(monitor.sample(interval_s), separators=(",", ":")) + "\n"
        for out in outputs:
            try:
                out.write(line)
                out.flush()
            except (BrokenPipeError, ValueError):
                continue  # a closed stdout must not stop the file copy
        n += 1
        if duration_s is not None and time.monotonic() - start >= duration_s - 1e-6:
            break
        late = time.monotonic() - (start + (n + 1) * interval_s)
        if late > interval_s:  # fell behind (suspended host): skip, don't burst
            n += int(late // interval_s)
    return n


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lab.monitor",
        description=(
            "Sample this host's CPU per core, memory, TCP sockets and the lab processes "
            "(lab.comet, lab.agent, lab.monitor) once per interval; JSON lines to stdout "
            "and --out. Stops on SIGTERM/SIGINT or after --duration."
        ),
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between lines (default 1)"
    )
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="ROLE=SUBSTRING",
        help="also watch processes whose command line contains SUBSTRING, as ROLE",
    )
    parser.add_argument("--host-name", help="the host name in each line (default: hostname)")
    parser.add_argument(
        "--run-id",
        default=os.environ.get(RUN_ID_ENV, ""),
        help=f"watch only lab processes of this run (${RUN_ID_ENV} in their environment; "
        f"default: this process's ${RUN_ID_ENV}, unset = every lab process)",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.interval > 3600:
        parser.error("--interval must be in (0, 3600] seconds")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    try:
        rules = _parse_rules(args.match)
    except ValueError as exc:  # a usage error like the others: exit 2, prefixed by the prog
        parser.error(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    monitor = Monitor(rules=rules, run_id=args.run_id)
    if args.host_name:
        monitor.host = args.host_name
    outputs: list[IO[str]] = [sys.stdout]
    file = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        file = args.out.open("a", buffering=1)
        outputs.append(file)
    try:
        run(monitor, args.interval, args.duration, outputs, stop)
    finally:
        if file:
            file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
