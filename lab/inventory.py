"""Inventories: the hosts a run reaches over SSH, as frozen ``HostSpec`` records.

An inventory file is ``hosts: [{name, address, port, user, key_file, python, workdir,
known_hosts, insecure_skip_host_key_check, connect_timeout_s}]`` (or the bare list); an
experiment's ``hosts:`` names such a file or lists hosts inline. The default is ``LOCAL``: this
machine through the embedded in-process SSH server. Secrets never go in these files (keys stay
in key files or the ssh-agent). ``load_inventory(path)`` validates one; ``lab.experiment``
re-exports all of this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.comet.config import is_loopback
from lab.validation import ExperimentError, Section, read_yaml

LOCAL_HOST = "local"
CONNECT_TIMEOUT_S = 15.0  # how long an SSH connect may take before the host counts as unreachable


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One inventory entry: a host reached over SSH (``embedded``: the in-process server)."""

    name: str
    address: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    python: str = "python3"
    workdir: str = "~/.comet-lab"
    known_hosts: str | None = None
    insecure_skip_host_key_check: bool = False
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    embedded: bool = False


LOCAL = HostSpec(name=LOCAL_HOST, embedded=True)

HOST_KEYS = tuple(f.name for f in dataclasses.fields(HostSpec))


def host_from_dict(file: str, key: str, raw: Any) -> HostSpec:
    s = Section(file, key, raw)
    name = s.str_("name", required=True)
    embedded = s.bool_("embedded", name == LOCAL_HOST and "address" not in s.data)
    spec = HostSpec(
        name=name,
        address=s.str_("address", "127.0.0.1"),
        port=int(s.num("port", 22, lo=1, hi=65535, integer=True)),
        user=s.str_("user"),
        key_file=s.str_("key_file"),
        python=s.str_("python", "python3"),
        workdir=s.str_("workdir", "~/.comet-lab"),
        known_hosts=s.str_("known_hosts"),
        insecure_skip_host_key_check=s.bool_("insecure_skip_host_key_check", False),
        connect_timeout_s=float(s.num("connect_timeout_s", CONNECT_TIMEOUT_S, above=0, hi=600)),
        embedded=embedded,
    )
    if embedded and not is_loopback(spec.address):
        raise s.err(
            "embedded",
            f"the embedded SSH server runs inside the controller, on this machine, so it "
            f"cannot reach address {spec.address}",
            "drop embedded: true for a remote host (it is reached over SSH), or the address "
            "for this machine",
        )
    for secret in ("password", "passphrase"):
        if secret in s.data:
            raise s.err(secret, "secrets do not belong in inventory files", "use an SSH key/agent")
    s.done(HOST_KEYS)
    return spec


def hosts_from_data(file: str, key: str, raw: Any) -> tuple[HostSpec, ...]:
    if isinstance(raw, Mapping) and "hosts" in raw:
        s = Section(file, "", raw)
        items = s.raw("hosts")
        s.done(("hosts",))
        raw = items
    if not isinstance(raw, list) or not raw:
        raise ExperimentError(file, key or "hosts", "expected a non-empty list of hosts")
    hosts = tuple(
        host_from_dict(file, f"{key + '.' if key else ''}{i}", h) for i, h in enumerate(raw)
    )
    seen: set[str] = set()
    for i, h in enumerate(hosts):
        if h.name in seen:
            raise ExperimentError(file, f"{key}.{i}.name", f"duplicate host {h.name!r}")
        seen.add(h.name)
    return hosts


def load_inventory(path: str | Path) -> tuple[HostSpec, ...]:
    """Read an inventory file (``hosts: [{name, address, ...}]`` or a bare list)."""
    p = Path(path)
    return hosts_from_data(str(p), "hosts", read_yaml(p, "inventory"))


def inventory_to_dict(hosts: tuple[HostSpec, ...] | list[HostSpec]) -> dict[str, Any]:
    """``{"hosts": [...]}`` with only the fields that differ from the defaults; write it with
    ``yaml.safe_dump`` to get a file ``load_inventory`` reads back (tests make their own)."""
    defaults = {f.name: f.default for f in dataclasses.fields(HostSpec)}
    return {
        "hosts": [
            {k: v for k, v in dataclasses.asdict(h).items() if k == "name" or v != defaults[k]}
            for h in hosts
        ]
    }
