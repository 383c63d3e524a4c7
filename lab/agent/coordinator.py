"""The agent's parent process: plan, capacity check, load processes, one JSON line a second.

What it is for: ``python -m lab.agent`` lands here (``main``). It builds the schedule from the
flags or ``--plan``, checks capacity before any connection, starts ``--procs`` load processes
(``lab.agent.proc``, each with an equal shard of the schedule, opening in turn or side by
side as the rate needs: ``Schedule.lanes``), gives them one common start
time, runs the optional publisher, and merges their per-second lines into ONE
``{"kind": "agent", ...}`` line a second on stdout (and ``--out``); the last line is
``{"kind": "agent_end", ...}``. At the end it joins the processes' record blocks into
``--records``.

Fields beyond results/README.md: ``dropped`` (connections the server closed before their
planned close; their record outcome is ``reset`` with a ``connected`` time), and when
publishing ``publish_errors`` and ``publish_lag_ms``; ``agent_end`` adds ``saturated_any``,
``outcome`` (completed | interrupted | failed) and ``reason`` (the signal that stopped it:
SIGTERM / SIGINT; max_duration; ...). On stderr: the first HTTP answer that failed a session
(status, URL, likely fix), the first failed publish and then their count, and unless
``--quiet`` a progress line a second (failures by reason).
``procs`` lists the load processes and the coordinator itself; ``msgs_in`` counts delivered
envelopes (websocket: not command replies); ``closed`` counts a planned close when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from lab import cbuild
from lab.agent import fastpath
from lab.agent.capacity import (
    RATE_PER_PROCESS,
    CapacityError,
    Demand,
    auto_procs,
    check_capacity,
    check_source_ips,
    is_loopback_host,
    parse_source_ips,
)
from lab.agent.giveway import IdleGroup, give_way
from lab.agent.proc import USS_EVERY, ProcConfigJSON, phases_to_json
from lab.agent.publisher import Publisher, PublishSpec
from lab.agent.records import FAILURES, append_file
from lab.agent.schedule import (
    Arrival,
    Phase,
    PhaseKind,
    PlanError,
    Schedule,
    build_schedule,
    simple_phases,
)
from lab.agent.target import SessionKind, describe_http_failure, make_target
from lab.histogram import Histogram
from lab.limits import read_host_limits, source_addresses_for
from lab.validation import closest, unknown_key_fix

EMIT_DELAY_S = 0.3  # wait this long after a whole second for the processes' lines
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0  # after a stop, processes get this long before SIGKILL
SATURATED_CPU_PERCENT = 90.0
PLAN_KEYS = ("phases", "arrival", "seed")
PHASE_KINDS = tuple(k.value for k in PhaseKind)
PHASE_KEYS = tuple(f.name for f in dataclasses.fields(Phase))
SUM_FIELDS = (
    "started",
    "connected",
    "open",
    "closed",
    "dropped",
    "msgs_in",
    "msgs_out",
    "bytes_in",
    "bytes_out",
    "lost",
    "dup",
    "reordered",
    "untimed",
)


class UsageError(Exception):
    """Bad flags or plan file; the message names the problem and the fix."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m lab.agent",
        description="Load agent: open-model arrival phases of WebSocket / long-poll / SSE "
        "connections; one JSON line per second on stdout, per-connection records at the end.",
    )
    a = p.add_argument
    a(
        "--url",
        action="append",
        required=True,
        help="destination (repeat for several): ws://H:P/ws?channel=C, http://H:P/lp?channel=C, http://H:P/sse?channel=C",
    )
    a(
        "--session",
        default="websocket",
        choices=[k.value for k in SessionKind],
        help="what each connection does: websocket (upgrade, comet envelopes counted: lost, "
        "duplicated, reordered), longpoll (GET /lp loop), sse (GET /sse event stream), generic "
        "(any WebSocket server: upgrade and hold, frames counted) (default websocket)",
    )
    a("--rate", type=float, default=100.0, help="new connections per second (ramp; default 100)")
    a("--connections", type=int, default=100, help="connections to open in the ramp (default 100)")
    a(
        "--hold",
        type=float,
        default=10.0,
        help="seconds to hold all connections after the ramp (default 10)",
    )
    a(
        "--close-rate",
        type=float,
        default=None,
        help="connections closed per second after the hold (default: all at once)",
    )
    a(
        "--plan",
        help="JSON plan file with several phases (replaces --rate/--connections/--hold/"
        "--close-rate; format in `pydoc lab.agent`)",
    )
    a(
        "--procs",
        default="auto",
        help="load processes: N or auto (enough for the open-file limit and the rate; "
        "default auto). They open in turn, each a consecutive run of the schedule, as long as "
        "fewer side by side keep the rate (at most 6,000/s each); a plan that closes "
        "connections while it still opens others interleaves them over every process",
    )
    a(
        "--source-ips",
        default="auto",
        help="source addresses: auto (127.0.0.2.. on loopback as needed), a list A,B "
        "or a range A-B (default auto)",
    )
    a(
        "--start-at",
        type=float,
        default=None,
        help="common start time (unix seconds) across agent hosts (default now + 0.5 s)",
    )
    a(
        "--max-duration",
        type=float,
        default=None,
        help="hard bound in seconds from the start: close everything and exit "
        "(default the plan's end + 3600 s)",
    )
    a(
        "--nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0..19",
        help="nice increment of the load processes: on a host shared with the server, let it "
        "run first, as agents on other hosts would; where the host allows, they also share "
        "one idle cpu cgroup, unless LAB_AGENT_CGROUP=0 (default 0; the publisher is not "
        "niced)",
    )
    a("--seed", type=int, default=0, help="seed of Poisson arrivals (default 0)")
    a(
        "--arrival",
        default="uniform",
        choices=[x.value for x in Arrival],
        help="uniform (one connection every 1/rate s) or poisson (exponential gaps of mean "
        "1/rate s, from --seed) (default uniform)",
    )
    a(
        "--subscribe",
        action="append",
        default=[],
        help='websocket: send {"subscribe": C} after the upgrade (repeatable)',
    )
    a(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds from start to connected before outcome timeout (default 10)",
    )
    a(
        "--lp-timeout",
        type=float,
        default=25.0,
        help="long-poll timeout asked of the server, seconds (default 25)",
    )
    a("--publish-url", help="publish to http://H:P/pub/<channel> while the plan runs")
    a("--publish-rate", type=float, default=1.0, help="messages per second (default 1)")
    a("--publish-token", default=None, help="bearer token for publishing")
    a(
        "--payload-bytes",
        type=int,
        default=0,
        help="pad each published body to this size (default 0: no padding)",
    )
    a("--publish-count", type=int, default=100, help="messages to publish at most (default 100)")
    a(
        "--publish-delay",
        type=float,
        default=0.0,
        help="seconds after the start before the first publish (default 0)",
    )
    a(
        "--read-on-arrival",
        action="store_true",
        help="read each socket as soon as data arrives and time messages and upgrades by that "
        "read; by default the sockets are read in ticks (every 2 ms while connections open or "
        "close, 50 ms in a hold) and times are the kernel's receive "
        "times (SO_TIMESTAMPNS): exact whatever the agent's own CPU wait, and fewer wake-ups",
    )
    a("--agent-id", default="a0", help="name of this agent in the streams (default a0)")
    a("--out", help="also write the JSON lines to this file")
    a("--records", help="per-connection record file to write at the end (.rec)")
    a("--quiet", action="store_true", help="no human progress line on stderr")
    return p


def load_plan_file(path: str) -> tuple[list[Phase], str | None, int | None]:
    """Phases (and optional arrival, seed) from a JSON plan file; UsageError names the fix."""
    from lab.agent.proc import phases_from_json

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--plan {path}: cannot read it ({exc.strerror})") from exc
    except ValueError as exc:
        raise UsageError(f"--plan {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("phases"), list):
        raise UsageError(f'--plan {path}: expected {{"phases": [{{"kind": "ramp", ...}}, ...]}}')
    _known_keys(path, "", data, PLAN_KEYS)
    # phases count from 0, as everywhere else in the project (phases.0.rate_per_s)
    for n, ph in enumerate(data["phases"]):
        where = f"phases[{n}]"
        if not isinstance(ph, dict):
            raise UsageError(f'--plan {path}: {where}: expected {{"kind": "ramp", ...}}')
        kind = ph.get("kind")
        if kind not in PHASE_KINDS:
            close = closest(kind, PHASE_KINDS)
            hint = f"did you mean `{close}`? " if close else ""
            raise UsageError(
                f"--plan {path}: {where}: kind {kind!r}: {hint}use one of: {', '.join(PHASE_KINDS)}"
            )
        _known_keys(path, f"{where}: ", ph, PHASE_KEYS)
    try:
        phases = phases_from_json(data["phases"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--plan {path}: {exc}") from exc
    return phases, data.get("arrival"), data.get("seed")


def _known_keys(path: str, where: str, data: dict[str, Any], known: tuple[str, ...]) -> None:
    """UsageError for the first key of ``data`` that is not ``known``, with the closest one."""
    for key in data:
        if key not in known:
            raise UsageError(
                f"--plan {path}: {where}unknown key `{key}`: {unknown_key_fix(key, known)}"
            )


class Merger:
    """Folds the processes' lines into the agent's per-second lines."""

    def __init__(self, agent: str, schedule: Schedule, start_at: float) -> None:
        self.agent = agent
        self.schedule = schedule
        self.start_at = start_at
        self.latest: dict[int, dict[str, Any]] = {}
        self.connect = Histogram("us")
        self.delivery = Histogram("us")
        self.read = Histogram("us")
        self.lag_ms = 0.0
        self.saturated_ever = False
        self.me = psutil.Process()
        self.me.cpu_percent(None)
        self._uss = 0
        self._uss_lines = 0

    def add(self, proc: int, line: dict[str, Any]) -> None:
        self.latest[proc] = line
        self.connect.merge(Histogram.from_json(line["connect_hist"]))
        self.delivery.merge(Histogram.from_json(line["delivery_hist"]))
        self.read.merge(Histogram.from_json(line["read_hist"]))
        self.lag_ms = max(self.lag_ms, float(line.get("lag_ms", 0.0)))

    def line(
        self, kind: str, publisher: Publisher | None, tick: int | None = None
    ) -> dict[str, Any]:
        """The merged line for whole second ``tick`` after the start (None: now, the end)."""
        now = time.time()
        elapsed = float(tick) if tick is not None else max(0.0, round(now - self.start_at, 3))
        lines = list(self.latest.values())
        out: dict[str, Any] = {
            "kind": kind,
            "t": self.start_at + elapsed if tick is not None else now,
            "agent": self.agent,
            "elapsed_s": elapsed,
            "planned": self.schedule.planned_by(elapsed),
        }
        for f in SUM_FIELDS:
            out[f] = sum(int(x.get(f, 0)) for x in lines)
        out["failed"] = {r: sum(int(x["failed"].get(r, 0)) for x in lines) for r in FAILURES}
        lag = self.lag_ms
        if publisher is not None:
            out["msgs_out"] += publisher.msgs_out
            out["bytes_out"] += publisher.bytes_out
            out["publish_errors"] = publisher.errors
            out["publish_lag_ms"] = round(publisher.lag_max_s * 1000.0, 3)
            publisher.lag_max_s = 0.0
        out["lag_ms"] = lag
        procs = [{"pid": x["pid"], "cpu_percent": x["cpu_percent"], "uss": x["uss"]} for x in lines]
        with contextlib.suppress(psutil.Error):
            # the USS walks the page tables: read every USS_EVERY lines, as the load processes
            if self._uss_lines % USS_EVERY == 0 or tick is None:  # (tick None: the last)
                self._uss = self.me.memory_full_info().uss
            self._uss_lines += 1
            procs.append(
                {"pid": self.me.pid, "cpu_percent": self.me.cpu_percent(None), "uss": self._uss}
            )
        out["procs"] = procs
        out["saturated"] = any(p["cpu_percent"] > SATURATED_CPU_PERCENT for p in procs)
        self.saturated_ever = self.saturated_ever or out["saturated"]
        out["connect_hist"] = self.connect.to_json()
        out["delivery_hist"] = self.delivery.to_json()
        out["read_hist"] = self.read.to_json()
        self.connect.reset()
        self.delivery.reset()
        self.read.reset()
        self.lag_ms = 0.0
        return out


class Coordinator:
    """Runs the load processes and the streams (the event-loop side of ``main``)."""

    def __init__(
        self,
        args: argparse.Namespace,
        schedule: Schedule,
        cfgs: list[ProcConfigJSON],
        publish: PublishSpec | None,
        out: IO[str] | None,
    ) -> None:
        self.args = args
        self.schedule = schedule
        self.cfgs = cfgs
        self.publish = publish
        self.out = out
        self.children: list[asyncio.subprocess.Process] = []
        self.reasons: dict[int, str] = {}
        self.stop_reason = ""
        self.merger: Merger | None = None
        self.http_error_told = False

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, separators=(",", ":"))
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()
        if not self.args.quiet and line["kind"] == "agent":
            f = line["failed"]
            by_reason = ", ".join(f"{r} {n}" for r, n in f.items() if n)
            pub_errors = line.get("publish_errors", 0)
            print(
                f"[agent {line['agent']}] t={line['elapsed_s']:.0f}s planned={line['planned']} "
                f"started={line['started']} open={line['open']} closed={line['closed']} "
                f"failed={sum(f.values())}{f' ({by_reason})' if by_reason else ''} "
                f"{f'publish_errors={pub_errors} ' if pub_errors else ''}"
                f"lag={line['lag_ms']:.1f}ms "
                f"cpu={'/'.join(str(round(p['cpu_percent'])) for p in line['procs'])}%"
                f"{' SATURATED' if line['saturated'] else ''}",
                file=sys.stderr,
            )

    def _signal(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        for child in self.children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)

    def _tell_expected(self, publisher: Publisher | None) -> None:
        """The publisher is done: tell the load processes the last id of its channel."""
        if publisher is None or publisher.last_id is None:
            return
        msg = json.dumps({"expected": {publisher.channel: publisher.last_id}}) + "\n"
        for child in self.children:
            if child.returncode is None and child.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    child.stdin.write(msg.encode())

    async def _read(self, k: int, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None and self.merger is not None
        while line := await child.stdout.readline():
            try:
                data = json.loads(line)
            except ValueError:
                print(f"agent proc {k}: {line.decode(errors='replace').rstrip()}", file=sys.stderr)
                continue
            if "tick" in data:
                self.merger.add(k, data)
                error = data.get("http_error")
                if error and not self.http_error_told:  # the first of all the processes' ones
                    self.http_error_told = True
                    kind = SessionKind(self.args.session)
                    print(
                        f"lab.agent: {describe_http_failure(kind, error['status'], error['url'])}",
                        file=sys.stderr,
                    )
                if data.get("final"):
                    self.reasons[k] = str(data.get("reason", ""))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal, sig.name)
        group, why = IdleGroup.create() if self.args.nice else (None, "")
        try:
            return await self._run(group, why)
        finally:
            if group is not None:
                for c in self.children:  # (after a failure: none may stay in the group)
                    if c.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            c.kill()
                        await c.wait()
                group.remove()

    def _tell_niceness(self, group: IdleGroup | None, why: str) -> None:
        """Where the niced load processes are, as found once they have started."""
        if self.args.quiet:
            return
        where = f"each in its own autogroup ({why})"
        if group is not None:
            pids = {c.pid for c in self.children}
            joined = len(pids & group.members())
            where = f"in cpu cgroup {group.path} ({group.how})"
            if joined < len(pids):
                where += f": only {joined} of {len(pids)} joined it, the others in autogroups"
        print(f"lab.agent: load processes at nice {self.args.nice}, {where}", file=sys.stderr)

    async def _run(self, group: IdleGroup | None, why: str) -> int:
        loop = asyncio.get_running_loop()
        args = self.args
        for cfg in self.cfgs:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lab.agent.proc",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 24,
                preexec_fn=(
                    functools.partial(give_way, args.nice, str(group.path) if group else None)
                    if args.nice
                    else None
                ),
            )
            self.children.append(child)
            assert child.stdin is not None
            child.stdin.write((json.dumps(cfg) + "\n").encode())
            await child.stdin.drain()
        for k, child in enumerate(self.children):
            assert child.stdout is not None
            try:
                ready = await asyncio.wait_for(child.stdout.readline(), READY_TIMEOUT_S)
            except TimeoutError:
                ready = b""
            if b"ready" not in ready:
                interrupted = bool(self.stop_reason)
                self._signal("failed")
                for c in self.children:
                    await c.wait()
                if interrupted:
                    break
                print(
                    f"lab.agent: load process {k} did not start (see its error above)",
                    file=sys.stderr,
                )
                return 1
        if args.nice:
            self._tell_niceness(group, why)
        if self.stop_reason:  # a signal while starting: nothing ran; rows are not_started
            for c in self.children:
                if c.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        c.send_signal(signal.SIGTERM)
                await c.wait()
            self._join_records()
            flushed = f": records flushed to {args.records}" if args.records else ""
            print(
                f"lab.agent: stopped by {self.stop_reason} before the start, no connection "
                f"opened{flushed}",
                file=sys.stderr,
            )
            return 0
        start_at = args.start_at if args.start_at is not None else time.time() + 0.5
        if start_at < time.time() - 1.0:
            print(
                f"lab.agent: --start-at is {time.time() - start_at:.1f}s in the past; "
                "the schedule starts behind (see lag_ms)",
                file=sys.stderr,
            )
        self.merger = Merger(args.agent_id, self.schedule, start_at)
        for child in self.children:
            assert child.stdin is not None
            child.stdin.write((json.dumps({"start_at": start_at}) + "\n").encode())
            await child.stdin.drain()
        readers = [loop.create_task(self._read(k, c)) for k, c in enumerate(self.children)]
        waits = [loop.create_task(c.wait()) for c in self.children]
        start_mono = loop.time() + (start_at - time.time())
        publisher = Publisher(self.publish) if self.publish else None
        pub_task = loop.create_task(publisher.run(start_mono)) if publisher else None
        if pub_task is not None:
            pub_task.add_done_callback(lambda _: self._tell_expected(publisher))
        hard_end = start_mono + (args.max_duration or self.schedule.end_s + 3600.0) + STOP_GRACE_S
        tick = 1
        killed_at: float | None = None
        while not all(w.done() for w in waits):
            await asyncio.wait(
                waits, timeout=max(0.0, start_mono + tick + EMIT_DELAY_S - loop.time())
            )
            if loop.time() >= start_mono + tick + EMIT_DELAY_S and not all(w.done() for w in waits):
                self.emit(self.merger.line("agent", publisher, tick))
                tick = int(loop.time() - start_mono - EMIT_DELAY_S) + 1
            if loop.time() > hard_end and killed_at is None:
                self._signal("max_duration")
                killed_at = loop.time()
            if killed_at is not None and loop.time() > killed_at + STOP_GRACE_S:
                for c in self.children:
                    if c.returncode is None:
                        c.kill()
        await asyncio.gather(*readers)
        if publisher is not None and pub_task is not None:
            publisher.stop()
            await pub_task
            if publisher.errors:  # the first one was told as it happened
                print(
                    f"lab.agent: publish: {publisher.errors} of "
                    f"{publisher.errors + publisher.msgs_out} messages failed "
                    "(the first error is above)",
                    file=sys.stderr,
                )
        return self._end(publisher)

    def _end(self, publisher: Publisher | None) -> int:
        assert self.merger is not None
        crashed = [
            k for k, c in enumerate(self.children) if c.returncode != 0 or k not in self.reasons
        ]
        reasons = set(self.reasons.values())
        # the signal this process got (SIGINT from a terminal reaches it as itself, and its
        # load processes as the SIGTERM it forwards), else one a load process got directly
        signals = sorted(r for r in reasons if r.startswith("SIG"))
        if self.stop_reason.startswith("SIG"):
            signame = self.stop_reason
        else:
            signame = signals[0] if signals else ""
        line = self.merger.line("agent_end", publisher)
        line["saturated_any"] = self.merger.saturated_ever
        if crashed:
            line["outcome"], line["reason"] = (
                "failed",
                (
                    f"load process(es) {crashed} exited without finishing "
                    f"(codes {[self.children[k].returncode for k in crashed]})"
                ),
            )
        elif signame:
            line["outcome"], line["reason"] = "interrupted", signame
        elif "max_duration" in reasons or self.stop_reason == "max_duration":
            line["outcome"], line["reason"] = "interrupted", "max_duration"
        else:
            line["outcome"], line["reason"] = "completed", ""
        self._join_records()
        self.emit(line)
        summary = failure_summary(line, self.args.url)
        if summary:
            print(f"lab.agent: {summary}", file=sys.stderr)
        if signame and not crashed:
            dst = self.args.records
            flushed = f"records flushed to {dst}" if dst else "no --records to flush"
            print(
                f"lab.agent: stopped by {signame}: connections closed, {flushed}", file=sys.stderr
            )
        return 1 if crashed else 0

    def _join_records(self) -> None:
        dst = self.args.records
        if not dst:
            return
        Path(dst).unlink(missing_ok=True)
        Path(dst).touch()
        for cfg in self.cfgs:
            part = cfg.get("records_path")
            if part and Path(part).exists():
                append_file(dst, part)
                Path(part).unlink()


# per failure reason: what it most likely means and what to do (the agent's last stderr line)
_FAILURE_HINTS = {
    "refused": "nothing accepted connections at {where}: is the server running there?",
    "timeout": "no upgrade within --connect-timeout: the server is overloaded or the path "
    "drops packets; see the server's log, or lower --rate",
    "reset": "the server closed them: see its log",
    "no_port": "out of ephemeral ports: add source addresses (--source-ips)",
    "no_files": "out of open files: use more --procs (or --procs auto)",
    "http": "the server answered HTTP with an error (the line above names it)",
    "other": "see the records (--records) for each connection's outcome",
}


def failure_summary(line: Mapping[str, Any], urls: Sequence[str]) -> str:
    """One sentence for the end of a run whose connections failed: how many of how many, by
    reason, and the likely cause of the commonest; "" when none failed. (Connect errors are
    data: the exit status stays 0.)"""
    failed = {r: int(n) for r, n in (line.get("failed") or {}).items() if n}
    total = sum(failed.values())
    if not total:
        return ""
    top = max(failed, key=failed.__getitem__)
    where = ", ".join(urls)
    counts = ", ".join(f"{r} {n}" for r, n in sorted(failed.items(), key=lambda x: -x[1]))
    hint = _FAILURE_HINTS.get(top, _FAILURE_HINTS["other"]).format(where=where)
    return f"{total} of {line.get('started', total)} connections failed ({counts}): {hint}"


def prepare(
    args: argparse.Namespace,
) -> tuple[Schedule, list[ProcConfigJSON], PublishSpec | None, list[str]]:
    """Everything decided before any process or connection: the plan, its capacity, the
    process configs. Raises UsageError / CapacityError with the fix."""
    kind = SessionKind(args.session)
    try:
        targets = [make_target(u, kind) for u in args.url]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.max_duration is not None and not args.max_duration > 0:
        raise UsageError(
            f"--max-duration {args.max_duration:g}: give seconds > 0 (or leave it out: the "
            "plan's end + 3600 s)"
        )
    if not args.connect_timeout > 0:
        raise UsageError(f"--connect-timeout {args.connect_timeout:g}: give seconds > 0")
    arrival, seed = args.arrival, args.seed
    if args.plan:
        phases, p_arrival, p_seed = load_plan_file(args.plan)
        arrival = p_arrival or arrival
        seed = p_seed if p_seed is not None else seed
    else:
        bad = [
            f"--{flag} {value:g}: {need}"
            for flag, value, ok, need in (
                ("rate", args.rate, args.rate > 0, "give new connections per second > 0"),
                ("connections", args.connections, args.connections >= 0, "give a count >= 0"),
                ("hold", args.hold, args.hold >= 0, "give seconds >= 0"),
            )
            if not ok
        ]
        if bad:
            raise UsageError("; ".join(bad))
        phases = simple_phases(args.rate, args.connections, args.hold, args.close_rate)
    try:
        schedule = build_schedule(phases, arrival=Arrival(arrival), seed=int(seed))
    except (PlanError, ValueError) as exc:
        raise UsageError(f"plan: {exc}") from exc
    limits = read_host_limits()
    peak, peak_rate = schedule.peak_open(), schedule.peak_rate_per_s()
    if args.procs == "auto":
        procs = auto_procs(peak, peak_rate, limits)
    else:
        try:
            procs = int(args.procs)
            assert procs >= 1
        except (ValueError, AssertionError) as exc:
            raise UsageError(f"--procs {args.procs!r}: give a number >= 1 or auto") from exc
    destinations = len({t.addr for t in targets})
    loopback = all(is_loopback_host(t.addr[0]) for t in targets)
    needed = source_addresses_for(-(-peak // max(1, destinations)), limits)
    try:
        sources = parse_source_ips(args.source_ips, needed=needed, loopback=loopback)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    lanes = schedule.lanes(procs, RATE_PER_PROCESS)
    warnings = check_capacity(
        Demand(peak, peak_rate, procs, len(sources), destinations, lanes), limits
    )
    check_source_ips(sources)
    if not len(schedule):
        warnings.append("the plan opens no connection: there is nothing to measure")
    publish = None
    if args.publish_url:
        try:
            publish = PublishSpec(
                args.publish_url,
                args.publish_rate,
                args.publish_count,
                args.publish_token,
                args.payload_bytes,
                args.publish_delay,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    cfgs: list[ProcConfigJSON] = [
        {
            "proc": k,
            "procs": procs,
            "lanes": lanes,
            "agent": args.agent_id,
            "session": kind.value,
            "urls": list(args.url),
            "source_ips": sources,
            "phases": phases_to_json(phases),
            "arrival": arrival,
            "seed": int(seed),
            "max_duration_s": args.max_duration,
            "connect_timeout_s": args.connect_timeout,
            "subscribe": list(args.subscribe),
            "records_path": f"{args.records}.p{k}" if args.records else None,
            "lp_timeout_s": args.lp_timeout,
            "kernel_timestamps": not args.read_on_arrival,
        }
        for k in range(procs)
    ]
    if kind in (SessionKind.WEBSOCKET, SessionKind.GENERIC):
        # built here, once, rather than by each load process at once
        path, why = fastpath.build()
        for cfg in cfgs:
            cfg["fastpath"] = path is not None
        if path is None and not cbuild.switched_off(fastpath.ENV_SWITCH):
            warnings.append(
                f"the C fast path is off: {why}. The connections take the Python path, which "
                "measures the same with ~40 us more agent CPU per new connection"
            )
    return schedule, cfgs, publish, warnings


def _side_by_side(cfgs: list[ProcConfigJSON]) -> str:
    """What the startup message adds when fewer than all processes open at once:
    `` (opening in turn)`` or `` (L opening at a time, in turn)``."""
    lanes = cfgs[0].get("lanes", len(cfgs))
    if lanes >= len(cfgs):
        return ""
    return f" ({lanes} opening at a time, in turn)" if lanes > 1 else " (opening in turn)"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m lab.agent`` / ``lab agent``: run the plan; 0 when it ran (connect errors are
    data), 2 with a message on stderr when it could not run (bad flags, capacity)."""
    args = build_parser(prog).parse_args(argv)
    try:
        schedule, cfgs, publish, warnings = prepare(args)
    except (UsageError, CapacityError) as exc:
        print(f"lab.agent: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"lab.agent: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(
            f"lab.agent: {len(schedule)} connections over {len(cfgs)} process(es)"
            f"{_side_by_side(cfgs)}, "
            f"{len(cfgs[0]['source_ips'])} source address(es), plan {schedule.end_s:.1f}s"
            f"{', C fast path' if cfgs[0].get('fastpath') else ''}",
            file=sys.stderr,
        )
    out = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115
    try:
        import uvloop

        return uvloop.run(Coordinator(args, schedule, cfgs, publish, out).run())
    finally:
        if out is not None:
            out.close()
