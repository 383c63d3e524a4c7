"""The validating reader behind experiment and inventory files: errors name file, key, fix.

``Section`` wraps one mapping of a YAML file: typed getters (``num``, ``str_``, ``enum_``, ...)
pop keys and check types and ranges; ``done`` rejects unknown keys with the closest known one.
``apply_overrides`` applies ``-p key=value`` (dotted keys, list indexes) to raw data before
validation. Used by ``lab.experiment`` and ``lab.inventory``; every problem is an
``ExperimentError``.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ExperimentError(ValueError):
    """A problem in an experiment or inventory file: names the file, the key and the fix."""

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        where = f"{file}: {key}" if key else file
        if key and file.startswith(f"-p {key}="):  # a -p flag names its key already
            where = file
        super().__init__(f"{where}: {problem}" + (f" — fix: {fix}" if fix else ""))


class Section:
    """A mapping being validated: pops known keys, then reports unknown ones."""

    def __init__(self, file: str, key: str, data: Any) -> None:
        self.file, self.key = file, key
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ExperimentError(
                file, key or "(top level)", f"expected a mapping, got {kind_of(data)}"
            )
        self.data = dict(data)

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def err(self, name: str, problem: str, fix: str = "") -> ExperimentError:
        return ExperimentError(self.file, self.path(name), problem, fix)

    def missing(self, name: str, fix: str) -> ExperimentError:
        """``name`` is required and absent: name a present key that looks like a typo of it."""
        close = difflib.get_close_matches(name, [str(k) for k in self.data], n=1, cutoff=0.6)
        if close:
            return self.err(name, f"is required (there is `{close[0]}:`, unknown)",
                            f"did you mean `{name}:`?")  # fmt: skip
        return self.err(name, "is required", fix)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        return self.data.pop(name, default)

    def str_(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                raise self.missing(name, f"add `{name}: <text>`")
            return default
        v = self.data.pop(name)
        if v is None and not required:
            return default
        if not isinstance(v, str) or (required and not v):
            raise self.err(name, f"expected text, got {kind_of(v)}", f"write `{name}: <text>`")
        return v

    def num(
        self,
        name: str,
        default: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
        required: bool = False,
        above: float | None = None,
    ) -> Any:
        if name not in self.data or self.data[name] is None:
            self.data.pop(name, None)
            if required:
                raise self.missing(name, f"add `{name}: <number>`")
            return default
        v = self.data.pop(name)
        want = "a whole number" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.err(name, f"expected {want}, got {kind_of(v)}", f"write `{name}: 100`")
        if integer and isinstance(v, float):
            if not v.is_integer():
                raise self.err(name, f"expected {want}, got {v}", f"write `{name}: {round(v)}`")
            v = int(v)
        if math.isnan(v) or math.isinf(v):
            raise self.err(name, f"expected a finite number, got {v}")
        if lo is not None and v < lo:
            raise self.err(name, f"{v} is below the minimum {lo:g}", f"use a value >= {lo:g}")
        if above is not None and v <= above:
            raise self.err(name, f"{v} must be greater than {above:g}", f"use a value > {above:g}")
        if hi is not None and v > hi:
            raise self.err(name, f"{v} is above the maximum {hi:g}", f"use a value <= {hi:g}")
        return v

    def bool_(self, name: str, default: bool) -> bool:
        if name not in self.data:
            return default
        v = self.data.pop(name)
        if not isinstance(v, bool):
            raise self.err(name, f"expected true or false, got {kind_of(v)}")
        return v

    def enum_(self, name: str, cls: type[enum.Enum], default: Any) -> Any:
        if name not in self.data:
            return default
        v = self.data.pop(name)
        choices = [m.value for m in cls]
        if v not in choices:
            close = closest(v, [str(c) for c in choices])
            hint = f"did you mean {close!r}? " if close else ""
            raise self.err(
                name, f"unknown value {v!r}", f"{hint}use one of: {', '.join(map(str, choices))}"
            )
        return cls(v)

    def auto_int(self, name: str, *, lo: int = 1, hi: int | None = None) -> int | None:
        v = self.data.get(name, "auto")
        if v in ("auto", None):
            self.data.pop(name, None)
            return None
        if isinstance(v, str):
            raise self.err(
                name, f"expected a whole number or auto, got {kind_of(v)}", f"write `{name}: auto`"
            )
        return int(self.num(name, lo=lo, hi=hi, integer=True))

    def str_list(self, name: str) -> tuple[str, ...] | None:
        if name not in self.data:
            return None
        v = self.data.pop(name)
        if isinstance(v, str):
            return tuple(x.strip() for x in v.split(",") if x.strip())
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.err(name, f"expected a list of text, got {kind_of(v)}", f"`{name}: [a, b]`")
        return tuple(v)

    def done(self, known: tuple[str, ...]) -> None:
        """Raise for the first key that is not ``known`` (with the closest known key)."""
        for extra in self.data:
            if extra in known:
                continue
            raise self.err(str(extra), "unknown key", unknown_key_fix(extra, known))


def closest(value: object, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The choice ``value`` was most likely meant to be (a typo), or None."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def unknown_key_fix(key: object, known: Sequence[str]) -> str:
    """The fix for an unknown key: the known key it looks like, else the known keys."""
    close = closest(key, known, cutoff=0.5)
    return f"did you mean `{close}`?" if close else f"known keys: {', '.join(known)}"


def kind_of(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"a boolean ({v})"
    return f"{type(v).__name__} {v!r}"[:80]


def expand_addresses(text: str, file: str = "", key: str = "") -> tuple[str, ...]:
    """Expand "127.0.0.2-9", "127.0.0.2-127.0.0.9" or "a,b,c" into addresses."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                first, last = part.split("-", 1)
                a = ipaddress.IPv4Address(first)
                if "." not in last:
                    last = first.rsplit(".", 1)[0] + "." + last
                b = ipaddress.IPv4Address(last)
                if b < a or int(b) - int(a) > 65535:
                    raise ValueError(f"bad range {part}")
                out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1))
            else:
                out.append(str(ipaddress.ip_address(part)))
        except ValueError as exc:
            raise ExperimentError(
                file, key, f"not an address or range: {part!r} ({exc})", "e.g. 127.0.0.2-9"
            ) from None
    return tuple(out)


def read_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExperimentError(str(path), "", f"{what} file not found", "check the path") from None
    except IsADirectoryError:
        raise ExperimentError(
            str(path), "", f"is a directory, not an {what} file", "give a YAML file in it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(str(path), "", f"cannot read the {what} file: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExperimentError(str(path), "", f"not valid YAML: {exc}", "fix the syntax") from None


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a.b=1", ...]`` (the ``-p`` flags) → ``{"a.b": "1"}``; raises ExperimentError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError("-p", item, "expected KEY=VALUE", "e.g. -p agents.procs=4")
        out[key.strip()] = value
    return out


def apply_overrides(data: Any, overrides: Mapping[str, str], file: str) -> Any:
    """Set dotted keys in the raw YAML data; values are parsed as YAML (``100``, ``[a, b]``)."""
    import yaml

    for dotted, text in overrides.items():
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        parts = dotted.split(".")
        node = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ExperimentError(
                        file,
                        f"-p {dotted}",
                        f"{where}: no list item {part!r} (the list has {len(node)})",
                        f"use an index 0..{len(node) - 1}",
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ExperimentError(
                    file, f"-p {dotted}", f"{'.'.join(parts[:i])} is not a mapping or a list"
                )
    return data
