"""Start a comet server as a child process and wait until it serves: for tests, benchmarks
and other roles' tests that need a real server (``with ServerProcess(workers=2) as s: s.url``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import lab

_SERVING = re.compile(
    r"serving http://(?P<host>[^\s:]+):(?P<port>\d+) .*\(pids (?P<pids>[\d, ]+)\)"
)


class ServerProcess:
    """A ``python -m lab.comet`` child on a free port. ``stderr_lines`` and ``stdout_lines``
    collect its output; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(
        self,
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        extra: Sequence[str] = (),
        start_timeout_s: float = 30.0,
    ) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "lab.comet",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            *extra,
        ]
        self.start_timeout_s = start_timeout_s
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.host = host
        self.port = 0
        self.worker_pids: list[int] = []
        self.proc: subprocess.Popen[str] | None = None
        self._serving = threading.Event()
        self._readers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def publish(self, channel: str, data: str | bytes, token: str | None = None) -> int:
        """``POST /pub/<channel>`` with the standard library's HTTP client; the message id."""
        import json
        import urllib.request

        req = urllib.request.Request(
            f"{self.url}/pub/{channel}",
            data=data.encode() if isinstance(data, str) else data,
            method="POST",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(json.load(resp)["id"])

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _read(self, stream: object, sink: list[str], watch: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line.rstrip("\n"))
            if watch and not self._serving.is_set():
                m = _SERVING.search(line)
                if m:
                    self.port = int(m["port"])
                    self.worker_pids = [int(p) for p in m["pids"].split(",")]
                    self._serving.set()

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        root = str(Path(lab.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for stream, sink, watch in (
            (self.proc.stderr, self.stderr_lines, True),
            (self.proc.stdout, self.stdout_lines, False),
        ):
            reader = threading.Thread(target=self._read, args=(stream, sink, watch), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._serving.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    "lab.comet did not start:\n" + "\n".join(self.stderr_lines[-30:])
                )
        return self

    def wait(self, timeout_s: float = 30.0) -> int:
        """Wait for the server to exit and for its output to be read; return the exit code."""
        assert self.proc is not None
        rc = self.proc.wait(timeout_s)
        for reader in self._readers:
            reader.join(timeout_s)
        return rc

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a clean stop) and wait; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.worker_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()
