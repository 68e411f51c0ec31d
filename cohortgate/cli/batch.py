"""`cohortgate batch`: score a Parquet file with the gateway's cohorts, residency and models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="score a Parquet file offline: same cohorts, residency and ONNX models as the gateway",
        description=(
            "Assign every row with the route's salt and weights through the gateway's own decide(), score it with "
            "the ONNX model of its variant's in-region backend, and write rows that no backend in their region "
            "may serve to a rejects file with the reason. Columns named like the route's unit, residency and "
            "eligibility keys (claim names, lower-case header names) are read as the request would carry them."
        ),
    )
    parser.add_argument("--policy", required=True, help="the policy file the gateway serves")
    parser.add_argument("--route", required=True, help="the route whose variants score the rows")
    parser.add_argument(
        "--input", required=True, help="the rows to score: a Parquet file (or a directory, with --spark/--master)"
    )
    parser.add_argument("--output", required=True, help="scored rows (Parquet; a directory of parts on Spark)")
    parser.add_argument(
        "--rejects", help="rejected rows with reason, status, message (default: OUTPUT's stem + .rejects)"
    )
    parser.add_argument(
        "--features",
        help="comma-separated scalar feature columns, in the model's order (default: one array column named "
        "like the model's input)",
    )
    parser.add_argument(
        "--weights", help="effective weights to assign with, e.g. control=75,canary=25 (default: the policy's)"
    )
    parser.add_argument("--shadows", action="store_true", help="also score every in-region row with each shadow")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--spark", metavar="MASTER", help="run on Spark with this local master, e.g. local[2]")
    where.add_argument("--master", metavar="URL", help="run on a Spark cluster (spark://..., yarn, k8s://...)")
    parser.set_defaults(func=batch_handler)


def _weights(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--weights: {item!r} is not NAME=PERCENT")
        out[name.strip()] = int(value)
    return out


def _rejects(output: str) -> str:
    path = Path(output)
    return str(path.with_name(f"{path.stem}.rejects{path.suffix or '.parquet'}"))


def batch_handler(args: argparse.Namespace) -> int:
    from cohortgate.batch import BatchError, run_pandas, run_spark
    from cohortgate.batch.job import prepare
    from cohortgate.batch.score import ScoreError

    started = time.perf_counter()
    try:
        job = prepare(
            args.policy,
            args.route,
            weights=_weights(args.weights),
            shadows=args.shadows,
            features=[c.strip() for c in args.features.split(",") if c.strip()] if args.features else None,
        )
        rejects = args.rejects or _rejects(args.output)
        master = args.spark or args.master
        if master:
            summary = run_spark(job, args.input, args.output, rejects, master=master)
        else:
            summary = run_pandas(job, args.input, args.output, rejects)
    except (BatchError, ScoreError, ValueError, OSError) as exc:
        print(f"cohortgate batch: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "rows": summary.rows,
                "scored": summary.scored,
                "by_variant": summary.by_variant,
                "rejected": summary.rejected,
                "output": args.output,
                "rejects": rejects,
                "seconds": round(seconds, 2),
            }
        )
    )
    return 0
