"""Unit tests of the comet application protocol (sans-I/O), the control-link framing, the
console figures and the command line: no sockets."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from lab.comet.config import ConfigError, build_parser, is_loopback, resolve
from lab.comet.console import console_text, server_line, worker_figures
from lab.comet.ipc import Decoder, IpcError, encode
from lab.comet.protocol import (
    Action,
    BadFrame,
    ChannelHistory,
    Command,
    HttpError,
    Hub,
    Message,
    Outgoing,
    Route,
    Sequencer,
    SseCursor,
    Target,
    http_response,
    lp_body,
    parse_command,
    parse_target,
    ws_close_frame,
)
from lab.limits import HostLimits


def parse_frame(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    gen = Frame.parse(reader.read_exact, mask=False)
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("incomplete frame")


def test_sequencer_ids_increase_by_one_per_channel() -> None:
    seq = Sequencer(history_limit=3)
    ids = [seq.sequence("a", str(i)).id for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert seq.sequence("b", "x").id == 1
    assert seq.published == 6
    assert [m.id for m in seq.replay()] == [3, 4, 5, 1]
    assert seq.last_ids() == {"a": 5, "b": 1}


def test_history_after_returns_what_it_still_holds() -> None:
    h = ChannelHistory(limit=3)
    for i in range(1, 6):
        h.append(Message("a", i, f"d{i}"))
    assert [m.id for m in h.after(0)] == [3, 4, 5]
    assert [m.id for m in h.after(3)] == [4, 5]
    assert h.after(5) == []
    assert h.after(99) == []


def test_hub_subscriptions_and_catch_up() -> None:
    hub: Hub[str] = Hub(history_limit=10)
    hub.subscribe("s1", "a")
    hub.subscribe("s2", "a")
    hub.subscribe("s2", "b")
    assert sorted(hub.record(Message("a", 1, "x"))) == ["s1", "s2"]
    hub.unsubscribe("s1", "a")
    assert hub.record(Message("a", 2, "y")) == ["s2"]
    hub.unsubscribe("s2", "a")
    assert "a" not in hub.subscriptions
    assert hub.record(Message("a", 3, "z")) == []
    assert [m.id for m in hub.catch_up(Target(Route.LP, ("a",), 1))] == [2, 3]
    assert hub.catch_up(Target(Route.LP, ("a",), None)) == []
    assert hub.last_id("a") == 3 and hub.last_id("nope") == 0


def test_catch_up_over_several_channels_starts_each_at_its_own_id() -> None:
    hub: Hub[str] = Hub(history_limit=10)
    for i in range(1, 6):
        hub.record(Message("mx", i, f"x{i}"))
    hub.record(Message("my", 1, "y1"))
    hub.record(Message("my", 2, "y2"))
    # the client saw mx up to 5 and my up to 1: it must get my 2, and nothing of mx again
    t = parse_target(
        "GET", "/lp?" + urlencode({"channel": ["mx", "my"], "since": '{"mx":5,"my":1}'}, doseq=True)
    )
    assert [(m.channel, m.id) for m in hub.catch_up(t)] == [("my", 2)]
    # a channel left out of the object gets only what comes next
    t = parse_target("GET", "/sse?channel=mx&channel=my", last_event_id='{"mx":3}')
    assert [(m.channel, m.id) for m in hub.catch_up(t)] == [("mx", 4), ("mx", 5)]
    # 0 is everything the history holds, on every channel
    t = parse_target("GET", "/lp?channel=mx&channel=my&since=0")
    assert len(hub.catch_up(t)) == 7


def test_a_single_id_for_several_channels_is_refused_naming_the_fix() -> None:
    with pytest.raises(HttpError) as info:
        parse_target("GET", "/sse?channel=mx&channel=my", last_event_id="5")
    assert info.value.status == 400 and "ids are per channel" in info.value.message
    assert '{"mx": 5, "my": 0}' in info.value.message
    # a channel the request does not name (a typo) is refused, not silently not caught up
    for bad in ('{"mx": -1}', '{"mx": "5"}', "[5]", "{nope", '{"mz": 3}'):
        with pytest.raises(HttpError) as info:
            parse_target("GET", "/lp?" + urlencode({"channel": "mx", "since": bad}))
        assert info.value.status == 400, bad


def test_sse_event_ids_of_a_multi_channel_stream_are_its_position_on_each_channel() -> None:
    cursor = SseCursor({"mx": 5, "mé": 0})
    event = cursor.event(Outgoing(Message("mé", 1, "d")))
    raw_head, raw_data = event.split(b"\n")[:2]
    head, data = raw_head.decode("ascii"), raw_data.decode("utf-8")
    assert cursor.ids == {"mx": 5, "mé": 1}
    # the id is ASCII JSON (a browser sends it back as Last-Event-ID, a latin-1 header)
    assert json.loads(head.removeprefix("id: ")) == {"mx": 5, "mé": 1}
    assert json.loads(data.removeprefix("data: "))["id"] == 1
    # and it resumes a stream exactly there
    t = parse_target("GET", "/sse?channel=mx&channel=m%C3%A9", last_event_id=head[4:])
    assert (t.since_of("mx"), t.since_of("mé")) == (5, 1)


def test_outgoing_encodes_envelope_once_for_each_transport() -> None:
    out = Outgoing(Message("chan", 42, 'hé "quoted"\nline'))
    envelope = json.loads(out.json)
    assert envelope == {"channel": "chan", "id": 42, "data": 'hé "quoted"\nline'}
    assert out.ws_frame is out.ws_frame
    frame = parse_frame(out.ws_frame)
    assert frame.opcode is Opcode.TEXT and json.loads(bytes(frame.data)) == envelope
    sse = out.sse_event.decode()
    assert sse.startswith("id: 42\ndata: ") and sse.endswith("\n\n")
    assert sse.count("\n") == 3  # the envelope JSON has no raw newline
    assert json.loads(lp_body([out.message])) == [envelope]


def test_close_frame_carries_code_and_reason() -> None:
    frame = parse_frame(ws_close_frame(1001, "bye"))
    assert frame.opcode is Opcode.CLOSE
    assert Close.parse(frame.data) == Close(1001, "bye")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"subscribe": "c"}', Command(Action.SUBSCRIBE, "c")),
        ('{"unsubscribe": "c d"}', Command(Action.UNSUBSCRIBE, "c d")),
    ],
)
def test_parse_command(text: str, expected: Command) -> None:
    assert parse_command(text) == expected


def test_command_replies() -> None:
    assert json.loads(Command(Action.SUBSCRIBE, "c").reply()) == {"subscribed": "c"}
    assert json.loads(Command(Action.UNSUBSCRIBE, "c").reply()) == {"unsubscribed": "c"}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", 1003),
        ("[1, 2]", 1008),
        ('{"subscribe": "a", "x": 1}', 1008),
        ('{"jump": "a"}', 1008),
        ('{"subscribe": 5}', 1008),
        ('{"subscribe": ""}', 1008),
    ],
)
def test_parse_command_rejects(text: str, code: int) -> None:
    with pytest.raises(BadFrame) as info:
        parse_command(text)
    assert info.value.code == code and info.value.reason


def test_parse_target_routes() -> None:
    t = parse_target("GET", "/ws?channel=a&channel=b&channel=a")
    assert t.route is Route.WS and t.channels == ("a", "b")
    t = parse_target("GET", "/lp?channel=a&since=7&timeout=1.5")
    assert (t.route, t.channels, t.since, t.timeout_s) == (Route.LP, ("a",), 7, 1.5)
    assert parse_target("GET", "/lp?channel=a").since is None
    assert parse_target("GET", "/sse?channel=a", last_event_id="9").since == 9
    assert parse_target("GET", "/sse?channel=a&lastEventId=3").since == 3
    assert parse_target("GET", "/sse?channel=a&since=4").since == 4
    assert parse_target("HEAD", "/healthz").route is Route.HEALTHZ
    assert parse_target("HEAD", "/stats").route is Route.STATS
    t = parse_target("POST", "/pub/room%201")
    assert t.route is Route.PUB and t.channels == ("room 1",)
    assert parse_target("GET", "/stats").route is Route.STATS
    assert parse_target("GET", "/healthz").route is Route.HEALTHZ


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/", 404),
        ("POST", "/ws", 405),
        ("GET", "/pub/a", 405),
        ("GET", "/lp", 400),
        ("GET", "/lp?channel=a&since=x", 400),
        ("GET", "/lp?channel=a&since=-1", 400),
        ("GET", "/lp?channel=a&timeout=abc", 400),
        ("GET", "/lp?channel=a&timeout=-1", 400),
        ("POST", "/pub/", 400),
        ("GET", "/sse", 400),
        ("GET", "/ws?channel=" + "x" * 300, 400),
        ("GET", "/lp?channel=a&timeout=nan", 400),
        ("POST", "/pub/a%FF", 400),  # not UTF-8 once decoded: never folded into U+FFFD
        ("GET", "/lp?channel=a%FE", 400),
        ("HEAD", "/lp?channel=a", 405),
    ],
)
def test_parse_target_errors(method: str, url: str, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_target(method, url)
    assert info.value.status == status and info.value.message
    if status == 405:  # RFC 9110: a 405 says what the path takes
        assert dict(info.value.extra)["Allow"] in ("GET", "POST", "GET, HEAD")


def test_http_response_framing() -> None:
    r = http_response(200, b"{}", keep_alive=True)
    head, body = r.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 2" in head
    assert b"Connection: keep-alive" in head and body == b"{}"
    assert b"Content-Length" not in http_response(204)
    # the answer to HEAD: the same head, no body
    head_only = http_response(200, b"{}", keep_alive=True, head=True)
    assert head_only == head + b"\r\n\r\n"


def test_ipc_decoder_handles_split_and_joined_messages() -> None:
    data = encode({"op": "a", "x": "é" * 10}) + encode({"op": "b"})
    dec = Decoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
    assert [m["op"] for m in got] == ["a", "b"] and got[0]["x"] == "é" * 10
    assert [m["op"] for m in Decoder().feed(data)] == ["a", "b"]
    with pytest.raises(IpcError):
        Decoder().feed(b"\x00\x00\x00\x02[]")


def test_console_figures() -> None:
    w0 = worker_figures(
        0,
        11,
        {"online": 3, "events": 9, "connects": 4, "messages": 3, "closes": 2, "pcs": 5},
        restarts=1,
    )
    w1 = worker_figures(1, 12, None, restarts=0)
    line = server_line(100.0, 42.7, [w0, w1], published=7, channels=2)
    assert line["kind"] == "server" and line["online"] == 3 and line["uptime_s"] == 42
    assert line["workers"][1]["events"] == 0
    text = console_text(line)
    assert "online" in text and "w0 pid 11" in text and "PcS 5" in text and "restarts 1" in text


LIMITS = HostLimits(
    nofile_soft=20000,
    nofile_hard=20000,
    port_low=32768,
    port_high=60999,
    mem_available_bytes=1 << 34,
)


def test_resolve_workers_auto_and_token() -> None:
    p = build_parser()
    cfg = resolve(p.parse_args(["--max-connections", "64000"]), LIMITS)
    assert cfg.workers >= 4 and cfg.publish_token is None
    cfg = resolve(p.parse_args(["--host", "0.0.0.0", "--workers", "2"]), LIMITS)
    assert cfg.workers == 2 and cfg.token_generated and cfg.publish_token
    cfg = resolve(p.parse_args(["--host", "0.0.0.0", "--publish-token", "t"]), LIMITS)
    assert cfg.publish_token == "t" and not cfg.token_generated
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("10.0.0.1")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--workers", "many"], "--workers"),
        (["--workers", "0"], "--workers"),
        (["--port", "70000"], "--port"),
        (["--history", "-1"], "--history"),
        (["--ping-interval", "-2"], "--ping-interval"),
        (["--publish-token", ""], "--publish-token"),
    ],
)
def test_resolve_rejects_bad_values(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve(build_parser().parse_args(argv), LIMITS)
