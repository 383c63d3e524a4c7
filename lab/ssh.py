"""SSH to the lab's hosts: the embedded local server, remote hosts, and facts gathered over SSH.

Every host, the local machine included, is reached through asyncssh, so a laptop run and a
many-host run take the same code path. ``EmbeddedServer`` is an SSH server started in-process
on 127.0.0.1 (port 0, throwaway host and client keys made at start) that runs each command as
the current user with ``/bin/sh -c`` and serves SFTP; ``connect(spec, embedded=...)`` opens a
``HostConnection`` to a ``lab.experiment.HostSpec``: remote hosts use their address, port, user,
key file, ssh-agent and ``~/.ssh/config``, with host keys verified against known_hosts unless
the host sets ``insecure_skip_host_key_check`` (an explicit opt-out that the run records).

Nothing here writes key material anywhere: ``host_record`` is the inventory entry without
secrets, for run.json. Next: ``lab.deploy.deploy(conn)``, then ``lab.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import inspect
import json
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.metadata import read_addresses

if TYPE_CHECKING:
    import asyncssh

    from lab.experiment import HostSpec


class SSHConnectError(ConnectionError):
    """A host could not be reached: the message names the host, its address and the fix."""


class RemoteCommandError(RuntimeError):
    """A command on a host exited non-zero: the message names the host, the command, stderr."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What one finished command gave back."""

    exit_status: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """A host's clock minus the controller's (seconds), measured over the best round trip."""

    offset_s: float
    rtt_s: float


# --- the embedded server --------------------------------------------------------------------


async def _pump(reader: Any, writer: Any, *, close: bool) -> None:
    """Copy bytes from reader to writer until EOF; a closed writer ends the copy quietly."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (BrokenPipeError, ConnectionError, OSError):
        return
    except Exception as exc:  # asyncssh raises its own errors when the channel goes away
        if type(exc).__module__.startswith("asyncssh"):
            return
        raise
    finally:
        if close:
            with contextlib.suppress(Exception):
                writer.write_eof()


async def _run_process(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Run one SSH session's command in a real shell as the current user, like sshd does."""
    command = process.command
    argv = ["/bin/sh", "-c", command] if command is not None else ["/bin/sh"]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (process.env or {}).items()})
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=os.path.expanduser("~"),
        )
    except OSError as exc:
        process.stderr.write(f"cannot start /bin/sh: {exc}\n".encode())
        process.exit(127)
        return
    assert proc.stdin and proc.stdout and proc.stderr
    feed = asyncio.create_task(_pump(process.stdin, proc.stdin, close=True))
    out = asyncio.create_task(_pump(proc.stdout, process.stdout, close=False))
    err = asyncio.create_task(_pump(proc.stderr, process.stderr, close=False))
    status = await proc.wait()
    # The command may have left children holding its stdout (a role started in the
    # background); like sshd, the session ends when the command exits and its output drains.
    await asyncio.wait({out, err}, timeout=1.0)
    for task in (feed, out, err):
        task.cancel()
    with contextlib.suppress(Exception):
        process.exit(status if status >= 0 else 128 - status)


class EmbeddedServer:
    """The lab's own SSH server on 127.0.0.1, for the ``local`` host: start, connect, close.

    Keys are generated in memory at ``start()`` and never written to disk; the client side
    trusts exactly this server's host key, and the server accepts exactly this client key.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._host_key: asyncssh.SSHKey | None = None
        self._client_key: asyncssh.SSHKey | None = None

    async def start(self) -> EmbeddedServer:
        import asyncssh

        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._client_key = asyncssh.generate_private_key("ssh-ed25519")
        authorized = asyncssh.import_authorized_keys(
            self._client_key.export_public_key("openssh").decode()
        )
        self._acceptor = await asyncssh.listen(
            self.host,
            0,
            server_host_keys=[self._host_key],
            authorized_client_keys=authorized,
            process_factory=_run_process,
            sftp_factory=True,
            allow_scp=False,
            encoding=None,
            config=[],
        )
        self.port = self._acceptor.sockets[0].getsockname()[1]
        return self

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` that reach this server and trust only it."""
        import asyncssh

        if self._host_key is None or self._client_key is None:
            raise RuntimeError("EmbeddedServer.start() was not awaited")
        public = self._host_key.export_public_key("openssh").decode().strip()
        return {
            "host": self.host,
            "port": self.port,
            "username": getpass.getuser(),
            "client_keys": [self._client_key],
            "known_hosts": asyncssh.import_known_hosts(f"[{self.host}]:{self.port} {public}\n"),
            "agent_path": None,
            "config": [],
        }

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    async def __aenter__(self) -> EmbeddedServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- connections ----------------------------------------------------------------------------


def _connect_options(spec: HostSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"host": spec.address, "port": spec.port}
    if spec.user:
        options["username"] = spec.user
    if spec.key_file:
        options["client_keys"] = [os.path.expanduser(spec.key_file)]
    if spec.insecure_skip_host_key_check:
        options["known_hosts"] = None
    elif spec.known_hosts:
        options["known_hosts"] = os.path.expanduser(spec.known_hosts)
    return options


def _connect_fix(spec: HostSpec, exc: BaseException, timeout_s: float) -> str:
    import asyncssh

    where = f"{spec.address}:{spec.port}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        known = spec.known_hosts or "~/.ssh/known_hosts"
        return (
            f"the host key of {where} is not in {known}: add it with "
            f"`mkdir -p ~/.ssh && ssh-keyscan -p {spec.port} {spec.address} >> {known}` after "
            "checking it, or set "
            f"`insecure_skip_host_key_check: true` for host {spec.name!r} (recorded in run.json)"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return (
            f"authentication failed: set `user` and `key_file` for host {spec.name!r}, load the "
            "key into ssh-agent, or add your public key to ~/.ssh/authorized_keys on the host"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return (
            f"no answer within {timeout_s:g} s: check the address and firewall, or raise "
            f"`connect_timeout_s` for host {spec.name!r} if it is slow to answer"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where}: start sshd there or fix `address`/`port`"
    if isinstance(exc, OSError):
        return f"check that {spec.address} is reachable and that sshd runs on port {spec.port}"
    return "check the host's entry in the inventory and that sshd runs there"


async def connect(
    spec: HostSpec,
    *,
    embedded: EmbeddedServer | None = None,
    timeout_s: float | None = None,
) -> HostConnection:
    """Open an SSH connection to one inventory host; ``embedded`` serves hosts marked embedded.

    Raises ``SSHConnectError`` naming the host, its address and the fix. ``timeout_s``:
    default the host's ``connect_timeout_s``.
    """
    import asyncssh

    if timeout_s is None:
        timeout_s = spec.connect_timeout_s

    if spec.embedded:
        if embedded is None:
            raise SSHConnectError(
                f"host {spec.name!r} is the embedded local host but no EmbeddedServer was "
                "started: start one with `await EmbeddedServer().start()` and pass it"
            )
        options = embedded.connect_options()
    else:
        for field, what in (("key_file", "private key"), ("known_hosts", "known_hosts file")):
            value = getattr(spec, field)
            if value and not Path(os.path.expanduser(value)).is_file():
                raise SSHConnectError(
                    f"cannot connect to host {spec.name!r} at {spec.address}:{spec.port}: its "
                    f"{field} {value!r} does not exist. Fix: set `{field}` for the host to the "
                    f"{what} to use, or remove it to use ssh-agent / ~/.ssh/config"
                )
        options = _connect_options(spec)
    host = options.pop("host")
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(host, keepalive_interval=5, keepalive_count_max=3, **options),
            timeout_s,
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise SSHConnectError(
            f"cannot connect to host {spec.name!r} at {host}:{options.get('port', spec.port)}: "
            f"{reason}. Fix: {_connect_fix(spec, exc, timeout_s)}"
        ) from exc
    return HostConnection(spec, conn)


class HostConnection:
    """One SSH connection to a host: run commands, start long-running ones, move files by SFTP."""

    def __init__(self, spec: HostSpec, conn: asyncssh.SSHClientConnection) -> None:
        self.spec = spec
        self.name = spec.name
        self.conn = conn
        self._sftp: asyncssh.SFTPClient | None = None
        self._lost = asyncio.Event()
        self.closed_by_us = False
        self._watch = asyncio.ensure_future(self._watch_closed())

    async def _watch_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.wait_closed()
        self._lost.set()

    @property
    def lost(self) -> bool:
        """True once the connection has gone away (closed or dropped)."""
        return self._lost.is_set()

    async def wait_lost(self) -> str:
        """Wait until the connection drops; return the host name (for ``asyncio.wait`` races)."""
        await self._lost.wait()
        return self.name

    async def run(
        self, command: str, *, check: bool = True, timeout_s: float | None = 120.0, stdin: str = ""
    ) -> CommandResult:
        """Run a shell command on the host and wait for it; ``check`` raises on non-zero exit."""
        result = await self.conn.run(command, check=False, timeout=timeout_s, input=stdin or None)
        out = _text(result.stdout)
        err = _text(result.stderr)
        status = result.exit_status if result.exit_status is not None else -1
        if check and status != 0:
            tail = err.strip()[-2000:] or out.strip()[-2000:]
            raise RemoteCommandError(
                f"on host {self.name!r}: `{_short(command)}` exited with {status}: {tail}"
            )
        return CommandResult(status, out, err)

    async def start(self, command: str) -> asyncssh.SSHClientProcess[str]:
        """Start a long-running command; read its stdout lines, await ``.wait()`` for the end."""
        return await self.conn.create_process(command, encoding="utf-8", errors="replace")

    async def sftp(self) -> asyncssh.SFTPClient:
        """The connection's SFTP client (opened once)."""
        if self._sftp is None:
            self._sftp = await self.conn.start_sftp_client()
        return self._sftp

    async def put(self, local: Path, remote: str) -> None:
        sftp = await self.sftp()
        await sftp.put(str(local), remote)

    async def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        sftp = await self.sftp()
        await sftp.get(remote, str(local))

    async def listdir(self, remote: str) -> list[str]:
        sftp = await self.sftp()
        try:
            return sorted(n for n in await sftp.listdir(remote) if n not in {".", ".."})
        except Exception as exc:
            if type(exc).__module__.startswith("asyncssh"):
                return []
            raise

    async def resolve_dir(self, path: str) -> str:
        """Create ``path`` on the host (``~`` expanded by the host's shell); return it absolute."""
        quoted = _shell_path(path)
        result = await self.run(f"mkdir -p {quoted} && cd {quoted} && pwd -P")
        return result.stdout.strip().splitlines()[-1]

    async def close(self) -> None:
        self.closed_by_us = True
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.exit()
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 5)
        self._watch.cancel()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _short(command: str, limit: int = 160) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def _shell_path(path: str) -> str:
    """Quote a path for the host's shell, leaving a leading ``~`` or ``~/`` to be expanded."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def host_record(spec: HostSpec) -> dict[str, Any]:
    """The inventory entry for run.json: where and how the host was reached, no key material."""
    return {
        "name": spec.name,
        "address": spec.address,
        "port": spec.port,
        "user": spec.user,
        "key_file": spec.key_file,
        "python": spec.python,
        "workdir": spec.workdir,
        "known_hosts": spec.known_hosts,
        "insecure_skip_host_key_check": spec.insecure_skip_host_key_check,
        "embedded": spec.embedded,
    }


# --- facts over SSH -------------------------------------------------------------------------

_CLOCK_SCRIPT = "import sys, time\nfor _ in sys.stdin:\n    print(repr(time.time()), flush=True)\n"


async def measure_clock_offset(conn: HostConnection, python: str, samples: int = 7) -> ClockOffset:
    """Host clock minus controller clock, from the round trip with the smallest delay.

    One remote python answers each line on stdin with its ``time.time()``; the offset is the
    host's time minus the midpoint of the controller's send and receive times.
    """
    proc = await conn.start(f"{shlex.quote(python)} -u -c {shlex.quote(_CLOCK_SCRIPT)}")
    best: ClockOffset | None = None
    try:
        for _ in range(samples):
            sent = time.time()
            proc.stdin.write("t\n")
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            received = time.time()
            if not line:
                raise RemoteCommandError(f"on host {conn.name!r}: {python} gave no clock reading")
            sample = ClockOffset(float(line) - (sent + received) / 2, received - sent)
            if best is None or sample.rtt_s < best.rtt_s:
                best = sample
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.write_eof()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        proc.close()
    assert best is not None
    return best


_FACTS_BODY = r"""
import json, os, platform, resource, shutil, sys
def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
def sysctl(name):
    value = read("/proc/sys/" + name.replace(".", "/"))
    if value is None:
        return None
    parts = value.split()
    try:
        return [int(p) for p in parts] if len(parts) > 1 else int(parts[0])
    except ValueError:
        return value
mem = {}
for line in (read("/proc/meminfo") or "").splitlines():
    key, _, rest = line.partition(":")
    if key in ("MemTotal", "MemAvailable", "MemFree"):
        mem[key] = int(rest.split()[0]) * 1024
tcp = (read("/proc/net/sockstat") or "").partition("TCP:")[2].split("\n")[0].split()
tw = int(tcp[tcp.index("tw") + 1]) if "tw" in tcp else None
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
inf = resource.RLIM_INFINITY
print(json.dumps({
    "python": platform.python_version(),
    "python_executable": sys.executable,
    "implementation": sys.implementation.name,
    "machine": platform.machine(),
    "libc": list(platform.libc_ver()),
    "kernel": platform.release(),
    "hostname": platform.node(),
    "cpu_count": os.cpu_count(),
    "nofile_soft": None if soft == inf else soft,
    "nofile_hard": None if hard == inf else hard,
    "sysctls": {n: sysctl(n) for n in (
        "net.ipv4.ip_local_port_range", "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog", "fs.file-max", "fs.nr_open",
        "net.ipv4.ip_nonlocal_bind")},
    "addresses": read_addresses(),
    "mem_total_bytes": mem.get("MemTotal"),
    "mem_available_bytes": mem.get("MemAvailable"),
    "tcp_time_wait": tw,
    "c_compiler": (shutil.which(os.environ["CC"]) if os.environ.get("CC")
                   else shutil.which("cc") or shutil.which("gcc")),  # as lab.cbuild
    "time": __import__("time").time(),
}))
"""
# the script a host runs with its bare python: lab.metadata's address reader, then the facts
_FACTS_SCRIPT = (
    "from __future__ import annotations\n" + inspect.getsource(read_addresses) + _FACTS_BODY
)


async def gather_facts(conn: HostConnection, python: str | None = None) -> dict[str, Any]:
    """The preflight facts of a host, gathered over SSH with its bare python (no deploy needed).

    Keys: python, python_executable, implementation, machine, libc, kernel, hostname,
    cpu_count, nofile_soft, nofile_hard (None = unlimited), sysctls (ip_local_port_range as
    [low, high], somaxconn, tcp_max_syn_backlog, file-max, nr_open), mem_total_bytes,
    tcp_time_wait (TCP sockets in TIME_WAIT), c_compiler (the path of ``cc``, which builds
    the load agent's C fast path, or None), addresses ([address, prefix, interface]: where
    agents may bind source addresses),
    mem_available_bytes, clock_offset_s, clock_rtt_s. For ``lab doctor``.
    """
    python = python or conn.spec.python
    cmd = f"{shlex.quote(python)} -c {shlex.quote(_FACTS_SCRIPT)}"
    result = await conn.run(cmd, check=False, timeout_s=30)
    if result.exit_status != 0 or not result.stdout.strip():
        said = (result.stderr or result.stdout).strip()[-200:]
        raise RuntimeError(
            f"{conn.spec.name}: python {python!r} did not run there ({said or 'no output'}) "
            f"— fix: set `python:` of host {conn.spec.name!r} to a Python >= 3.11 on it"
        )
    facts: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    facts.pop("time", None)
    clock = await measure_clock_offset(conn, python, samples=5)
    facts["clock_offset_s"] = clock.offset_s
    facts["clock_rtt_s"] = clock.rtt_s
    return facts


async def gather_all(
    specs: Sequence[HostSpec], *, embedded: EmbeddedServer | None = None
) -> dict[str, dict[str, Any]]:
    """``gather_facts`` for every host at once; a host that fails gets ``{"error": message}``."""
    own_server = None
    if embedded is None and any(s.embedded for s in specs):
        own_server = embedded = await EmbeddedServer().start()
    try:

        async def one(spec: HostSpec) -> dict[str, Any]:
            conn = await connect(spec, embedded=embedded)
            try:
                return await gather_facts(conn)
            finally:
                await conn.close()

        results = await asyncio.gather(*(one(s) for s in specs), return_exceptions=True)
    finally:
        if own_server is not None:
            await own_server.close()
    out: dict[str, dict[str, Any]] = {}
    for spec, res in zip(specs, results, strict=True):
        if isinstance(res, BaseException):
            if not isinstance(res, Exception):
                raise res
            out[spec.name] = {"error": str(res)}
        else:
            out[spec.name] = res
    return out


def gather_facts_sync(specs: Sequence[HostSpec]) -> dict[str, dict[str, Any]]:
    """``gather_all`` for synchronous callers (``lab doctor``)."""
    return asyncio.run(gather_all(specs))
