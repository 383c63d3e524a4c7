"""lab.ssh against real SSH servers: the embedded asyncssh server and Debian's OpenSSH in netns."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from lab import doctor, ssh
from lab.experiment import LOCAL, ExperimentError, HostSpec
from tests.conftest import require, require_root
from tests.netns import kill_sshd, netns_hosts


@pytest.fixture
async def embedded():
    server = await ssh.EmbeddedServer().start()
    yield server
    await server.close()


async def test_embedded_runs_commands_in_a_real_shell(embedded: ssh.EmbeddedServer) -> None:
    conn = await ssh.connect(LOCAL, embedded=embedded)
    try:
        result = await conn.run("echo out; echo err >&2; cat", stdin="fed\n")
        assert result == ssh.CommandResult(0, "out\nfed\n", "err\n")
        failed = await conn.run("exit 7", check=False)
        assert failed.exit_status == 7
        with pytest.raises(ssh.RemoteCommandError, match=r"host 'local'.*exit 3.*exited with 3"):
            await conn.run("echo boom >&2; exit 3")
        proc = await conn.start("for i in 1 2 3; do echo line$i; done")
        lines = [line async for line in proc.stdout if line]
        assert lines == ["line1\n", "line2\n", "line3\n"]
        await proc.wait()
        assert proc.exit_status == 0
    finally:
        await conn.close()


async def test_embedded_sftp_round_trip(embedded: ssh.EmbeddedServer, tmp_path: Path) -> None:
    conn = await ssh.connect(LOCAL, embedded=embedded)
    try:
        remote = await conn.resolve_dir(str(tmp_path / "remote" / "dir"))
        assert remote == str((tmp_path / "remote" / "dir").resolve())
        src = tmp_path / "src.bin"
        src.write_bytes(bytes(range(256)) * 1000)
        await conn.put(src, f"{remote}/a.bin")
        assert await conn.listdir(remote) == ["a.bin"]
        await conn.get(f"{remote}/a.bin", tmp_path / "back" / "a.bin")
        assert (tmp_path / "back" / "a.bin").read_bytes() == src.read_bytes()
        assert await conn.listdir(f"{remote}/missing") == []
    finally:
        await conn.close()


async def test_facts_and_clock_offset(embedded: ssh.EmbeddedServer) -> None:
    conn = await ssh.connect(LOCAL, embedded=embedded)
    try:
        facts = await ssh.gather_facts(conn)
    finally:
        await conn.close()
    assert facts["python"].startswith("3.")
    assert facts["nofile_hard"] is None or facts["nofile_hard"] > 0
    low, high = facts["sysctls"]["net.ipv4.ip_local_port_range"]
    assert 0 < low < high
    assert facts["mem_available_bytes"] > 0
    assert facts["c_compiler"]  # what builds the agent's C fast path
    assert ["127.0.0.0", 8, ""] in facts["addresses"]  # a whole loopback network is local
    # same machine, same clock: the measured offset is within the round trip
    assert abs(facts["clock_offset_s"]) <= facts["clock_rtt_s"] + 0.05


async def test_connect_errors_name_host_address_and_fix(
    embedded: ssh.EmbeddedServer, tmp_path: Path
) -> None:
    with socketless_port() as port:
        spec = HostSpec(name="nowhere", address="127.0.0.1", port=port)
        with pytest.raises(ssh.SSHConnectError) as err:
            await ssh.connect(spec, timeout_s=5)
    text = str(err.value)
    assert "'nowhere'" in text and f"127.0.0.1:{port}" in text and "Fix:" in text

    # a real server whose host key is not in known_hosts: refused, with the way out
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    key = tmp_path / "id"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    spec = HostSpec(
        name="unknown-key",
        address="127.0.0.1",
        port=embedded.port,
        known_hosts=str(empty),
        key_file=str(key),
    )
    with pytest.raises(ssh.SSHConnectError) as err:
        await ssh.connect(spec, timeout_s=5)
    assert "ssh-keyscan" in str(err.value) and "insecure_skip_host_key_check" in str(err.value)

    # a key file that is not there is named as such
    missing = dataclasses.replace(spec, key_file=str(tmp_path / "none"))
    with pytest.raises(ssh.SSHConnectError, match=r"key_file .* does not exist"):
        await ssh.connect(missing, timeout_s=5)

    # skipping the check explicitly gets past the host key, then our key is refused
    spec = dataclasses.replace(spec, insecure_skip_host_key_check=True)
    with pytest.raises(ssh.SSHConnectError, match="authentication failed"):
        await ssh.connect(spec, timeout_s=5)


async def test_a_silent_host_times_out_at_its_own_connect_timeout() -> None:
    """A host that accepts TCP but never speaks SSH: the connect gives up after the host's
    connect_timeout_s (from the inventory), and the fix names that key."""
    from lab.inventory import host_from_dict

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        spec = host_from_dict(
            "inv.yaml", "hosts[0]",
            {"name": "slow", "address": "127.0.0.1", "port": port, "connect_timeout_s": 0.5},
        )  # fmt: skip
        assert spec.connect_timeout_s == 0.5
        began = time.monotonic()
        with pytest.raises(ssh.SSHConnectError) as err:
            await ssh.connect(spec)
        took = time.monotonic() - began
    assert took < 5, took  # the default would wait 15 s
    assert "no answer within 0.5 s" in str(err.value)
    assert "raise `connect_timeout_s` for host 'slow'" in str(err.value)
    with pytest.raises(ExperimentError, match="connect_timeout_s"):
        host_from_dict("inv.yaml", "hosts[0]", {"name": "x", "connect_timeout_s": 0})


@contextlib.contextmanager
def socketless_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on (bound, never listening, while in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_host_record_has_no_key_material(tmp_path: Path) -> None:
    spec = HostSpec(name="h", key_file="~/.ssh/id_ed25519", insecure_skip_host_key_check=True)
    record = ssh.host_record(spec)
    assert record["key_file"] == "~/.ssh/id_ed25519"
    assert record["insecure_skip_host_key_check"] is True
    assert "PRIVATE KEY" not in json.dumps(record)


async def test_openssh_hosts_in_network_namespaces(tmp_path: Path) -> None:
    require("sshd", "OpenSSH test hosts")
    require("ip", "network namespaces")
    require_root("ip netns")
    with netns_hosts(2, tmp_path) as hosts:
        conns = await asyncio.gather(*(ssh.connect(h.spec) for h in hosts))
        try:
            for host, conn in zip(hosts, conns, strict=True):
                result = await conn.run("hostname -I")
                assert host.address in result.stdout.split()
                facts = await ssh.gather_facts(conn)
                assert facts["sysctls"]["net.ipv4.ip_local_port_range"] == [1024, 65535]
                # the host's own addresses, for lab doctor's source address check
                own = {a for a, *_ in facts["addresses"]}
                assert host.address in own and "198.18.99.99" not in own
                assert doctor.source_ip_usable(host.address, facts) is True
                assert doctor.source_ip_usable("198.18.99.99", facts) is False
                workdir = await conn.resolve_dir(host.spec.workdir)
                await conn.put(Path(__file__), f"{workdir}/copy.py")
                out = await conn.run(f"cat {shlex.quote(workdir)}/copy.py")
                assert out.stdout == Path(__file__).read_text()
            # a dropped host is noticed
            kill_sshd(hosts[1])
            await asyncio.wait_for(conns[1].wait_lost(), 30)
            assert conns[1].lost and not conns[0].lost
        finally:
            await asyncio.gather(*(c.close() for c in conns))
        # host keys are checked against known_hosts: a wrong file refuses the host
        wrong = tmp_path / "wrong_known_hosts"
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        wrong.write_text(f"{hosts[0].address} {other}")
        spec = dataclasses.replace(hosts[0].spec, known_hosts=str(wrong))
        with pytest.raises(ssh.SSHConnectError, match=hosts[0].address):
            await ssh.connect(spec, timeout_s=10)


def test_gather_facts_sync_for_doctor_reports_each_host() -> None:
    with socketless_port() as port:
        down = HostSpec(name="down", address="127.0.0.1", port=port)
        facts = ssh.gather_facts_sync([LOCAL, down])
    assert facts["local"]["python"].startswith("3.") and "clock_offset_s" in facts["local"]
    assert "'down'" in facts["down"]["error"] and "Fix:" in facts["down"]["error"]
