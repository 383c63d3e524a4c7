"""How the load processes give the cores to a server on the same host (``lab agent --nice``),
as agents on other hosts would not need to.

Each load process starts a session of its own with the nice value for its scheduler
autogroup and for itself, and SCHED_BATCH (``give_way``). With autogroups (Linux's default:
one group per session, CPU split between busy groups) a process's own nice value counts only
within its group; but a group at nice 19 still weighs 15 against the server's 1024, so four
busy load processes (four groups) kept ~6% of the cores through a broadcast's fan-out,
measured with ``perf`` in a c64k-broadcast run.

So where the host lets the agent make one (root: a group at the top of the cpu hierarchy),
the load processes also share one cpu cgroup (``IdleGroup``) marked idle (``cpu.idle``: it
runs only when nothing else wants the core) or else with the least weight: together they
then take well under 1% from a busy server. Being at the top, the group is outside the
coordinator's own cgroup (a systemd unit's CPU limit does not follow the load processes
there; in a container the group stays inside the container's; the coordinator still stops
them). It is made by the coordinator, removed when its load processes have exited, and one
left by a coordinator that was killed is removed by a later one. ``LAB_AGENT_CGROUP=0``
keeps to nice values and autogroups.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from lab.cbuild import switched_off

CGROUP_SWITCH = "LAB_AGENT_CGROUP"  # "0": no cgroup, nice and autogroups only
CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "comet-lab-agents-"
STALE_S = 60.0  # an empty group this old whose coordinator is gone is removed


def give_way(nice: int, group: str | None = None) -> None:
    """Run in a load process before it starts: a session of its own, then the nice value for
    its autogroup and for itself, SCHED_BATCH, and the cgroup ``group`` when there is one."""
    os.setsid()
    if group:
        with contextlib.suppress(OSError):  # then the autogroup below is what counts
            Path(group, "cgroup.procs").write_text("0")
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))
    os.nice(nice)
    # SCHED_BATCH: a waking load process (a message arrived) does not preempt the server in
    # the middle of a fan-out; it runs when its share comes
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def cpu_hierarchy(root: Path = CGROUP_ROOT) -> Path | None:
    """The cgroup hierarchy with the cpu controller: cgroup v1's ``cpu`` mount, or the v2
    root when it hands the controller down; None when there is neither."""
    v1 = root / "cpu"
    if (v1 / "cpu.shares").exists():
        return v1
    try:
        if "cpu" in (root / "cgroup.subtree_control").read_text().split():
            return root
    except OSError:
        pass
    return None


class IdleGroup:
    """A cpu cgroup for one coordinator's load processes, with the least claim on the cores:
    ``cpu.idle`` = 1 where the kernel has it (5.15+), else the lowest ``cpu.shares`` (v1) or
    ``cpu.weight`` (v2). ``how`` says which."""

    def __init__(self, path: Path, how: str) -> None:
        self.path = path
        self.how = how

    @classmethod
    def create(cls, root: Path = CGROUP_ROOT) -> tuple[IdleGroup | None, str]:
        """``(group, "")``, or ``(None, why)`` when there is no cgroup to be had here."""
        if switched_off(CGROUP_SWITCH):
            return None, f"turned off by {CGROUP_SWITCH}=0"
        base = cpu_hierarchy(root)
        if base is None:
            return None, f"no cgroup hierarchy with the cpu controller under {root}"
        sweep_stale(base)
        path = base / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError as exc:
            return None, f"cannot make a cpu cgroup in {base} ({exc.strerror or exc})"
        failed = "it has none of cpu.idle, cpu.shares, cpu.weight"
        for name, value in (("cpu.idle", "1"), ("cpu.shares", "2"), ("cpu.weight", "1")):
            try:
                (path / name).write_text(value)
                return cls(path, f"{name} {value}"), ""
            except FileNotFoundError:
                continue
            except OSError as exc:  # the next setting may still work
                failed = f"{name}: {exc.strerror or exc}"
        with contextlib.suppress(OSError):
            path.rmdir()
        return None, f"cannot make a cpu cgroup in {base} ({failed})"

    def members(self) -> set[int]:
        """The pids in the group now."""
        try:
            return {int(x) for x in (self.path / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def remove(self) -> None:
        """Remove the cgroup (its processes have exited: a busy one stays, for the next
        coordinator's sweep)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


def sweep_stale(base: Path) -> None:
    """Remove the groups of coordinators that are gone: empty (a group with processes cannot
    be removed) and made over ``STALE_S`` ago (another coordinator's new group is empty
    until its first load process joins)."""
    with contextlib.suppress(OSError):
        for path in base.glob(f"{PREFIX}*"):
            pid = path.name[len(PREFIX) :].split("-")[0]
            if pid.isdigit() and Path("/proc", pid).exists():
                continue
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > STALE_S:
                    path.rmdir()
