"""`cohortgate models build`: train and export the demo models, offline."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="build the demo ONNX models")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="train the tabular demo models on scikit-learn's bundled data and export them to ONNX",
    )
    build.add_argument("--out", default="models", help="directory to write into (default: models/)")
    build.add_argument("--force", action="store_true", help="rebuild models that already exist")
    build.set_defaults(func=build_handler)


def build_handler(args: argparse.Namespace) -> int:
    from sidecar.demo_models import build_models

    started = time.perf_counter()
    for model in build_models(args.out, force=args.force):
        what = "kept " if model.skipped else "built"
        accuracy = "" if model.accuracy is None else f"  held-out accuracy {model.accuracy:.3f}"
        print(f"{what} {model.path}  ({model.description}){accuracy}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0
