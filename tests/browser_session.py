"""A long-lived headless Chromium page that tests drive step by step: open a URL, then call the
page's JavaScript functions and await their (promise's) JSON value. Uses ``tests/browser.py``'s
DevTools-protocol client on a background event loop, so synchronous tests can use it;
``browser.load_page`` is the one-shot variant (load a file, wait for its figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import websockets
from browser import FLAGS, PageReport, _Cdp, _collect, _devtools_url, _stop_group

T = TypeVar("T")


class JsError(AssertionError):
    """A page expression threw or rejected; carries the browser's console/network errors."""


class BrowserSession:
    """Headless Chromium on a background event loop, driven over the DevTools protocol with
    ``tests/browser.py``'s client, for synchronous tests: ``open(url)`` loads a page,
    ``call(fn, *args)`` awaits a page function's (promise's) JSON value."""

    def __init__(self, chromium: str) -> None:
        self.chromium = chromium
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.profile = tempfile.TemporaryDirectory(
            prefix="lab-chromium-", ignore_cleanup_errors=True
        )
        self.report = PageReport()
        self.proc: subprocess.Popen[str] | None = None
        self.cdp: _Cdp | None = None
        self.ws: Any = None
        self.session = ""
        self.loaded = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 40) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> BrowserSession:
        self.thread.start()
        self.proc = subprocess.Popen(
            [self.chromium, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its renderer, GPU and utility processes: one group
        )
        proc = self.proc
        url = self._run(asyncio.wait_for(asyncio.to_thread(_devtools_url, proc), 30))
        self._run(self._connect(url))
        return self

    async def _connect(self, url: str) -> None:
        self.ws = await websockets.connect(url, max_size=None)
        cdp = self.cdp = _Cdp(self.ws)
        target = await cdp.call("Target.createTarget", url="about:blank")
        attached = await cdp.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            await cdp.call(f"{domain}.enable", self.session)
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.cdp is not None
        while True:
            event = await self.cdp.events.get()
            _collect(event, self.report)
            if event.get("method") == "Page.loadEventFired":
                self.loaded.set()
            elif event.get("method") == "Network.loadingFailed":
                params = event.get("params", {})
                if params.get("corsErrorStatus") or params.get("blockedReason"):
                    self.report.errors.append(f"network: {params}")

    def open(self, url: str) -> None:
        async def navigate() -> None:
            assert self.cdp is not None
            self.loaded.clear()
            self.report.errors.clear()
            await self.cdp.call("Page.navigate", self.session, url=url)
            await asyncio.wait_for(self.loaded.wait(), 30)

        self._run(navigate())

    def call(self, fn: str, *args: Any) -> Any:
        expression = f"{fn}({', '.join(json.dumps(a) for a in args)})"

        async def evaluate() -> dict[str, Any]:
            assert self.cdp is not None
            return await self.cdp.call(
                "Runtime.evaluate",
                self.session,
                expression=expression,
                awaitPromise=True,
                returnByValue=True,
            )

        result = self._run(evaluate())
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            # let late console/network events arrive before reporting them
            self._run(asyncio.sleep(0.2))
            errors = "\n  ".join(self.report.errors[-8:])
            raise JsError(f"{expression} failed: {text}\n  browser errors:\n  {errors}")
        return result["result"].get("value")

    def close(self) -> None:
        async def shut() -> None:
            for task in (self.pump, self.cdp.reader if self.cdp else None):
                if task is not None:
                    task.cancel()
            if self.ws is not None:
                await self.ws.close()

        with contextlib.suppress(Exception):
            self._run(shut(), 10)
        if self.proc is not None:
            _stop_group(self.proc)  # every chromium process, before its profile goes
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.profile.cleanup()
