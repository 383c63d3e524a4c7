"""How a planned role becomes a process group on its host, and how a run's processes stop.

``role_command`` turns a ``lab.plan.RoleLaunch`` into the shell command the controller runs over
SSH: ``setsid`` gives the role its own process group (its id is printed first as ``@pgid N`` and
left in ``<name>.pgid``), stderr goes to ``<name>.stderr.log`` in the run dir, and
``COMET_LAB_RUN_ID`` marks every process of the run (``COMET_LAB_HOST`` the inventory host it
was started for). ``STOP_SCRIPT`` (run with the host's bare python: ``RUN_ID HOST GRACE_S
sweep|nosweep PGID...``) sends SIGTERM to the groups, SIGKILL after the grace period, and with
``sweep`` finds any process still carrying both markers, kills it and reports what was left
(the host marker keeps hosts that share a kernel, as network-namespace hosts do, from sweeping
each other's roles). Used by ``lab.engine``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.plan import RoleLaunch

MODULES = {"monitor": "lab.monitor", "server": "lab.comet", "agent": "lab.agent"}
SECRET_FLAGS = ("--publish-token",)


SECRET_WORDS = ("token", "password", "passphrase", "secret")


def is_secret_key(key: str) -> bool:
    """True for an experiment key that holds a secret (``server.publish_token``)."""
    return any(word in key.lower() for word in SECRET_WORDS)


def mask_secrets(argv: Sequence[str]) -> list[str]:
    """argv with secret values replaced by ``***`` (for run.json and logs): the value after a
    secret flag, and ``KEY=VALUE`` overrides whose key names a secret."""
    out = list(argv)
    for i, arg in enumerate(out):
        if i > 0 and out[i - 1] in SECRET_FLAGS:
            out[i] = "***"
        elif "=" in arg and is_secret_key(arg.split("=", 1)[0]):
            out[i] = arg.split("=", 1)[0] + "=***"
    return out


def mask_overrides(overrides: Mapping[str, str]) -> dict[str, str]:
    """``-p`` overrides with the values of secret keys replaced by ``***``."""
    return {k: ("***" if is_secret_key(k) else v) for k, v in overrides.items()}


def role_command(
    launch: RoleLaunch, python: str, rundir: str, run_id: str, extra: Sequence[str] = ()
) -> str:
    """The shell command that starts one role in its own process group (``setsid``).

    The group leader prints ``@pgid N`` first and leaves ``<name>.pgid`` in the run dir; stderr
    goes to ``<name>.stderr.log``; ``COMET_LAB_RUN_ID`` marks every process of the run and
    ``COMET_LAB_HOST`` the host it runs for.
    """
    q = shlex.quote
    log = q(f"{launch.name}.stderr.log")
    if launch.command:
        inner = f"exec sh -c {q(launch.command)} 2>> {log}"
    else:
        args = " ".join(q(a) for a in (*launch.argv, *extra))
        inner = f"exec {q(python)} -m {MODULES[launch.role.value]} {args} 2>> {log}"
    wrapper = f'echo $$ > {q(launch.name + ".pgid")}; echo "@pgid $$"; {inner}'
    return (
        f"cd {q(rundir)} && COMET_LAB_RUN_ID={q(run_id)} COMET_LAB_HOST={q(launch.host)} "
        "PYTHONUNBUFFERED=1 "
        f"exec setsid -w sh -c {q(wrapper)}"
    )


# Runs on a host with its bare python: TERM the groups, wait, KILL what is left, then look for
# any process of this run on this host (COMET_LAB_RUN_ID and COMET_LAB_HOST in its environment)
# and KILL it too.
STOP_SCRIPT = r"""
import json, os, re, signal, sys, time
run_id, host = sys.argv[1], sys.argv[2]
grace, sweep = float(sys.argv[3]), sys.argv[4] == "sweep"
pgids = [int(g) for g in sys.argv[5:]]
marker = ("COMET_LAB_RUN_ID=" + run_id).encode()
host_marker = ("COMET_LAB_HOST=" + host).encode()
role = re.compile(rb"lab\.(comet|agent|monitor)")
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
def ours():
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            env = open("/proc/%s/environ" % p, "rb").read().split(b"\0")
            cmd = open("/proc/%s/cmdline" % p, "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in env and host_marker in env:
            found.append({"pid": int(p), "role": bool(role.search(cmd)),
                          "cmd": cmd.decode("utf-8", "replace")[:200]})
    return found
signalled = []
for g in pgids:
    try:
        os.killpg(g, signal.SIGTERM)
        signalled.append(g)
    except (ProcessLookupError, PermissionError):
        pass
deadline = time.time() + grace
while time.time() < deadline and any(alive(g) for g in pgids):
    time.sleep(0.1)
killed = []
for g in pgids:
    if alive(g):
        killed.append(g)
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
strays = ours() if sweep else []
for p in strays:
    try:
        os.kill(p["pid"], signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
time.sleep(0.2 if strays else 0)
left = ours() if sweep else []
print(json.dumps({"terminated": signalled, "killed": killed, "strays": strays, "left": left}))
"""

HEALTH_SCRIPT = r"""
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
last = ""
while time.time() < deadline:
    try:
        with opener.open(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
            last = "HTTP %d" % r.status
    except Exception as exc:
        last = str(exc)
    time.sleep(0.1)
print(last, file=sys.stderr)
sys.exit(1)
"""

# exit 0: something answers 200 at the URL (a server); 3: something accepts TCP connections
# at its host and port but does not answer so (another program); 1: nothing listens there
PORT_SCRIPT = r"""
import socket, sys, urllib.parse, urllib.request
url = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=float(sys.argv[2])) as r:
        sys.exit(0 if r.status == 200 else 3)
except Exception:
    pass
u = urllib.parse.urlsplit(url)
try:
    socket.create_connection((u.hostname, u.port or 80), timeout=float(sys.argv[2])).close()
except OSError:
    sys.exit(1)
sys.exit(3)
"""

LIMITS_SCRIPT = (
    "import dataclasses, json, lab.limits as l; "
    "print(json.dumps(dataclasses.asdict(l.read_host_limits())))"
)
