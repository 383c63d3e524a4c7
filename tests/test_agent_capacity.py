"""lab.agent.capacity: the checks before any connection, and their messages."""

from __future__ import annotations

import pytest

from lab.agent.capacity import (
    CapacityError,
    Demand,
    auto_procs,
    check_capacity,
    check_source_ips,
    parse_source_ips,
)
from lab.limits import HostLimits, source_addresses_for

HOST = HostLimits(
    nofile_soft=1024,
    nofile_hard=20_000,
    port_low=32768,
    port_high=60999,
    mem_available_bytes=24 << 30,
)


def test_a_plan_that_fits_passes() -> None:
    assert check_capacity(Demand(15_000, 2500, 1, 2, 1), HOST) == []


def test_past_half_the_port_range_warns_that_connects_slow_down() -> None:
    (w,) = check_capacity(Demand(15_000, 2500, 1, 1, 1), HOST)
    assert "12704 that connect() serves fast" in w and "127.0.0.2-127.0.0.3" in w
    assert source_addresses_for(15_000, HOST) == 2
    assert source_addresses_for(64_000, HOST) == 6
    assert source_addresses_for(1, HOST) == 1


def test_files_message_names_the_limit_and_the_process_count() -> None:
    with pytest.raises(CapacityError) as e:
        check_capacity(Demand(64_000, 2500, 1, 3, 1), HOST)
    msg = str(e.value)
    assert "open-file hard limit (20000)" in msg
    assert "use --procs 4" in msg
    assert "ports" not in msg


def test_ports_message_names_the_addresses_to_add() -> None:
    with pytest.raises(CapacityError) as e:
        check_capacity(Demand(64_000, 2500, 4, 1, 1), HOST)
    msg = str(e.value)
    assert "ephemeral ports" in msg and "32768-60999" in msg
    assert "add source addresses 127.0.0.2-127.0.0.4" in msg
    check_capacity(Demand(64_000, 2500, 4, 6, 1), HOST)  # six addresses fit, fast
    check_capacity(Demand(64_000, 2500, 4, 1, 6), HOST)  # or six destinations


def test_memory_message() -> None:
    small = HostLimits(1024, 20_000, 32768, 60999, mem_available_bytes=128 << 20)
    with pytest.raises(CapacityError, match=r"memory: .* lower --connections or spread"):
        check_capacity(Demand(15_000, 2500, 1, 1, 1), small)


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(CapacityError) as e:
        check_capacity(Demand(200_000, 2500, 1, 1, 1), HOST)
    assert "files:" in str(e.value) and "ports:" in str(e.value)


def test_rate_warning() -> None:
    (w,) = check_capacity(Demand(1000, 20_000, 1, 1, 1), HOST)
    assert w.startswith("rate: 20000 new connections/s per process")
    assert "watch the schedule lag" in w and "--procs" in w
    assert check_capacity(Demand(1000, 9000, 1, 1, 1), HOST) == []
    # 4 processes opening in turn (1 lane) each open at the whole rate; side by side, a quarter
    (w,) = check_capacity(Demand(1000, 20_000, 4, 1, 1, lanes=1), HOST)
    assert w.startswith("rate: 20000 new connections/s per process")
    assert check_capacity(Demand(1000, 20_000, 4, 1, 1, lanes=4), HOST) == []


def test_rate_warning_for_a_ramp_shorter_than_a_second() -> None:
    """1,000 connections at 30,000/s open within one second, yet ask 30,000/s of the process:
    the warning follows the phase's rate, not the count of a whole second."""
    from lab.agent.coordinator import build_parser, prepare

    args = build_parser().parse_args(
        ["--url", "ws://127.0.0.1:9/ws", "--rate", "30000", "--connections", "1000",
         "--procs", "1", "--hold", "1"]
    )  # fmt: skip
    warnings = prepare(args)[3]
    assert any(w.startswith("rate: 30000 new connections/s per process") for w in warnings)
    args.procs = "4"
    assert not any(w.startswith("rate:") for w in prepare(args)[3])  # 7,500/s each


def test_auto_procs() -> None:
    assert auto_procs(15_000, 2500, HOST, cpus=2) == 1
    assert auto_procs(64_000, 2500, HOST, cpus=2) == 4
    assert auto_procs(1000, 12_000, HOST, cpus=2) == 2
    assert auto_procs(1000, 12_000, HOST, cpus=1) == 1


def test_parse_source_ips() -> None:
    assert parse_source_ips("auto", needed=1, loopback=True) == ["127.0.0.2"]
    assert parse_source_ips("auto", needed=3, loopback=True) == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ]
    assert parse_source_ips("auto", needed=3, loopback=False) == [None]
    assert parse_source_ips("127.0.0.2-127.0.0.4,10.0.0.1", needed=1, loopback=True) == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "10.0.0.1",
    ]
    with pytest.raises(ValueError, match="give auto, a list"):
        parse_source_ips("127.0.0.9-127.0.0.2", needed=1, loopback=True)
    with pytest.raises(ValueError, match="give auto, a list"):
        parse_source_ips("not-an-ip", needed=1, loopback=True)


def test_source_address_not_on_this_host() -> None:
    check_source_ips([None, "127.0.0.2"])
    with pytest.raises(CapacityError, match=r"198.18.255.254 .*ip addr add 198.18.255.254/32"):
        check_source_ips(["198.18.255.254"])
