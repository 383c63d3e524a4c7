"""Load an HTML file in headless Chromium and report what rendered: the plotly figures drawn,
the JavaScript errors, the network requests. Drives Chromium with the DevTools protocol over
its WebSocket (``websockets``), so errors are caught as they happen, not guessed from a DOM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-port=0",
)

COUNT_FIGURES = """(() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  return {plots: plots.length,
          drawn: plots.filter(p => p.querySelector('svg.main-svg')).length,
          divs: document.querySelectorAll('.plotly-graph-div').length};
})()"""


@dataclass
class PageReport:
    """What a page did: figures found and drawn, errors, and every URL it requested."""

    plots: int = 0
    drawn: int = 0
    divs: int = 0
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class _Cdp:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict]] = {}
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            else:
                await self.events.put(msg)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict:
        ident = next(self.ids)
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})


def _collect(event: dict, report: PageReport) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text")
        report.errors.append(f"exception: {text}")
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        report.errors.append(
            f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
        )
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
        report.errors.append(f"console.{params['type']}: {args}")
    elif method == "Network.requestWillBeSent":
        report.requests.append(params.get("request", {}).get("url", ""))


async def _load(chromium: str, html: Path, settle_s: float, timeout_s: float) -> PageReport:
    # ignore_cleanup_errors: a last resort; the whole browser is gone before the cleanup
    with tempfile.TemporaryDirectory(prefix="lab-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its renderer, GPU and utility processes: one group
        )
        try:
            url = await asyncio.wait_for(asyncio.to_thread(_devtools_url, proc), 30)
            async with websockets.connect(url, max_size=None) as ws:
                return await _drive(_Cdp(ws), html, settle_s, timeout_s)
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> None:
    """Stop chromium and every process it started (they write into the profile directory
    until they exit): SIGTERM to the group, SIGKILL to what is left, then wait until the
    group is empty."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, whoever reaps them, do not)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def _devtools_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        if match:
            # keep draining stderr so chromium never blocks on a full pipe
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return match.group(1)
    raise RuntimeError(f"chromium exited ({proc.wait()}) before printing its DevTools URL")


async def _drive(cdp: _Cdp, html: Path, settle_s: float, timeout_s: float) -> PageReport:
    target = await cdp.call("Target.createTarget", url="about:blank")
    attached = await cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    session = attached["sessionId"]
    for domain in ("Runtime", "Log", "Page", "Network"):
        await cdp.call(f"{domain}.enable", session)
    report = PageReport()
    await cdp.call("Page.navigate", session, url=html.resolve().as_uri())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    loaded = False
    last: tuple[int, int] | None = None
    stable_since = loop.time()
    while loop.time() < deadline:
        try:
            event = await asyncio.wait_for(cdp.events.get(), 0.2)
            _collect(event, report)
            loaded = loaded or event.get("method") == "Page.loadEventFired"
            continue
        except TimeoutError:
            pass
        if not loaded:
            continue
        result = await cdp.call(
            "Runtime.evaluate", session, expression=COUNT_FIGURES, returnByValue=True
        )
        counts = result["result"]["value"]
        report.plots, report.drawn, report.divs = counts["plots"], counts["drawn"], counts["divs"]
        now = (report.plots, report.drawn)
        if now != last:
            last, stable_since = now, loop.time()
        elif report.drawn == report.divs and loop.time() - stable_since >= settle_s:
            break
    while not cdp.events.empty():
        _collect(cdp.events.get_nowait(), report)
    cdp.reader.cancel()
    return report


def load_page(
    chromium: str, html: Path, settle_s: float = 1.0, timeout_s: float = 60
) -> PageReport:
    """Open ``html`` (a file) in headless Chromium, wait until its figures are drawn (or the
    timeout), and report figures, errors and requests."""
    return asyncio.run(_load(chromium, html, settle_s, timeout_s))
