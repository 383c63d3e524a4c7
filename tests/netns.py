"""Test hosts in network namespaces, each running Debian's OpenSSH sshd.

``netns_hosts(count, tmp)`` makes a bridge in the root namespace (198.18.N.1/24) and one
namespace per host joined to it by a veth pair (198.18.N.10+i), starts ``/usr/sbin/sshd`` inside
each with a generated host key and an authorized client key, and yields ``NetnsHost`` records
whose ``spec`` is a ``lab.experiment.HostSpec`` that reaches the host with host-key checking on
(a per-test known_hosts file). ``netns_inventory_hosts(inventory, tmp, home, extra)`` builds
the hosts of an inventory file instead, at its addresses and with extra addresses per host, so
that exactly that file reaches them (its key_file and known_hosts are written under ``home``).
Everything is torn down afterwards: processes in the namespaces, the namespaces, the bridge.
Needs root, ``ip`` and ``sshd`` (use ``require`` in the test).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.experiment import HostSpec

SSHD = "/usr/sbin/sshd"
# The interpreter behind the test venv: namespaces share the filesystem, so it runs there too.
HOST_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


@dataclass(frozen=True, slots=True)
class NetnsHost:
    """One namespace host: where sshd listens and how the lab reaches it."""

    name: str
    netns: str
    address: str
    spec: HostSpec
    sshd_pid: int


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def kill_netns_processes(netns: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process in the namespace."""
    for pid in _netns_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_sshd(host: NetnsHost) -> None:
    """Kill the host's sshd: the listener and every session process (drops its connections)."""
    for pid in _netns_pids(host.netns):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if exe.endswith("/sshd") or "sshd" in Path(f"/proc/{pid}/comm").read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_listening(netns: str, address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd in {netns} exited with {proc.returncode}: {log.read_text()}")
        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                HOST_PYTHON,
                "-c",
                f"import socket; socket.create_connection(({address!r}, 22), 1).close()",
            ],
            capture_output=True,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd in {netns} did not listen on {address}:22: {log.read_text()}")


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "comet-lab-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One namespace host to build: its inventory entry and any extra addresses on eth0."""

    spec: HostSpec
    extra_addresses: tuple[str, ...] = ()


def _expand(path: str, home: Path) -> Path:
    """``~``-paths of an inventory as the controller will read them with HOME=``home``."""
    return home / path[2:] if path.startswith("~/") else Path(path)


@contextlib.contextmanager
def netns_hosts(count: int, tmp: Path, *, prefix: str = "h") -> Iterator[list[NetnsHost]]:
    """``count`` namespace hosts with sshd, torn down on exit (see the module docstring)."""
    subnet = f"198.18.{(os.getpid() + int(time.time())) % 250 + 1}"
    client_key, known_hosts = tmp / "id_ed25519", tmp / "known_hosts"
    wanted = [
        _Wanted(
            HostSpec(
                name=f"{prefix}{i}",
                address=f"{subnet}.{10 + i}",
                port=22,
                user="root",
                key_file=str(client_key),
                python=HOST_PYTHON,
                workdir=str(tmp / f"{prefix}{i}" / "work"),
                known_hosts=str(known_hosts),
            )
        )
        for i in range(count)
    ]
    with _network(subnet, wanted, tmp, client_key, known_hosts) as hosts:
        yield hosts


@contextlib.contextmanager
def netns_inventory_hosts(
    inventory: Path,
    tmp: Path,
    home: Path,
    extra_addresses: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[list[NetnsHost]]:
    """The hosts of an inventory file, built as namespace hosts at its addresses (one /24,
    the bridge at .1), reachable with exactly that file by a controller whose HOME is
    ``home``: the client key and known_hosts are created at the inventory's ``key_file`` and
    ``known_hosts`` (``~`` = ``home``). Every host must use the same key and known_hosts
    file. ``extra_addresses`` adds addresses (same /24) to a host's eth0, e.g. the agents'
    source addresses. Torn down on exit."""
    from lab.inventory import load_inventory

    specs = load_inventory(inventory)
    subnets = {h.address.rsplit(".", 1)[0] for h in specs}
    keys = {(h.key_file, h.known_hosts) for h in specs}
    if len(subnets) != 1 or len(keys) != 1 or None in next(iter(keys)):
        raise ValueError(
            f"{inventory}: netns hosts need every address in one /24 and one shared key_file "
            f"and known_hosts (got subnets {sorted(subnets)}, keys {sorted(map(str, keys))})"
        )
    key_file, known = next(iter(keys))
    assert key_file and known
    client_key, known_hosts = _expand(key_file, home), _expand(known, home)
    client_key.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    extra = extra_addresses or {}
    wanted = [_Wanted(h, tuple(a for a in extra.get(h.name, ()) if a != h.address)) for h in specs]
    with _network(subnets.pop(), wanted, tmp, client_key, known_hosts) as hosts:
        yield hosts


def _netns_exec(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *args], check=True, capture_output=True)


@contextlib.contextmanager
def _network(
    subnet: str, wanted: Sequence[_Wanted], tmp: Path, client_key: Path, known_hosts: Path
) -> Iterator[list[NetnsHost]]:
    """A bridge at ``subnet``.1/24 and one namespace with sshd per wanted host."""
    taken = subprocess.run(
        ["ip", "-o", "addr", "show", "to", f"{subnet}.0/24"], capture_output=True, text=True
    ).stdout.strip()
    if taken:
        raise RuntimeError(
            f"{subnet}.0/24 is already in use on this machine ({taken.splitlines()[0]}): a "
            "crashed test may have left its bridge; delete it with `ip link del <bridge>`"
        )
    tag = f"{os.getpid() % 100000:05d}{int(time.time() * 1000) % 100:02d}"
    bridge = f"clb{tag}"
    namespaces: list[str] = []
    sshds: list[subprocess.Popen[bytes]] = []
    authorized = tmp / "authorized_keys"
    hosts: list[NetnsHost] = []
    try:
        if client_key.exists():
            client_key.unlink()
            client_key.with_suffix(".pub").unlink(missing_ok=True)
        authorized.write_text(_keygen(client_key) + "\n")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        known_lines: list[str] = []
        for i, want in enumerate(wanted):
            spec, address = want.spec, want.spec.address
            netns, outer = f"cl{tag}{i}", f"clv{tag}{i}"
            _ip("netns", "add", netns)
            namespaces.append(netns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            for addr in (address, *want.extra_addresses):
                _ip("-n", netns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "route", "add", "default", "via", f"{subnet}.1")
            # per-namespace sysctls, as docs/hosts.md asks of real hosts: agents there may open
            # tens of thousands of connections, the server accepts them at a fast ramp
            for setting in (
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.core.somaxconn=4096",
                "net.ipv4.tcp_max_syn_backlog=4096",
            ):
                _netns_exec(netns, "sysctl", "-qw", setting)
            hdir = tmp / f"sshd-{spec.name}"
            hdir.mkdir()
            host_pub = _keygen(hdir / "host_key")
            known_lines.append(f"{address} {' '.join(host_pub.split()[:2])}")
            config = hdir / "sshd_config"
            config.write_text(
                "\n".join(
                    [
                        f"ListenAddress {address}",
                        "Port 22",
                        f"HostKey {hdir / 'host_key'}",
                        f"PidFile {hdir / 'sshd.pid'}",
                        f"AuthorizedKeysFile {authorized}",
                        "PermitRootLogin prohibit-password",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "StrictModes no",
                        "PrintMotd no",
                        "MaxSessions 64",
                        "MaxStartups 64:30:128",
                        "Subsystem sftp internal-sftp",
                        "",
                    ]
                )
            )
            log = hdir / "sshd.log"
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, SSHD, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
                start_new_session=True,
            )
            sshds.append(proc)
            _wait_listening(netns, address, proc, log)
            hosts.append(NetnsHost(spec.name, netns, address, spec, proc.pid))
        known_hosts.write_text("\n".join(known_lines) + "\n")
        yield hosts
    finally:
        for netns in namespaces:
            kill_netns_processes(netns)
        for proc in sshds:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(5)
        for netns in namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
