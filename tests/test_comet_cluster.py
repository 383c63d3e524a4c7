"""The comet server with several workers: every publish reaches the subscribers on every
worker in order with nothing lost; a SIGKILLed worker is replaced; SIGTERM closes every client
cleanly (WebSocket 1001, long-poll 204, SSE end) and exits 0."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from lab.comet.launch import ServerProcess


def publish(server: ServerProcess, channel: str, data: str) -> int:
    req = urllib.request.Request(f"{server.url}/pub/{channel}", data=data.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.load(resp)["id"])


def stats(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as resp:
        return dict(json.load(resp))


def wait_until(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout_s} s: {cond}")


async def connect_on_every_worker(
    server: ServerProcess, url: str, n: int
) -> list[ClientConnection]:
    """Open ``n`` WebSockets, more if SO_REUSEPORT's hash put them all on one worker, until
    /stats shows subscribers on every worker."""
    clients = [await connect(url) for _ in range(n)]
    deadline = time.monotonic() + 30
    while True:
        workers = (await asyncio.to_thread(stats, server))["workers"]
        online = [w["online"] for w in workers]
        if sum(online) >= len(clients):  # the figures (a second old at most) count them all
            if all(online):
                return clients
            clients += [await connect(url) for _ in range(4)]
        if time.monotonic() > deadline:
            raise AssertionError(f"clients not on every worker: {workers}")
        await asyncio.sleep(0.1)


async def test_publishes_reach_every_worker_in_order_without_loss() -> None:
    count, publishers = 200, 4
    with ServerProcess(workers=2, extra=["--quiet"]) as server:
        clients = await connect_on_every_worker(server, f"{server.ws_url}/ws?channel=order", 12)

        def publish_many(k: int) -> list[int]:
            return [publish(server, "order", f"{k}-{i}") for i in range(count // publishers)]

        results = await asyncio.gather(
            *(asyncio.to_thread(publish_many, k) for k in range(publishers))
        )
        assigned = sorted(i for r in results for i in r)
        assert assigned == list(range(1, count + 1))

        async def receive_all(ws: ClientConnection) -> list[int]:
            return [json.loads(await asyncio.wait_for(ws.recv(), 20))["id"] for _ in range(count)]

        received = await asyncio.gather(*(receive_all(ws) for ws in clients))
        for ids in received:
            assert ids == list(range(1, count + 1))
        # every worker published some of them (the publishes came through both)
        assert all(w["messages"] > 0 for w in stats(server)["workers"])
        for ws in clients:
            await ws.close()


async def test_sigkilled_worker_is_replaced_and_serving() -> None:
    with ServerProcess(workers=2, extra=["--quiet"]) as server:
        publish(server, "r", "before")
        victim = server.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                (s := stats(server))["workers"][0]["restarts"] == 1
                and s["workers"][0]["pid"] not in (0, victim)
            )
        )
        wait_until(lambda: urllib.request.urlopen(f"{server.url}/healthz", timeout=5).status == 200)
        assert any("died: signal 9" in line for line in server.stderr_lines)
        clients = await connect_on_every_worker(server, f"{server.ws_url}/ws?channel=r", 12)
        assert await asyncio.to_thread(publish, server, "r", "after") == 2
        for ws in clients:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["id"] == 2
            await ws.close()
        # the new worker got the channel's history from the supervisor
        for _ in range(8):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            conn.request("GET", "/lp?channel=r&since=0&timeout=1")
            body = json.loads(conn.getresponse().read())
            conn.close()
            assert [m["data"] for m in body] == ["before", "after"]


async def test_sigterm_closes_clients_cleanly_and_exits_0() -> None:
    server = ServerProcess(workers=2, extra=["--quiet"]).start()
    try:
        clients = await connect_on_every_worker(server, f"{server.ws_url}/ws?channel=bye", 8)
        lp_result: list[int] = []
        sse_lines: list[bytes] = []

        def long_poll() -> None:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
            conn.request("GET", "/lp?channel=bye&timeout=60")
            lp_result.append(conn.getresponse().status)

        def sse() -> None:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
            conn.request("GET", "/sse?channel=bye")
            resp = conn.getresponse()
            sse_lines.extend(resp.fp.readlines())  # returns when the stream ends

        threads = [threading.Thread(target=f) for f in (long_poll, sse)]
        for t in threads:
            t.start()
        wait_until(lambda: stats(server)["online"] >= 10)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        codes = []
        for ws in clients:
            try:
                await asyncio.wait_for(ws.recv(), 20)
            except ConnectionClosed as exc:
                codes.append(exc.rcvd.code if exc.rcvd else None)
        assert codes == [1001] * len(clients)
        for t in threads:
            t.join(30)
        assert lp_result == [204]
        assert b"retry: 1000\n" in sse_lines
        assert server.wait(30) == 0
        assert server.stdout_lines and json.loads(server.stdout_lines[-1])["kind"] == "server"
    finally:
        server.kill()
