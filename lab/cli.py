"""The ``lab`` command: one subcommand per verb, each delegating to the module that owns it.

Role subcommands (``serve``, ``agent``, ``monitor``) run exactly what ``python -m lab.<role>``
runs, with the same flags, so a role behaves the same by hand, from the CLI and from the
controller. Each owning module exposes ``main(argv: list[str] | None) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Verb(NamedTuple):
    """A subcommand: the module that implements it and one line on what it is for."""

    module: str
    help: str


VERBS: dict[str, Verb] = {
    "run": Verb("lab.run", "run an experiment (YAML) end to end and write results/<run-id>/"),
    "report": Verb("lab.publish", "render report.html for an existing results folder"),
    "compare": Verb("lab.publish", "compare several runs side by side in one HTML page"),
    "doctor": Verb("lab.doctor", "preflight the hosts and the plan: limits, ports, memory, clocks"),
    "serve": Verb("lab.comet", "start the comet push server (WebSocket, long-poll, SSE)"),
    "agent": Verb("lab.agent", "start a load agent: arrival phases, per-connection records"),
    "monitor": Verb("lab.monitor", "sample CPU, memory and sockets of this host once a second"),
}

# report/compare share a module; each has its own entry point there.
ENTRY: dict[str, str] = {"report": "report_main", "compare": "compare_main"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab",
        description=(
            "comet-lab: load-test comet (real-time push) servers from an experiment file, "
            "and publish the results as a report."
        ),
        epilog="Run `lab <subcommand> --help` for the flags of each subcommand.",
    )
    from lab import __version__

    parser.add_argument("--version", action="version", version=f"comet-lab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<subcommand>")
    for name, verb in VERBS.items():
        sub.add_parser(name, help=verb.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args or args[0] not in VERBS:
        parser.parse_args(args or ["--help"])
        return 2
    name, rest = args[0], args[1:]
    verb = VERBS[name]
    try:
        module = importlib.import_module(verb.module)
    except ModuleNotFoundError as exc:
        if exc.name == verb.module:
            print(f"lab {name}: not available yet ({verb.module} has not landed)", file=sys.stderr)
            return 3
        print(
            f"lab {name}: missing dependency {exc.name!r}; install the controller extra: "
            "pip install 'comet-lab[lab]'",
            file=sys.stderr,
        )
        return 3
    entry = getattr(module, ENTRY.get(name, "main"))
    return int(entry(rest, prog=f"lab {name}") or 0)


if __name__ == "__main__":
    raise SystemExit(main())
