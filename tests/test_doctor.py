"""Preflight findings from host facts (pure), and `lab doctor` run for real on this host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lab.doctor import Level, check_host, check_plan, limits_from_facts
from lab.experiment import load_experiment
from lab.metadata import collect_host_metadata

ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "python": "3.11.7",
    "nofile_soft": 1024,
    "nofile_hard": 20000,
    "sysctls": {
        "net.ipv4.ip_local_port_range": [32768, 60999],
        "net.core.somaxconn": 4096,
        "net.ipv4.tcp_max_syn_backlog": 2048,
    },
    "mem_available_bytes": 20 << 30,
    "tcp_time_wait": 12,
    "clock_offset_s": 0.002,
}


def levels(findings: list) -> dict[str, Level]:
    return {f.check: f.level for f in findings}


def test_good_host_passes() -> None:
    found = levels(check_host(GOOD, host="h"))
    assert set(found.values()) == {Level.OK}
    assert set(found) >= {
        "python",
        "open files (nofile)",
        "ip_local_port_range",
        "somaxconn",
        "tcp_max_syn_backlog",
        "free memory",
        "TIME_WAIT sockets",
        "clock offset",
    }


def test_bad_host_names_problems_and_fixes() -> None:
    bad = {
        **GOOD,
        "python": "3.9.2",
        "nofile_hard": 1024,
        "sysctls": {
            "net.ipv4.ip_local_port_range": [60000, 61000],
            "net.core.somaxconn": 128,
            "net.ipv4.tcp_max_syn_backlog": 128,
        },
        "mem_available_bytes": 100 << 20,
        "tcp_time_wait": 60_000,
        "clock_offset_s": -3.0,
    }
    findings = {f.check: f for f in check_host(bad, host="h")}
    assert findings["python"].level is Level.FAIL
    assert findings["open files (nofile)"].level is Level.FAIL
    assert "1024 65535" in findings["ip_local_port_range"].fix
    assert "net.core.somaxconn" in findings["somaxconn"].fix
    assert findings["clock offset"].level is Level.WARN and "NTP" in findings["clock offset"].fix
    assert findings["free memory"].level is Level.WARN
    tw = findings["TIME_WAIT sockets"]
    assert tw.level is Level.WARN and "earlier run" in tw.message and "60 s" in tw.fix
    assert check_host({"error": "connection refused"}, host="x")[0].level is Level.FAIL


def test_limits_from_facts_handles_unlimited() -> None:
    lim = limits_from_facts({**GOOD, "nofile_hard": None, "nofile_soft": None})
    assert lim.nofile_hard >= 1 << 20 and lim.ephemeral_ports == 28232


def test_check_plan_reports_capacity() -> None:
    exp = load_experiment(ROOT / "experiments" / "c64k.yaml")
    ok = check_plan(exp, {"local": GOOD})
    assert all(f.level is Level.OK for f in ok) and any("lab.comet" in f.value for f in ok)
    exp2 = load_experiment(ROOT / "experiments" / "c64k.yaml", {"server.workers": "2"})
    (fail,) = check_plan(exp2, {"local": GOOD})
    assert fail.level is Level.FAIL and "raise workers to 4" in fail.fix


def test_source_addresses_are_checked_against_the_hosts_own() -> None:
    facts = {
        **GOOD,
        "cpu_count": 2,
        "addresses": [["127.0.0.1", 8, "lo"], ["198.18.0.2", 24, "veth0"]],
    }
    smoke = ROOT / "experiments" / "smoke.yaml"

    def plan_levels(ips: str) -> list[tuple[str, Level, str]]:
        exp = load_experiment(smoke, {"agents.source_ips": ips})
        return [(f.check, f.level, f.value) for f in check_plan(exp, {"local": facts})]

    # all of 127/8 is local on lo; on another interface only its own address is
    assert ("source address", Level.FAIL, "10.9.9.9") in plan_levels("10.9.9.9")
    assert ("source address", Level.FAIL, "198.18.0.3") in plan_levels("198.18.0.3")
    for ok in ("127.0.0.9", "198.18.0.2"):
        exp = load_experiment(smoke, {"agents.source_ips": ok})
        assert all(f.level is Level.OK for f in check_plan(exp, {"local": facts})), ok
    # the kernel lets any address be bound with ip_nonlocal_bind
    nonlocal_bind = {**facts, "sysctls": {**GOOD["sysctls"], "net.ipv4.ip_nonlocal_bind": 1}}
    exp = load_experiment(smoke, {"agents.source_ips": "10.9.9.9"})
    assert all(f.level is Level.OK for f in check_plan(exp, {"local": nonlocal_bind}))


def test_a_rate_past_what_the_cores_drive_is_a_warning() -> None:
    facts = {**GOOD, "cpu_count": 2, "addresses": [["127.0.0.1", 8, "lo"]]}
    exp = load_experiment(ROOT / "experiments" / "smoke.yaml", {"phases.0.rate_per_s": "100000"})
    (warn,) = [f for f in check_plan(exp, {"local": facts}) if f.level is not Level.OK]
    assert warn.check == "agent rate" and warn.level is Level.WARN
    assert warn.value == "100,000/s on 2 core(s)" and "more agent hosts" in warn.fix
    c64k = load_experiment(ROOT / "experiments" / "c64k.yaml")  # 2,500/s: fine on 2 cores
    assert all(f.level is Level.OK for f in check_plan(c64k, {"local": facts}))


def test_real_metadata_feeds_check_host() -> None:
    findings = check_host({**collect_host_metadata(), "clock_offset_s": 0.0}, host="local")
    assert all(f.level is not Level.FAIL for f in findings), findings


def test_lab_doctor_on_this_host() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lab", "doctor", str(ROOT / "experiments" / "smoke.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lab.comet" in done.stdout and "0 failures" in done.stdout
    # the embedded default host gets the TIME_WAIT check too (its facts are read directly)
    assert "TIME_WAIT sockets" in done.stdout, done.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab.doctor",
            str(ROOT / "experiments" / "c64k.yaml"),
            "-p",
            "agents.procs=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "raise agents.procs to 4" in bad.stdout
    typo = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab.doctor",
            str(ROOT / "experiments" / "smoke.yaml"),
            "-p",
            "agents.prcs=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert typo.returncode == 2 and "did you mean `procs`" in typo.stderr


def test_a_host_whose_python_does_not_run_is_named_so() -> None:
    error = (
        "a1: python '/opt/py3.11/bin/python3' did not run there (not found) — fix: set "
        "`python:` of host 'a1' to a Python >= 3.11 on it"
    )
    (finding,) = check_host({"error": error}, host="a1")
    assert finding.check == "python" and finding.level is Level.FAIL
    assert "set `python:`" in finding.message and finding.fix == ""
    (unreached,) = check_host({"error": "cannot connect to host 'a1'"}, host="a1")
    assert unreached.check == "reachable" and "address" in unreached.fix


def test_an_agent_host_without_a_c_compiler_is_warned() -> None:
    facts = {**GOOD, "cpu_count": 2, "addresses": [["127.0.0.1", 8, "lo"]], "c_compiler": None}
    exp = load_experiment(ROOT / "experiments" / "c64k.yaml")
    (warn,) = [f for f in check_plan(exp, {"local": facts}) if f.level is not Level.OK]
    assert (warn.check, warn.level, warn.value) == ("C compiler", Level.WARN, "none")
    assert "agent's connections take its Python path" in warn.message
    assert "server's broadcasts take its Python loop" in warn.message  # one host, both roles
    assert "apt-get install gcc" in warn.fix
    with_cc = {**facts, "c_compiler": "/usr/bin/cc"}
    assert all(f.level is Level.OK for f in check_plan(exp, {"local": with_cc}))
    # the facts of this host name its compiler
    assert collect_host_metadata()["c_compiler"]
