"""The agent's C fast path (lab/agent/fastpath.c): it measures what the Python path measures,
hands every unusual connection to the Python session objects (a response it does not know,
frames sent with the 101, a server that closes, a server that never answers), and when it
cannot be built the agent says so and runs on the Python path."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from lab.agent import fastpath
from lab.agent.records import read_records
from tests.loopthread import LoopThread

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def run_agent(*args: str, env: dict[str, str] | None = None) -> tuple[list[dict], str]:
    p = subprocess.run(
        [PY, "-m", "lab.agent", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert p.returncode == 0, p.stderr
    return [json.loads(x) for x in p.stdout.splitlines() if x.strip()], p.stderr


def test_the_fast_path_builds_here() -> None:
    path, why = fastpath.build()
    assert path is not None and path.is_file(), why
    lib, why = fastpath.load()
    assert lib is not None, why


def test_fast_and_python_paths_measure_the_same(comet: int, tmp_path: Path) -> None:
    runs = {}
    for name, env in (("fast", {}), ("python", {fastpath.ENV_SWITCH: "0"})):
        rec = tmp_path / f"{name}.rec"
        lines, err = run_agent(
            "--url", f"ws://127.0.0.1:{comet}/ws?channel=f", "--rate", "400",
            "--connections", "400", "--hold", "0.3", "--procs", "2", "--records", str(rec),
            env=env,
        )  # fmt: skip
        assert (", C fast path" in err) == (name == "fast"), err
        runs[name] = (lines, read_records(rec))
    for _name, (lines, r) in runs.items():
        end = lines[-1]
        assert end["outcome"] == "completed"
        assert (end["connected"], end["closed"], end["open"]) == (400, 400, 0), end
        assert sum(end["failed"].values()) == 0
        assert sum(c for x in lines for _, c in x["connect_hist"]["buckets"]) == 400
        assert Counter(r["outcome"]) == {"ok": 400}
        for s, st, c, cl in zip(
            r["scheduled"], r["started"], r["connected"], r["closed"], strict=True
        ):
            assert s <= st <= c <= cl, (s, st, c, cl)
    fast, py = runs["fast"][0][-1], runs["python"][0][-1]
    # the same requests, responses and close frames go both ways
    assert (fast["bytes_out"], fast["bytes_in"]) == (py["bytes_out"], py["bytes_in"])


class OddServer(LoopThread):
    """A WebSocket server (asyncio streams, in a thread) that makes the fast path hand over:
    each 101 carries a header that differs per connection; every 2nd connection gets a text
    frame in the same write as its 101; every 3rd is closed by the server 0.3 s after its
    upgrade. ``silent=True``: accept and never answer."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.count = 0
        self.start()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if self.silent:
                await reader.read()  # until the agent gives up
                return
            self.count += 1
            n = self.count
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            out = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                b"X-Connection: %d\r\n\r\n" % n
            )
            if n % 2 == 0:
                out += b"\x81\x05hello"
            writer.write(out)
            if n % 3 == 0:
                await asyncio.sleep(0.3)
                writer.close()
                return
            await reader.read()  # until the agent closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.close()

    async def serve(self) -> None:
        srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        async with srv:
            self.ready.set()
            await self.stop.wait()


def test_unusual_connections_are_handed_to_python(tmp_path: Path) -> None:
    srv = OddServer()
    rec = tmp_path / "odd.rec"
    try:
        lines, _err = run_agent(
            "--url", f"ws://127.0.0.1:{srv.port}/any", "--session", "generic", "--rate", "200",
            "--connections", "60", "--hold", "1", "--records", str(rec), "--quiet",
        )  # fmt: skip
    finally:
        srv.close()
    end = lines[-1]
    # every response differed from the last one checked: Python checked each
    assert end["connected"] == 60 and sum(end["failed"].values()) == 0, end
    assert end["msgs_in"] == 30, end  # the frames that came with the 101
    assert end["dropped"] == 20, end  # closed by the server during the hold
    assert end["closed"] == 60 and end["open"] == 0, end
    outcomes = Counter(read_records(rec)["outcome"])
    assert outcomes == {"ok": 40, "reset": 20}, outcomes


def test_a_server_that_never_answers_times_the_connections_out(tmp_path: Path) -> None:
    srv = OddServer(silent=True)
    rec = tmp_path / "silent.rec"
    try:
        lines, _err = run_agent(
            "--url", f"ws://127.0.0.1:{srv.port}/ws", "--rate", "100", "--connections", "20",
            "--hold", "2.5", "--connect-timeout", "1", "--records", str(rec), "--quiet",
        )  # fmt: skip
    finally:
        srv.close()
    end = lines[-1]
    assert end["connected"] == 0 and end["failed"]["timeout"] == 20, end
    # timed out by the sweep during the hold, not at the end of the run
    assert any(x["failed"]["timeout"] == 20 for x in lines[:-1]), lines
    assert Counter(read_records(rec)["outcome"]) == {"timeout": 20}


def test_without_a_compiler_the_agent_says_so_and_uses_python(comet: int, tmp_path: Path) -> None:
    env = {"COMET_LAB_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-cc")}
    lines, err = run_agent(
        "--url", f"ws://127.0.0.1:{comet}/ws?channel=n", "--rate", "200", "--connections",
        "50", "--hold", "0.2", env=env,
    )  # fmt: skip
    assert "lab.agent: warning: the C fast path is off: " in err, err
    assert "no-cc" in err and "Python path" in err, err
    assert ", C fast path" not in err
    assert lines[-1]["connected"] == 50 and lines[-1]["closed"] == 50


def test_sockaddr_layout() -> None:
    a4 = fastpath.sockaddr(socket.AF_INET, "127.0.0.2", 8080)
    assert (
        len(a4) == 16 and a4[2:4] == (8080).to_bytes(2, "big") and a4[4:8] == bytes([127, 0, 0, 2])
    )
    a6 = fastpath.sockaddr(socket.AF_INET6, "::1", 443)
    assert len(a6) == 28 and a6[8:24] == socket.inet_pton(socket.AF_INET6, "::1")


def test_the_fd_table_is_grown_before_the_launcher_thread_starts() -> None:
    # a multi-threaded process waits for an RCU grace period at each doubling of its fd table
    code = (
        "import re\n"
        "from lab.agent.proc import presize_fd_table\n"
        "def size():\n"
        "    return int(re.search(r'FDSize:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "before = size()\n"
        "presize_fd_table(5000)\n"
        "print(before, size())\n"
    )
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    before, after = map(int, p.stdout.split())
    assert before < 5000 <= after, (before, after)


READ_PACE = """
import asyncio, json, sys, time
from lab.agent.proc import LoadProcess
cfg = {"session": sys.argv[1], "urls": [sys.argv[2]], "max_duration_s": 3.0,
       "phases": [{"kind": "ramp", "rate_per_s": 100, "until": 5},
                  {"kind": "hold", "duration_s": 1.0}]}
lp = LoadProcess(cfg)
seen = []
async def main():
    asyncio.get_running_loop().call_later(0.7, lambda: seen.append(lp.poller.tick_s))
    await lp.run(time.time() + 0.1)
asyncio.run(main())
print(json.dumps({"tick": seen[0], "fast": lp.fast is not None}))
"""


def test_the_read_pace_in_a_hold_by_session_kind(comet: int) -> None:
    from lab.agent.proc import IDLE_READ_TICK_S, READ_TICK_S

    got = {}
    for session, url in (
        ("websocket", f"ws://127.0.0.1:{comet}/ws?channel=r"),
        ("longpoll", f"http://127.0.0.1:{comet}/lp?channel=r"),
    ):
        p = subprocess.run(
            [PY, "-c", READ_PACE, session, url],
            capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        got[session] = json.loads(p.stdout.splitlines()[-1])
    # a hold of WebSockets is read every 50 ms; long-polls every 2 ms (their next poll waits
    # for the read of the last answer)
    assert got["websocket"] == {"tick": IDLE_READ_TICK_S, "fast": True}, got
    assert got["longpoll"] == {"tick": READ_TICK_S, "fast": False}, got
