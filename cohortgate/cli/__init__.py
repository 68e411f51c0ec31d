"""The `cohortgate` command.

Each module in this package is one command group and exposes ``register(subparsers)``; the
dispatcher discovers them, so adding a group never edits this file. Modules import their heavy
dependencies (onnxruntime, grpc, redis) inside the command functions, so ``cohortgate policy``
starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    from cohortgate import __version__

    parser = argparse.ArgumentParser(prog="cohortgate", description="A zero-trust A/B gateway for model endpoints.")
    parser.add_argument("--version", action="version", version=f"cohortgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    _help_when_incomplete(parser)
    return parser


def _help_when_incomplete(parser: argparse.ArgumentParser) -> None:
    """``cohortgate`` alone, or a group without its action (``cohortgate policy``), prints that
    level's command list instead of an argparse error."""
    parser.set_defaults(func=lambda _args: parser.print_help() or 0)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            for child in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    _help_when_incomplete(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
