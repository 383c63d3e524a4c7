"""lab.cbuild with the host's real C compiler: a library built once into the cache and
loaded once per process, and each way it cannot be, named with its fix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from lab import cbuild

GOOD = "int twice(int x) { return 2 * x; }\n"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMET_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cbuild, "_loaded", {})
    return tmp_path / "cache" / "c"


def source(tmp_path: Path, text: str, name: str = "part.c") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_library_is_built_once_into_the_cache_and_loaded_once(
    tmp_path: Path, cache: Path
) -> None:
    src = source(tmp_path, GOOD)
    path, why = cbuild.build(src, "LAB_TEST_PART")
    assert path is not None and why == "" and path.parent == cache
    assert path.name.startswith("part-") and path.suffix == ".so"
    built = path.stat().st_mtime_ns
    assert cbuild.build(src, "LAB_TEST_PART") == (path, "")  # not built again
    assert path.stat().st_mtime_ns == built
    calls: list[ctypes.CDLL] = []
    lib, why = cbuild.load(src, "LAB_TEST_PART", setup=calls.append)
    assert lib is not None and lib.twice(21) == 42
    assert cbuild.load(src, "LAB_TEST_PART", setup=calls.append)[0] is lib
    assert calls == [lib]  # set up once
    src.write_text(GOOD + "int thrice(int x) { return 3 * x; }\n")
    assert cbuild.build(src, "LAB_TEST_PART")[0] != path  # a new source: a new library


def test_what_cannot_be_built_says_why(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = source(tmp_path, "this is not C\n", "bad.c")
    path, why = cbuild.build(bad, "LAB_TEST_PART")
    assert path is None and "failed on bad.c" in why
    good = source(tmp_path, GOOD)
    monkeypatch.setenv("LAB_TEST_PART", "0")
    assert cbuild.build(good, "LAB_TEST_PART") == (None, "turned off by LAB_TEST_PART=0")
    monkeypatch.delenv("LAB_TEST_PART")
    # a worker only loads what its parent built
    lib, why = cbuild.load(good, "LAB_TEST_PART", build_it=False)
    assert lib is None and "is not built" in why
    monkeypatch.setenv("CC", str(tmp_path / "no-cc"))
    path, why = cbuild.build(good, "LAB_TEST_PART")
    assert path is None and "CC=" in why and "unset CC" in why
    monkeypatch.delenv("CC")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("where the cache should be")  # unwritable, even for root
    monkeypatch.setenv("COMET_LAB_CACHE", str(not_a_dir))
    path, why = cbuild.build(good, "LAB_TEST_PART")
    assert path is None and "cannot write to" in why and "set COMET_LAB_CACHE" in why
