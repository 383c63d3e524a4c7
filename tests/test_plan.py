"""The plan is a pure function of an experiment and host limits; capacity fails early, clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.experiment import Experiment, load_experiment
from lab.limits import HostLimits, fast_ports_per_pair
from lab.plan import CapacityError, Role, make_plan, split_evenly

ROOT = Path(__file__).resolve().parent.parent
# This machine's kind: 20,000 open files (hard), 28,232 ephemeral ports, 24 GiB.
MACHINE = HostLimits(20000, 20000, 32768, 60999, 24 << 30)


def exp(name: str, **overrides: str) -> Experiment:
    return load_experiment(ROOT / "experiments" / f"{name}.yaml", overrides)


def limits(e: Experiment, lim: HostLimits = MACHINE) -> dict[str, HostLimits]:
    return {h.name: lim for h in e.hosts}


def argv_value(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_c64k_shards_under_this_machines_limits() -> None:
    e = exp("c64k")
    plan = make_plan(e, limits(e))
    assert [x.role for x in plan.launches] == [Role.MONITOR, Role.SERVER, Role.AGENT]
    (server,) = plan.stage(Role.SERVER)
    assert argv_value(server.argv, "--workers") == "4"  # 64,000 × 1.1 / 17,936 per worker
    assert argv_value(server.argv, "--max-connections") == "64000"
    assert server.health_url == "http://127.0.0.1:18080/healthz"
    (agent,) = plan.stage(Role.AGENT)
    assert argv_value(agent.argv, "--rate") == "2500"
    assert argv_value(agent.argv, "--connections") == "64000"
    assert argv_value(agent.argv, "--hold") == "60"
    procs = int(argv_value(agent.argv, "--procs"))
    ips = argv_value(agent.argv, "--source-ips").split(",")
    assert procs == 4 and len(ips) == 6 and ips[0] == "127.0.0.2"
    assert 64000 / procs <= MACHINE.conns_per_process
    assert 64000 / len(ips) <= fast_ports_per_pair(MACHINE)
    assert agent.stream_file == "agent-0.jsonl" and agent.fetch_globs == ("agent-0.rec*",)
    assert argv_value(agent.argv, "--url") == "ws://127.0.0.1:18080/ws?channel=idle"
    assert plan.max_duration_s == e.max_duration_s


def test_too_few_workers_names_the_limit_and_the_fix() -> None:
    e = exp("c64k", **{"server.workers": "2"})
    with pytest.raises(CapacityError) as info:
        make_plan(e, limits(e))
    assert "open files" in info.value.limit and "raise workers to 4" in info.value.fix


def test_too_few_agent_processes() -> None:
    e = exp("c64k", **{"agents.procs": "2"})
    with pytest.raises(CapacityError, match=r"raise agents.procs to 4"):
        make_plan(e, limits(e))


def test_too_few_source_addresses() -> None:
    e = exp("c64k", **{"agents.source_ips": "127.0.0.2"})
    with pytest.raises(CapacityError) as info:
        make_plan(e, limits(e))
    assert "ports" in info.value.limit
    # 12,704 fast ports per pair (45% of 28,232): 64,000 need 6 addresses
    assert "add source addresses 127.0.0.2-7" in info.value.fix


def test_memory_is_checked() -> None:
    e = exp("c64k")
    small = HostLimits(20000, 20000, 32768, 60999, 256 << 20)
    with pytest.raises(CapacityError) as info:
        make_plan(e, limits(e, small))
    assert info.value.limit == "memory"


def test_smoke_publishes_from_one_agent_only() -> None:
    e = exp("smoke")
    plan = make_plan(e, limits(e))
    (agent,) = plan.stage(Role.AGENT)
    assert argv_value(agent.argv, "--publish-url") == "http://127.0.0.1:18080/pub/news"
    assert argv_value(agent.argv, "--publish-count") == "20"
    assert "--source-ips" not in agent.argv  # 3,000 fit one address


def test_hosts_split_rate_and_connections_between_agent_hosts() -> None:
    wide = HostLimits(20000, 20000, 1024, 65535, 24 << 30)
    e = exp("c64k-hosts")
    plan = make_plan(e, limits(e, wide))
    assert [m.host for m in plan.stage(Role.MONITOR)] == ["srv", "a1", "a2"]
    (server,) = plan.stage(Role.SERVER)
    assert server.host == "srv" and argv_value(server.argv, "--host") == "0.0.0.0"
    agents = plan.stage(Role.AGENT)
    assert [a.host for a in agents] == ["a1", "a2"]
    assert [argv_value(a.argv, "--connections") for a in agents] == ["32000", "32000"]
    assert [argv_value(a.argv, "--rate") for a in agents] == ["1250", "1250"]
    assert all(argv_value(a.argv, "--url").startswith("ws://198.18.0.10:18080/") for a in agents)
    assert "--publish-url" not in agents[1].argv
    assert argv_value(agents[0].argv, "--source-ips") == "198.18.0.11,198.18.0.21"


def test_hosts_with_the_default_port_range_need_source_addresses() -> None:
    e = exp("c64k-hosts")  # two addresses per agent host: enough only with a wide range
    with pytest.raises(CapacityError) as info:
        make_plan(e, limits(e))
    assert info.value.host == "a1" and "at least 3" in info.value.fix
    assert "ip_local_port_range" in info.value.fix
    ok = exp("c64k-hosts", **{"agents.source_ips": "{a1: 198.18.0.2-4, a2: 198.18.0.5-7}"})
    agents = make_plan(ok, limits(ok)).stage(Role.AGENT)
    assert argv_value(agents[1].argv, "--source-ips") == "198.18.0.5,198.18.0.6,198.18.0.7"
    auto = exp("c64k-hosts", **{"agents.source_ips": "auto"})
    with pytest.raises(CapacityError, match="only loopback addresses can be chosen"):
        make_plan(auto, limits(auto))


def test_plan_is_deterministic() -> None:
    e = exp("c64k-broadcast")
    assert make_plan(e, limits(e)) == make_plan(e, limits(e))


def test_external_server() -> None:
    e = exp(
        "smoke",
        **{
            "server": "{kind: external, url: 'ws://127.0.0.1:9000/sub', command: 'nginx -p .', "
            "publish_url: 'http://127.0.0.1:9000/pub', match: nginx, health_url: "
            "'http://127.0.0.1:9000/'}",
        },
    )
    plan = make_plan(e, limits(e))
    (server,) = plan.stage(Role.SERVER)
    assert server.command == "nginx -p ." and server.argv == ()
    (monitor,) = plan.stage(Role.MONITOR)
    assert "server=nginx" in monitor.argv
    (agent,) = plan.stage(Role.AGENT)
    assert argv_value(agent.argv, "--url") == "ws://127.0.0.1:9000/sub"
    assert argv_value(agent.argv, "--publish-url") == "http://127.0.0.1:9000/pub"


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert sum(split_evenly(64001, 2)) == 64001


def test_several_phases_go_to_a_plan_file(tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    path.write_text(
        "name: multi\nhosts: [{name: s, address: 127.0.0.1}, {name: a}, {name: b}]\n"
        "session: {channel: c, subscribe_by: message}\n"
        "phases:\n  - {rate_per_s: 100, until_connections: 1000}\n"
        "  - {rate_per_s: 10, duration_s: 5}\n  - {hold_s: 2}\n  - {close_rate_per_s: 50}\n"
    )
    e = load_experiment(path)
    agents = make_plan(e, limits(e)).stage(Role.AGENT)
    assert [a.host for a in agents] == ["a", "b"]
    for a in agents:
        assert "--rate" not in a.argv and argv_value(a.argv, "--subscribe") == "c"
        assert argv_value(a.argv, "--url") == "ws://127.0.0.1:18080/ws"
        ((name, text),) = a.files
        assert argv_value(a.argv, "--plan") == name == f"{a.name}.plan.json"
        doc = json.loads(text)
        assert doc["phases"] == [
            {"kind": "ramp", "rate_per_s": 50.0, "until": 500},
            {"kind": "ramp", "rate_per_s": 5.0, "duration_s": 5},
            {"kind": "hold", "duration_s": 2},
            {"kind": "close", "rate_per_s": 25.0},
        ]


def test_publish_delay_and_token() -> None:
    e = exp("c64k-broadcast", **{"server.publish_token": "tok"})
    plan = make_plan(e, limits(e))
    (agent,) = plan.stage(Role.AGENT)
    assert argv_value(agent.argv, "--publish-delay") == "33"
    assert argv_value(agent.argv, "--publish-token") == "tok"
    (server,) = plan.stage(Role.SERVER)
    assert argv_value(server.argv, "--publish-token") == "tok"
    open_bind = exp("smoke", **{"server.host": "0.0.0.0"})
    with pytest.raises(CapacityError, match="publish_token"):
        make_plan(open_bind, limits(open_bind))


def test_agents_nice_reaches_the_agent_command() -> None:
    e = exp("smoke")
    (agent,) = make_plan(e, limits(e)).stage(Role.AGENT)
    assert "--nice" not in agent.argv
    e = exp("smoke", **{"agents.nice": "10"})
    (agent,) = make_plan(e, limits(e)).stage(Role.AGENT)
    assert argv_value(agent.argv, "--nice") == "10"


def test_start_delay_grows_with_agent_processes() -> None:
    small, big = exp("smoke"), exp("c64k")
    assert make_plan(small, limits(small)).start_delay_s == 3.0
    assert make_plan(big, limits(big)).start_delay_s == 4.0  # 4 agent processes
