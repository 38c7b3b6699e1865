"""The ``loraq`` command line.

Each subcommand lives in ``analysis/commands/<name>.py`` and provides
``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code or None).

Errors about the user's input (``analysis.errors.InputError``: the commands read their
input inside ``reading_input()``, and the checks deeper in the work raise it on purpose)
become one line on stderr and exit code 2, with no traceback; every other exception is a
programming error and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from analysis.errors import InputError

COMMANDS = ("formats", "vectors", "cost", "quantize", "inspect", "optimize", "report",
            "tensorcore")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraq",
        description="Mixed-precision number formats, integer-accumulate GEMM models, "
        "hardware cost and the LoRaQ quantizer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"analysis.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name == f"analysis.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from analysis.cluster import keep_freed_memory

    keep_freed_memory()  # serial fits keep their memory as the workers' do
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        # `loraq` alone runs the main job.
        args = parser.parse_args(["report"] if "report" in _registered(parser) else ["--help"])
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("loraq: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    except InputError as exc:
        print(f"loraq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _registered(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


if __name__ == "__main__":
    sys.exit(main())
