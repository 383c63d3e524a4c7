"""Experiments load, validate once, and fail with the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.experiment import (
    LOCAL,
    ExperimentError,
    PhaseKind,
    ServerKind,
    SessionKind,
    Threshold,
    expand_addresses,
    load_experiment,
    load_inventory,
    parse_overrides,
)
from lab.inventory import inventory_to_dict

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
MINIMAL = "name: t\nphases:\n  - {rate_per_s: 10, until_connections: 20}\n"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, overrides: dict[str, str] | None = None) -> ExperimentError:
    with pytest.raises(ExperimentError) as info:
        load_experiment(write(tmp_path, text), overrides or {})
    return info.value


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if "inventory" not in p.name], ids=str)
def test_every_shipped_experiment_loads(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.name == path.stem
    assert exp.peak_connections > 0
    assert exp.max_duration_s > 0
    assert exp.to_dict()["name"] == exp.name


def test_inventory_netns_loads(tmp_path: Path) -> None:
    hosts = load_inventory(ROOT / "experiments" / "inventory-netns.yaml")
    assert [h.name for h in hosts] == ["srv", "a1", "a2"]
    assert all(h.address.startswith("198.18.") and not h.embedded for h in hosts)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(inventory_to_dict(hosts)))
    assert load_inventory(again) == hosts


def test_c64k_is_the_field_report_experiment() -> None:
    exp = load_experiment(ROOT / "experiments" / "c64k.yaml")
    assert exp.phases[0].rate_per_s == 2500 and exp.peak_connections == 64000
    assert exp.phases[1].hold_s == 60
    assert exp.hosts == (LOCAL,)
    assert {(t.name, t.op, t.value) for t in exp.thresholds} == {
        ("peak_connections", ">=", 64000),
        ("connect_errors", "==", 0),
        ("ramp_rate_min_per_s", ">=", 2450),
    }


def test_c64k_hosts_uses_the_netns_inventory() -> None:
    exp = load_experiment(ROOT / "experiments" / "c64k-hosts.yaml")
    assert exp.server_host == "srv" and exp.agent_hosts == ("a1", "a2")


def test_defaults_are_the_embedded_local_host_and_lab_comet(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, MINIMAL))
    assert exp.hosts == (LOCAL,) and LOCAL.embedded
    assert exp.server.kind is ServerKind.LAB_COMET and exp.server.workers is None
    assert exp.session.kind is SessionKind.WEBSOCKET
    assert exp.agent_hosts == ("local",)
    assert exp.phases[0].kind is PhaseKind.RAMP
    assert exp.max_duration_s >= 2


def test_overrides_set_dotted_keys_and_list_items(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    exp = load_experiment(
        path,
        parse_overrides(["phases.0.rate_per_s=100", "agents.procs=4", "session.channels=[a, b]"]),
    )
    assert exp.phases[0].rate_per_s == 100
    assert exp.agents.procs == 4
    assert exp.session.channels == ("a", "b")


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL, {"phases.3.rate_per_s": "1"})
    assert "-p phases.3.rate_per_s" in str(e) and "0..0" in str(e)
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        parse_overrides(["agents.procs"])


def test_a_bad_value_given_with_p_is_named_as_that_flag(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL, {"phases.0.rate_per_s": "abc"})
    assert str(e).startswith("-p phases.0.rate_per_s=abc: expected a number")
    e = error(tmp_path, MINIMAL, {"server.wokers": "2"})
    assert e.file == "-p server.wokers=2" and "did you mean `workers`" in e.fix
    # the fix in the flag's own form, not as a line of the file
    e = error(tmp_path, MINIMAL, {"server.workers": "abc"})
    assert e.fix == "give `-p server.workers=auto`", e.fix
    e = error(tmp_path, MINIMAL, {"max_duration_s": "abc"})
    assert e.fix == "give `-p max_duration_s=100`", e.fix
    e = error(tmp_path, MINIMAL, {"server": "{wokers: 2}"})  # deeper than the flag's key
    assert e.file == "-p server={wokers: 2}" and e.key == "server.wokers"
    # an error the flag did not cause still names the file
    e = error(tmp_path, MINIMAL + "server: {worker: 3}\n", {"agents.procs": "2"})
    assert e.file.endswith("exp.yaml") and e.key == "server.worker"


def test_workers_may_be_auto_and_the_fix_says_so(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL + "server: {workers: many}\n")
    assert "whole number or auto" in e.problem and "auto" in e.fix
    assert load_experiment(write(tmp_path, MINIMAL + "server: {workers: auto}\n")).server


def test_a_misspelled_required_key_is_named(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL.replace("phases:", "phase:"))
    assert e.key == "phases" and "`phase:`" in e.problem and "did you mean `phases:`" in e.fix


def test_a_directory_or_missing_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="is a directory, not an experiment file"):
        load_experiment(tmp_path)
    with pytest.raises(ExperimentError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL + "server: {worker: 3}\n")
    assert e.file.endswith("exp.yaml") and e.key == "server.worker"
    assert "workers" in e.fix
    e = error(tmp_path, MINIMAL.replace("rate_per_s", "rate_per_sec"))
    assert e.key == "phases.0.rate_per_sec" and "rate_per_s" in e.fix
    e = error(tmp_path, MINIMAL + "treshholds: []\n")
    assert "thresholds" in e.fix


def test_types_and_ranges_are_checked(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL, {"phases.0.rate_per_s": "fast"})
    assert e.key == "phases.0.rate_per_s" and "number" in e.problem
    e = error(tmp_path, MINIMAL, {"server.port": "70000"})
    assert e.key == "server.port" and "65535" in e.fix
    e = error(tmp_path, MINIMAL, {"agents.procs": "0"})
    assert e.key == "agents.procs"
    e = error(tmp_path, MINIMAL, {"session.kind": "websockets"})
    assert "did you mean 'websocket'" in e.fix
    e = error(tmp_path, MINIMAL, {"phases.0.until_connections": "2.5"})
    assert "whole number" in e.problem
    e = error(tmp_path, MINIMAL, {"agents.nice": "25"})
    assert e.key == "agents.nice" and "<= 19" in e.fix


def test_phase_shapes(tmp_path: Path) -> None:
    text = (
        "phases:\n  - {rate_per_s: 10, until_connections: 20}\n  - {rate_per_s: 5, duration_s: 2}\n"
        "  - {hold_s: 3}\n  - {close_rate_per_s: 10}\n"
    )
    exp = load_experiment(write(tmp_path, text))
    assert [p.kind for p in exp.phases] == [
        PhaseKind.RAMP,
        PhaseKind.RATE,
        PhaseKind.HOLD,
        PhaseKind.CLOSE,
    ]
    assert exp.peak_connections == 30
    e = error(tmp_path, "phases:\n  - {rate_per_s: 10, hold_s: 3}\n")
    assert e.key == "phases.0" and "{hold_s}" in e.fix
    e = error(tmp_path, "phases:\n  - {hold_s: 3}\n")
    assert "no phase opens connections" in e.problem
    e = error(tmp_path, "phases:\n  - {close: some}\n")
    assert e.key == "phases.0.close"
    e = error(tmp_path, "name: t\n")
    assert e.key == "phases" and "is required" in e.problem


def test_max_duration_must_cover_the_phases(tmp_path: Path) -> None:
    e = error(tmp_path, MINIMAL + "max_duration_s: 1\n")
    assert e.key == "max_duration_s" and "raise it" in e.fix


def test_thresholds_and_publishing(tmp_path: Path) -> None:
    text = MINIMAL + (
        "session: {channel: news}\n"
        "publishing: {rate_per_s: 2, count: 4}\n"
        "thresholds:\n  - {metric: messages_lost, op: '==', value: 0}\n"
        "  - delivery_ms_max <= 600\n"
    )
    exp = load_experiment(write(tmp_path, text))
    assert exp.publishing is not None and exp.publishing.channel == "news"
    assert exp.thresholds == (
        Threshold("messages_lost", "==", 0),
        Threshold("delivery_ms_max", "<=", 600),
    )
    assert exp.thresholds[1].holds(599.0) and not exp.thresholds[1].holds(None)
    e = error(tmp_path, MINIMAL + "thresholds: [{metric: peak_conections, op: '>=', value: 1}]\n")
    assert "peak_connections" in e.fix
    e = error(tmp_path, MINIMAL + "thresholds: [{metric: peak_connections, op: '=>', value: 1}]\n")
    assert e.key == "thresholds.0.op"
    e = error(tmp_path, MINIMAL + "publishing: {rate_per_s: 2, count: 4}\n")
    assert e.key == "publishing.channel"


def test_hosts_inline_file_and_inventory_replacement(tmp_path: Path) -> None:
    inv = write(tmp_path, "hosts:\n  - {name: s, address: 198.18.0.1}\n  - {name: a}\n", "inv.yaml")
    exp = load_experiment(write(tmp_path, MINIMAL + "hosts: inv.yaml\n"))
    assert [h.name for h in exp.hosts] == ["s", "a"] and exp.agent_hosts == ("a",)
    exp = load_experiment(write(tmp_path, MINIMAL), inventory=inv)
    assert exp.server_host == "s"
    e = error(tmp_path, MINIMAL + "hosts: [{name: x, password: hunter2}]\n")
    assert "secrets" in e.problem
    e = error(tmp_path, MINIMAL + "hosts: missing.yaml\n")
    assert "not found" in e.problem and "missing.yaml" in e.file
    e = error(tmp_path, MINIMAL + "server: {on: x}\n")
    assert "on_host" in e.fix
    # the embedded server is this machine: it cannot stand for a host at another address
    e = error(tmp_path, MINIMAL + "hosts: [{name: far, address: 198.18.0.9, embedded: true}]\n")
    assert e.key == "hosts.0.embedded" and "198.18.0.9" in e.problem and "drop" in e.fix
    exp = load_experiment(
        write(tmp_path, MINIMAL + "hosts: [{name: me, address: 127.0.0.1, embedded: true}]\n")
    )
    assert exp.hosts[0].embedded


def test_source_ip_ranges() -> None:
    assert expand_addresses("127.0.0.2-4") == ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert expand_addresses("127.0.0.9-127.0.0.10,10.0.0.1") == (
        "127.0.0.9",
        "127.0.0.10",
        "10.0.0.1",
    )
    with pytest.raises(ExperimentError, match=r"127\.0\.0\.2-9"):
        expand_addresses("127.0.0.x")


def test_to_dict_masks_the_publish_token(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, MINIMAL + "server: {publish_token: s3cret}\n"))
    assert exp.server.publish_token == "s3cret"
    assert "s3cret" not in str(exp.to_dict())


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    e = error(tmp_path, "phases: [\n")
    assert e.file.endswith("exp.yaml") and "YAML" in e.problem


def test_template_documents_every_key() -> None:
    import dataclasses

    import yaml

    from lab.experiment import TOP_KEYS, HostSpec, ServerSpec

    text = (ROOT / "experiments" / "template.yaml").read_text()
    data = yaml.safe_load(text)
    assert set(data) == set(TOP_KEYS)
    assert set(data["server"]) == {f.name for f in dataclasses.fields(ServerSpec)}
    for f in dataclasses.fields(HostSpec):
        assert f"{f.name}:" in text, f.name
    for key in ("until_connections", "duration_s", "hold_s", "close_rate_per_s", "close: all"):
        assert key in text
