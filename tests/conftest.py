"""Shared test helpers.

``require("sshd")`` skips a test when an external tool is missing, unless
``COMET_LAB_REQUIRE_ALL=1`` (set by ``.ci/run``), where a missing tool is a failure: CI can never
pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

REQUIRE_ALL = os.environ.get("COMET_LAB_REQUIRE_ALL") == "1"

# tool name -> candidate executables
TOOLS: dict[str, tuple[str, ...]] = {
    "sshd": ("/usr/sbin/sshd",),
    "chromium": ("chromium", "chromium-browser", "/usr/bin/chromium"),
    "curl": ("curl", "/usr/bin/curl"),
    "ip": ("ip", "/usr/sbin/ip", "/sbin/ip"),
    # nginx with the nchan module: the C comparator of bench_comet --server nchan
    "nchan": ("/usr/lib/nginx/modules/ngx_nchan_module.so",),
    "nginx": ("nginx", "/usr/sbin/nginx"),
}


def find_tool(name: str) -> str | None:
    for candidate in TOOLS.get(name, (name,)):
        path = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if path:
            return path
    return None


def require(name: str, why: str = "") -> str:
    """Return the tool's path, or skip (fail under COMET_LAB_REQUIRE_ALL=1) when it is missing."""
    path = find_tool(name)
    if path is None:
        reason = f": {why}" if why else ""
        msg = f"{name} is missing{reason} (apt-get install the package; .ci/run does)"
        if REQUIRE_ALL:
            pytest.fail(msg + " — COMET_LAB_REQUIRE_ALL=1 forbids skipping")
        pytest.skip(msg)
    return path


def require_root(why: str = "") -> None:
    if os.geteuid() != 0:
        msg = f"needs root{': ' + why if why else ''}"
        if REQUIRE_ALL:
            pytest.fail(msg + " — COMET_LAB_REQUIRE_ALL=1 forbids skipping")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def comet() -> Iterator[int]:
    """A real ``python -m lab.comet`` (one worker) on a free loopback port: yields the port."""
    from lab.comet.launch import ServerProcess

    with ServerProcess(workers=1, extra=["--quiet"]) as server:
        yield server.port
