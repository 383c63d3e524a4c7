"""A test server's event loop in a thread of its own: subclasses write ``serve()``, which
starts listening, then awaits ``self.stop``; ``start()`` returns once it listens."""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    """Run ``serve()`` on a new event loop in a daemon thread; ``close()`` stops it."""

    stop: asyncio.Event

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the test server did not start"

    async def serve(self) -> None:
        """Listen, call ``self.ready.set()``, then ``await self.stop.wait()``."""
        raise NotImplementedError

    def _run(self) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()
            await self.serve()

        self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
