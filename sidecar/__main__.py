"""``python -m sidecar ...``: the same as ``cohortgate sidecar ...``, without loading the other commands
(so a machine with only the sidecar's dependencies can run it)."""

from __future__ import annotations

import argparse
import sys

from sidecar.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sidecar", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
