"""The engine of a run: connect, deploy, plan, start roles, watch, and always tear down.

``Engine(experiment, folder, progress, overrides).run()`` connects to every host over SSH (the
embedded server for ``local``), deploys the lab, reads metadata, clock offsets and limits,
plans (``lab.plan.make_plan``), starts monitors, the server (waits until healthy) and the agents
(one common start time), streams their JSON lines to the progress display and waits for the
agents. Then, whatever happened (success, error, cancellation by Ctrl-C or SIGTERM, a host that
dropped out), it stops every role's process group, checks that nothing of the run is left,
fetches the files by SFTP, builds the tables, summarizes, judges thresholds and writes
``run.json``. Callers use ``lab.run.execute``, which owns signals and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fnmatch
import json
import re
import shlex
import signal
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lab.doctor import MAX_TIME_WAIT, Finding, Level, check_host, plan_host_findings
from lab.launch import (
    HEALTH_SCRIPT,
    LIMITS_SCRIPT,
    PORT_SCRIPT,
    STOP_SCRIPT,
    mask_overrides,
    mask_secrets,
    role_command,
)
from lab.limits import TIME_WAIT_SETTLE_S, HostLimits

if TYPE_CHECKING:
    from lab.deploy import Deployment
    from lab.experiment import Experiment
    from lab.plan import Plan, RoleLaunch
    from lab.progress import Progress
    from lab.ssh import EmbeddedServer, HostConnection

SCHEMA_VERSION = 1
STOP_GRACE_S = 10.0  # SIGTERM → SIGKILL
HEALTH_TIMEOUT_S = 30.0
FINISH_SLACK_S = 30.0  # past start delay + max_duration_s before agents count as overdue
# TIME_WAIT sockets on a host (an earlier run's connections: they last 60 s) above which the
# run waits for them to expire before it starts anything there: tens of thousands of them
# make connect() and every lookup of an established socket slower, and the figures with them
# (measured: 64,000 left by one c64k run). SETTLE_TIMEOUT_S bounds the wait.
SETTLE_TIME_WAIT = MAX_TIME_WAIT  # lab doctor warns above the same count
SETTLE_TIMEOUT_S = TIME_WAIT_SETTLE_S
SETTLE_POLL_S = 2.0


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class RunFailed(RuntimeError):
    """The run could not go on: the message says which host or role and why."""


@dataclasses.dataclass(slots=True)
class RoleProcess:
    """A started role: its SSH process, process group, last stream line and exit status."""

    launch: RoleLaunch
    process: Any
    pgid: int | None = None
    last: dict[str, Any] | None = None
    exit_status: int | None = None
    exit_signal: str | None = None  # the signal that killed it, when one did
    reader: asyncio.Task[None] | None = None


class Engine:
    """One run, from connect to run.json. ``await run()`` never raises for run failures."""

    def __init__(
        self,
        exp: Experiment,
        folder: Any,
        progress: Progress,
        overrides: Mapping[str, str],
    ) -> None:
        self.exp = exp
        self.folder = folder
        self.path = Path(folder.path)
        self.run_id = str(folder.run_id)
        self.progress = progress
        self.overrides = dict(overrides)
        self.embedded: EmbeddedServer | None = None
        self.conns: dict[str, HostConnection] = {}
        self.deployments: dict[str, Deployment] = {}
        self.rundirs: dict[str, str] = {}
        self.offsets: dict[str, float] = {}
        self.limits: dict[str, HostLimits] = {}
        self.hosts: dict[str, dict[str, Any]] = {h.name: {"name": h.name} for h in exp.hosts}
        self.roles: list[RoleProcess] = []
        self.plan: Plan | None = None
        self.stop_reason = ""
        self.hurry = False
        self.outcome = Outcome.FAILED
        self.reason = ""
        self.record: dict[str, Any] = {}

    # -- the whole run ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run, tear down, collect; return the final run.json record."""
        from lab.metadata import collect_controller_metadata
        from lab.ssh import host_record

        started = time.time()
        controller = collect_controller_metadata()
        controller["argv"] = mask_secrets(controller.get("argv") or [])
        self.record = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": started,
            "experiment": {
                "path": self.exp.path,
                "name": self.exp.name,
                "resolved": self.exp.to_dict(),
            },
            "overrides": mask_overrides(self.overrides),
            "inventory": [host_record(h) for h in self.exp.hosts],
            "insecure_hosts": [h.name for h in self.exp.hosts if h.insecure_skip_host_key_check],
            "hosts": list(self.hosts.values()),
            "controller": controller,
            "outcome": "running",
            "reason": "",
            "started": started,
            "ended": None,
            "thresholds": [],
            "summary": {},
        }
        self.folder.write_run_json(self.record)
        if self.record["insecure_hosts"]:
            self._note(
                "host keys NOT checked for: "
                + ", ".join(self.record["insecure_hosts"])
                + " (insecure_skip_host_key_check: true in the inventory)"
            )
        task = asyncio.current_task()
        try:
            await self._body()
            self.outcome, self.reason = Outcome.COMPLETED, ""
        except asyncio.CancelledError:
            if task is not None:
                task.uncancel()
            self.outcome = Outcome.INTERRUPTED
            self.reason = self.stop_reason or "interrupted"
        except Exception as exc:
            self.outcome, self.reason = Outcome.FAILED, describe(exc)
            if is_bug(exc):  # unexpected: keep the whole traceback
                self._log_traceback(exc)
        self.progress.stage(
            f"stopping ({self.outcome.value}{': ' + self.reason if self.reason else ''})"
        )
        await self._guarded(self._teardown(), "teardown")
        await self._guarded(self._fetch_all(), "fetch")
        await self._guarded(self._close(), "close")
        self.record.update(outcome=self.outcome.value, reason=self.reason, ended=time.time())
        self.folder.write_run_json(self.record)
        self.progress.close()  # the last status (every role has stopped), before the tables
        self._collect()
        self.folder.write_run_json(self.record)
        return self.record

    async def _guarded(self, coro: Any, what: str) -> None:
        """Teardown steps must finish even when interrupted again, and never hide the outcome."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cur = asyncio.current_task()
                if cur is not None:
                    cur.uncancel()
                self.hurry = True
            except Exception as exc:
                self._note(f"{what}: {describe(exc)}")
                return

    def _log_traceback(self, exc: BaseException) -> None:
        """An error the engine did not expect: its traceback goes to logs/controller.log (the
        reason in run.json is one line), and a note says where."""
        logs = self.path / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
            with (logs / "controller.log").open("a") as f:
                f.write("".join(traceback.format_exception(exc)))
        except OSError:
            return
        if not any("logs/controller.log" in n for n in self.record.get("notes", [])):
            self._note("the controller's traceback of this error is in logs/controller.log")

    def _note(self, text: str) -> None:
        self.record.setdefault("notes", []).append(text)
        self.progress.stage(text)

    async def _body(self) -> None:
        from lab.plan import Role, make_plan

        await self._connect_all()
        self.progress.stage(f"deploying to {len(self.conns)} host(s)")
        await self._each(self._prepare_host, self.conns)
        self.plan = plan = make_plan(self.exp, self.limits)
        self._check_plan_hosts()
        self.record["plan"] = [
            {
                "host": x.host,
                "role": x.role.value,
                "name": x.name,
                "argv": mask_secrets(x.argv),
                "command": x.command,
            }
            for x in plan.launches
        ]
        self.folder.write_run_json(self.record)
        used = {x.host for x in plan.launches}
        # after the plan: a plan that cannot fit fails at once, not after the wait
        await self._each(self._settle_time_wait, {h: self.conns[h] for h in used})
        await self._each(self._make_rundir, {h: self.conns[h] for h in used})

        self.progress.stage("starting monitors")
        for launch in plan.stage(Role.MONITOR):
            await self._start(launch)
        for launch in plan.stage(Role.SERVER):
            self.progress.stage(f"starting server on {launch.host}")
            if launch.health_url:
                await self._port_is_free(launch)
            server = await self._start(launch)
            if launch.health_url:
                await self._race(self._wait_healthy(server), [server], "server start")
        start_at = time.time() + plan.start_delay_s
        self.record["agents_start_at"] = start_at
        agents = []
        for launch in plan.stage(Role.AGENT):
            host_start = start_at + self.offsets.get(launch.host, 0.0)
            extra = [] if "--start-at" in launch.argv else ["--start-at", f"{host_start:.3f}"]
            agents.append(await self._start(launch, extra))
        self.folder.write_run_json(self.record)
        self.progress.stage(f"agents start in {plan.start_delay_s:g} s")
        deadline = start_at + plan.max_duration_s + FINISH_SLACK_S
        watched = [r for r in self.roles if r.launch.role is Role.SERVER]
        await self._race(self._agents_done(agents), watched, "load", deadline)

    async def _each(self, fn: Any, conns: Mapping[str, HostConnection]) -> None:
        """Run ``fn(name, conn)`` on every host at once; fail naming every host that failed."""
        names = list(conns)
        results = await asyncio.gather(*(fn(n, conns[n]) for n in names), return_exceptions=True)
        errors = [
            f"{n}: {describe(r)}"
            for n, r in zip(names, results, strict=True)
            if isinstance(r, Exception)
        ]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
            if isinstance(r, Exception) and is_bug(r):
                self._log_traceback(r)
        if errors:
            raise RunFailed("; ".join(errors))

    async def _connect_all(self) -> None:
        from lab.ssh import EmbeddedServer, connect

        if any(h.embedded for h in self.exp.hosts):
            self.embedded = await EmbeddedServer().start()
        self.progress.stage(f"connecting to {len(self.exp.hosts)} host(s)")
        specs = list(self.exp.hosts)
        results = await asyncio.gather(
            *(connect(s, embedded=self.embedded) for s in specs), return_exceptions=True
        )
        errors = []
        for spec, res in zip(specs, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                errors.append(str(res))
            else:
                self.conns[spec.name] = res
        if errors:
            raise RunFailed("; ".join(errors))

    async def _prepare_host(self, name: str, conn: HostConnection) -> None:
        from lab.deploy import deploy
        from lab.ssh import measure_clock_offset

        dep = await deploy(conn)
        self.deployments[name] = dep
        info = self.hosts[name]
        info["deploy"] = {
            "workdir": dep.workdir,
            "python": dep.python,
            "content_hash": dep.content_hash,
            "reused": dep.reused,
        }
        q = shlex.quote
        meta = await conn.run(f"{q(dep.python)} -m lab.metadata", check=False, timeout_s=60)
        try:
            info["metadata"] = json.loads(meta.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            info["metadata"] = {"error": (meta.stderr or meta.stdout).strip()[-500:]}
        clock = await measure_clock_offset(conn, dep.python)
        self.offsets[name] = info["clock_offset_s"] = clock.offset_s
        info["clock_rtt_s"] = clock.rtt_s
        lim = await conn.run(f"{q(dep.python)} -c {q(LIMITS_SCRIPT)}", timeout_s=60)
        limits = self.limits[name] = HostLimits(**json.loads(lim.stdout.strip().splitlines()[-1]))
        info["limits"] = dataclasses.asdict(limits)
        self._check_host(name, {**info["metadata"], "clock_offset_s": clock.offset_s})

    def _check_plan_hosts(self) -> None:
        """``lab doctor``'s checks of what the plan asks of each host (its source addresses,
        its rate), on the facts read: a failure stops the run before anything starts."""
        facts = {n: info.get("metadata") or {} for n, info in self.hosts.items()}
        self._take_findings(plan_host_findings(self.exp, self.limits, facts), "plan", True)

    def _check_host(self, name: str, facts: Mapping[str, Any]) -> None:
        """``lab doctor``'s host checks, on the facts just read (a failure stops the run
        before anything starts, naming the check and the fix)."""
        if facts.get("error"):
            self._note(f"{name}: host facts unreadable, checks skipped: {facts['error']}")
            return
        self._take_findings(check_host(facts, host=name), "host", False)  # _each names it

    def _take_findings(self, findings: Sequence[Finding], what: str, name_host: bool) -> None:
        """Every finding into ``hosts[].checks``; a warning into the notes; the failures
        into the RunFailed that stops the run (``name_host``: each named with its host)."""
        for f in findings:
            self.hosts[f.host].setdefault("checks", []).append(f.as_dict())
            if f.level is Level.WARN:
                self._note(f"{f.host}: check {f.text()}")
        failed = [
            f"{f.host}: {f.text()}" if name_host else f.text()
            for f in findings
            if f.level is Level.FAIL
        ]
        if failed:
            raise RunFailed(f"{what} check failed: " + "; ".join(failed))

    async def _settle_time_wait(self, name: str, conn: HostConnection) -> None:
        """Wait (bounded) for an earlier run's TIME_WAIT sockets on the host to expire;
        ``hosts[].time_wait`` records how many there were and how many were left. The count
        is read from the controller every SETTLE_POLL_S: nothing waits on the host."""
        from lab.monitor import parse_sockstat

        async def time_wait() -> int:
            out = await conn.run("cat /proc/net/sockstat", timeout_s=30)
            return parse_sockstat(out.stdout)["tcp_tw"]

        before = left = await time_wait()
        if before > SETTLE_TIME_WAIT:
            self.progress.stage(
                f"{name}: {before} TIME_WAIT sockets left by an earlier run; waiting up to "
                f"{SETTLE_TIMEOUT_S:g} s for them to expire (they slow connect() and every "
                "socket lookup, and the figures with them)"
            )
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while left > SETTLE_TIME_WAIT and time.monotonic() < deadline:
                await asyncio.sleep(min(SETTLE_POLL_S, max(0.0, deadline - time.monotonic())))
                left = await time_wait()
            if left > SETTLE_TIME_WAIT:
                self._note(f"{name}: {left} TIME_WAIT sockets still there; starting anyway")
        self.hosts[name]["time_wait"] = {"found": before, "at_start": left}

    async def _make_rundir(self, name: str, conn: HostConnection) -> None:
        self.rundirs[name] = await conn.resolve_dir(
            f"{self.deployments[name].workdir}/runs/{self.run_id}"
        )

    # -- roles --------------------------------------------------------------------------------

    async def _start(self, launch: RoleLaunch, extra: Sequence[str] = ()) -> RoleProcess:
        conn = self.conns[launch.host]
        for relpath, text in launch.files:  # e.g. the agent's --plan file, written before start
            sftp = await conn.sftp()
            async with sftp.open(f"{self.rundirs[launch.host]}/{relpath}", "w") as fh:
                await fh.write(text)
        command = role_command(
            launch,
            self.deployments[launch.host].python,
            self.rundirs[launch.host],
            self.run_id,
            extra,
        )
        role = RoleProcess(launch, await conn.start(command))
        role.reader = asyncio.ensure_future(self._read(role))
        self.roles.append(role)
        return role

    async def _read(self, role: RoleProcess) -> None:
        """Follow one role's stdout: its pgid, then JSON lines to progress; then its exit."""
        try:
            async for line in role.process.stdout:
                if role.pgid is None and line.startswith("@pgid "):
                    role.pgid = int(line.split()[1])
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    role.last = data
                    self.progress.line(role.launch, data)
            await role.process.wait()
        except Exception:  # the connection dropped: the exit status stays unknown
            pass
        status = role.process.exit_status
        role.exit_status = status if status is not None else -1
        signal = getattr(role.process, "exit_signal", None)  # (name, core dumped, msg, lang)
        if signal:
            role.exit_signal = (
                f"SIG{signal[0]}" if not str(signal[0]).startswith("SIG") else signal[0]
            )

    async def _race(
        self,
        work: Any,
        watched: Sequence[RoleProcess],
        what: str,
        deadline: float | None = None,
    ) -> None:
        """Await ``work`` unless a watched role exits, a host drops out, or the deadline passes."""
        main = asyncio.ensure_future(work)
        guards: dict[asyncio.Future[Any], str] = {}
        for r in watched:
            if r.reader is not None:
                guards[asyncio.ensure_future(asyncio.shield(r.reader))] = f"role:{r.launch.name}"
        used = {r.launch.host for r in self.roles} or set(self.conns)
        for name in used:
            guards[asyncio.ensure_future(self.conns[name].wait_lost())] = f"host:{name}"
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            done, _ = await asyncio.wait(
                {main, *guards}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for g in guards:
                g.cancel()
            if not main.done():
                main.cancel()
                with contextlib.suppress(BaseException):
                    await main
        if main in done:
            main.result()
            return
        for g in done:
            kind, _, name = guards[g].partition(":")
            if kind == "host":
                raise RunFailed(f"host {name!r} dropped out during {what} (SSH connection lost)")
            role = next(r for r in watched if r.launch.name == name)
            raise RunFailed(await self._ended(role, what))
        raise RunFailed(
            f"{what} did not finish within max_duration_s ({self.exp.max_duration_s:g} s)"
        )

    async def _wait_healthy(self, server: RoleProcess) -> None:
        url = server.launch.health_url
        assert url
        q = shlex.quote
        dep = self.deployments[server.launch.host]
        cmd = f"{q(dep.python)} -c {q(HEALTH_SCRIPT)} {q(url)} {HEALTH_TIMEOUT_S:g}"
        result = await self.conns[server.launch.host].run(
            cmd, check=False, timeout_s=HEALTH_TIMEOUT_S + 30
        )
        if result.exit_status != 0:
            raise RunFailed(
                f"server on host {server.launch.host!r} was not healthy at {url} within "
                f"{HEALTH_TIMEOUT_S:g} s ({result.stderr.strip()}): "
                f"{await self._stderr_tail(server)}"
            )
        self.progress.stage(f"server healthy at {url}")

    async def _port_is_free(self, launch: RoleLaunch) -> None:
        """Fail before starting when something already answers at the server's health URL
        (SO_REUSEPORT would let a server left from another run silently share the port)."""
        q = shlex.quote
        python = self.deployments[launch.host].python
        cmd = f"{q(python)} -c {q(PORT_SCRIPT)} {q(launch.health_url or '')} 0.5"
        result = await self.conns[launch.host].run(cmd, check=False, timeout_s=30)
        if result.exit_status == 0:
            raise RunFailed(
                f"something already answers at {launch.health_url} on host {launch.host!r} "
                "before the server started (a server left by another run?): stop it "
                "(`pgrep -af 'lab[. ](comet|serve)'` lists it: stop its supervisor, the one "
                "that is not a worker, which would restart a killed worker) or choose another "
                "port (-p server.port=N)"
            )
        if result.exit_status == 3:
            where = urlsplit(launch.health_url or "")
            raise RunFailed(
                f"another program listens on {where.hostname}:{where.port} on host "
                f"{launch.host!r}, where the server is to listen: stop it (`ss -ltnp "
                f"'sport = :{where.port}'` names it) or choose another port (-p server.port=N)"
            )

    async def _agents_done(self, agents: Sequence[RoleProcess]) -> None:
        for agent in agents:
            assert agent.reader is not None
            await asyncio.shield(agent.reader)
            if agent.exit_status != 0:
                raise RunFailed(await self._ended(agent, "load"))

    async def _ended(self, role: RoleProcess, what: str) -> str:
        """Why a role ended too soon: its exit status and stderr, or, when no exit status came
        back over its SSH session, that its host dropped out."""
        host = role.launch.host
        if role.exit_signal is not None:
            return (
                f"{role.launch.name} on host {host!r} was killed by {role.exit_signal} during "
                f"{what} (the kernel's OOM killer sends SIGKILL): {await self._stderr_tail(role)}"
            )
        if role.exit_status is None or role.exit_status < 0:
            return (
                f"host {host!r} dropped out during {what}: the SSH session of "
                f"{role.launch.name} ended with no exit status (the host, its network or its "
                "sshd went away)"
            )
        status = f"{role.exit_status}"
        if 128 < role.exit_status < 128 + 65:  # the shell's way of saying a signal killed it
            with contextlib.suppress(ValueError):
                status += f" (killed by {signal.Signals(role.exit_status - 128).name})"
        return (
            f"{role.launch.name} on host {host!r} exited with {status} during "
            f"{what}: {await self._stderr_tail(role)}"
        )

    async def _stderr_tail(self, role: RoleProcess) -> str:
        conn = self.conns.get(role.launch.host)
        rundir = self.rundirs.get(role.launch.host)
        if conn is None or conn.lost or rundir is None:
            return "(stderr not reachable)"
        path = shlex.quote(f"{rundir}/{role.launch.name}.stderr.log")
        with contextlib.suppress(Exception):
            res = await conn.run(f"tail -c 1500 {path}", check=False, timeout_s=10)
            return res.stdout.strip() or "(no stderr)"
        return "(stderr not reachable)"

    # -- teardown -----------------------------------------------------------------------------

    async def _reachable(self, name: str) -> HostConnection | None:
        """The host's connection, reconnecting once (briefly) if it dropped."""
        from lab.ssh import connect

        conn = self.conns.get(name)
        if conn is not None and not conn.lost:
            return conn
        with contextlib.suppress(Exception):
            conn = await connect(self.exp.host(name), embedded=self.embedded, timeout_s=5)
            self.conns[name] = conn
            return conn
        return None

    async def _teardown(self) -> None:
        """Stop agents, then servers, then monitors (so agents close their own connections
        and monitors see it all): SIGTERM each group, SIGKILL after the grace; then sweep
        every host for processes of the run and record what was left."""
        from lab.plan import Role

        hosts = sorted(self.rundirs)
        conns: dict[str, HostConnection] = {}
        groups: dict[str, dict[Role, set[int]]] = {}

        async def find(name: str) -> None:
            conn = await self._reachable(name)
            if conn is None:
                self.hosts[name]["teardown"] = {"unreachable": True}
                self._note(f"host {name!r} unreachable at teardown: its roles could not be stopped")
                return
            conns[name] = conn
            roles = {x.name: x.role for x in (self.plan.launches if self.plan else ())}
            pattern = shlex.quote(self.rundirs[name]) + "/*.pgid"
            found = await conn.run(f"grep -H . {pattern} 2>/dev/null", check=False)
            by_role: dict[Role, set[int]] = {role: set() for role in Role}
            for line in found.stdout.splitlines():
                path, _, pgid = line.rpartition(":")
                launch_name = path.rsplit("/", 1)[-1].removesuffix(".pgid")
                if pgid.strip().isdigit():
                    by_role[roles.get(launch_name, Role.MONITOR)].add(int(pgid))
            for r in self.roles:
                if r.launch.host == name and r.pgid:
                    by_role[r.launch.role].add(r.pgid)
            groups[name] = by_role
            self.hosts[name]["teardown"] = {"terminated": [], "killed": [], "strays": []}

        async def stop(name: str, pgids: set[int], sweep: bool) -> None:
            if not pgids and not sweep:
                return
            grace = 0.5 if self.hurry else STOP_GRACE_S
            q = shlex.quote
            args = " ".join(str(g) for g in sorted(pgids))
            # the deployed venv's python: the one every role ran with (the inventory's may be
            # wrong while an earlier deploy's venv still serves)
            dep = self.deployments.get(name)
            python = dep.python if dep is not None else self.exp.host(name).python
            cmd = (
                f"{q(python)} -c {q(STOP_SCRIPT)} {q(self.run_id)} "
                f"{q(name)} {grace:g} {'sweep' if sweep else 'nosweep'} {args}"
            )
            res = await conns[name].run(cmd, check=False, timeout_s=grace + 60)
            info = self.hosts[name]["teardown"]
            try:
                report = json.loads(res.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                info.setdefault("errors", []).append(res.stderr.strip()[-500:])
                # no report: kill the groups the run knows with the shell alone, and say so
                if pgids:
                    kill = " ".join(f"-{g}" for g in sorted(pgids))
                    await conns[name].run(f"kill -KILL -- {kill}", check=False, timeout_s=30)
                self._note(
                    f"host {name!r}: the stop script failed ({res.stderr.strip()[-200:]}); "
                    f"process groups {sorted(pgids)} were killed, others of the run may be left"
                )
                return
            for key in ("terminated", "killed", "strays"):
                info[key] += report[key]
            if sweep:
                info["left"] = report["left"]
                if report["left"]:
                    self._note(f"host {name!r}: processes of the run still alive: {report['left']}")

        def report(what: str, names: Sequence[str], results: Sequence[object]) -> None:
            for name, res in zip(names, results, strict=True):
                if isinstance(res, Exception):
                    self._note(f"host {name!r}: {what} failed: {describe(res)}")

        found = await asyncio.gather(*(find(h) for h in hosts), return_exceptions=True)
        report("finding the process groups", hosts, found)
        for role in (Role.AGENT, Role.SERVER, Role.MONITOR):
            names = sorted(groups)
            sweep = role is Role.MONITOR
            results = await asyncio.gather(
                *(stop(h, groups[h][role], sweep) for h in names), return_exceptions=True
            )
            report(f"stopping the {role.value} roles", names, results)
        readers = [r.reader for r in self.roles if r.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=5)
        self.record["roles"] = [
            {
                "name": r.launch.name,
                "host": r.launch.host,
                "role": r.launch.role.value,
                "pgid": r.pgid,
                "exit_status": r.exit_status,
            }
            for r in self.roles
        ]

    async def _fetch_all(self) -> None:
        """Bring every stream, record and stderr file of the run home by SFTP."""

        async def one(name: str) -> None:
            conn = await self._reachable(name)
            if conn is None:
                return
            rundir = self.rundirs[name]
            wanted = [x for x in (self.plan.launches if self.plan else ()) if x.host == name]
            globs = {g for x in wanted for g in (x.stream_file, *x.fetch_globs) if g}
            for fname in await conn.listdir(rundir):
                if fname.endswith(".stderr.log"):
                    dest = self.path / "logs" / f"{name}-{fname[: -len('.stderr.log')]}.log"
                elif fname.endswith(".pgid"):
                    continue
                elif any(fnmatch.fnmatch(fname, g) for g in globs) or fname.endswith(".jsonl"):
                    dest = self.path / "raw" / name / fname
                else:
                    continue
                await conn.get(f"{rundir}/{fname}", dest)
                if dest.parent.name == "logs":
                    _mask_tokens(dest)

        results = await asyncio.gather(
            *(one(h) for h in sorted(self.rundirs)), return_exceptions=True
        )
        for host, res in zip(sorted(self.rundirs), results, strict=True):
            if isinstance(res, Exception):
                self._note(f"fetching from host {host!r} failed: {describe(res)}")

    async def _close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns.values()), return_exceptions=True)
        if self.embedded is not None:
            await self.embedded.close()

    def _collect(self) -> None:
        """Tables, summary and thresholds from whatever was fetched (partial data included)."""
        self.progress.stage("building tables")
        try:
            from lab.results import build_tables

            self.record["tables"] = [Path(p).name for p in build_tables(self.path, self.offsets)]
        except Exception as exc:
            self._note(f"build_tables: {describe(exc)}")
            return
        try:
            from lab import stats

            summary = stats.summarize(stats.load_tables(self.path), self.record)
            for note in summary_notes(summary):
                self._note(note)
            self.record["summary"] = _jsonable(summary)
            self.record["thresholds"] = _jsonable(
                stats.evaluate_thresholds(summary, self.exp.thresholds)
            )
        except Exception as exc:
            self._note(f"summary: {describe(exc)}")


# A ramp that reached less than this share of its planned rate gets a note in run.json.
RAMP_SHORTFALL = 0.9


def summary_notes(summary: Mapping[str, Any]) -> list[str]:
    """What a reader of the summary must not miss although no threshold may test it: a
    server worker that died, a ramp the agents could not keep to."""
    notes = []
    restarts = summary.get("server_restarts")
    if restarts:
        notes.append(
            f"server: {restarts} worker restart(s) during the run: a worker died (its log is "
            f"in logs/); the connections it held were cut "
            f"({summary.get('connections_dropped') or 0} dropped in all)"
        )
    mean, planned = summary.get("ramp_rate_mean_per_s"), summary.get("ramp_rate_planned_per_s")
    if mean is not None and planned and mean < RAMP_SHORTFALL * planned:
        lag = summary.get("schedule_lag_ms_max")
        lag_text = f", schedule lag up to {lag:.0f} ms" if lag is not None else ""
        notes.append(
            f"ramp: {mean:,.0f} connections/s reached of the {planned:,.0f}/s planned{lag_text}: "
            "the agents or the server could not keep up (lab doctor EXPERIMENT shows the plan; "
            "lower the rate, or add agent processes or hosts)"
        )
    return notes


# What a server prints when it made up its own publish token (lab.comet.supervisor).
_TOKEN_LINE = re.compile(r"(publish token: )\S+")


def _mask_tokens(log: Path) -> None:
    """Results are shared; a publish token, even a run's own, is not kept in them."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = log.read_text()
        masked = _TOKEN_LINE.sub(r"\1***", text)
        if masked != text:
            log.write_text(masked)


def is_bug(exc: BaseException) -> bool:
    """An error that comes from the lab's code itself, not from a host, a network or an input:
    worth its whole traceback (logs/controller.log)."""
    return isinstance(
        exc, AssertionError | LookupError | TypeError | AttributeError | NameError | ArithmeticError
    )


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, AssertionError | KeyError | TypeError | AttributeError | IndexError):
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" at {frame[0].filename}:{frame[0].lineno}" if frame else ""
        return f"{type(exc).__name__}: {text}{where}"
    return text


def _jsonable(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )
