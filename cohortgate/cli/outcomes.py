"""`cohortgate outcomes import|report`: late labels and warehouse rows into the outcome journal, and the
lift they show.

The journal (an append-only JSON-lines file, `cohortgate.controller.outcomes`) is where the
controller's outcome ledger reads from; ``import`` appends to it rather than calling the controller,
because a file replays idempotently (duplicates count once), survives a controller restart, needs
no new API surface, and works where the controller is not running (a warehouse job, a laptop).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cohortgate.core.contract import EXPOSURE_KEY_ENV

DEFAULT_JOURNAL = "state/outcomes.jsonl"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("outcomes", help="import outcome rows and read their lift")
    cmds = parser.add_subparsers(dest="outcomes_command", required=True, metavar="ACTION")

    imp = cmds.add_parser(
        "import",
        help="append outcome rows from CSV or Parquet to the outcome journal",
        description="Rows need metric, value and either exposure (the token a response carried) or request_id; "
        "t (Unix seconds or ISO 8601) is when the outcome happened. Tokens are verified here when "
        f"{EXPOSURE_KEY_ENV} is set; refused and duplicate rows are counted and left out.",
    )
    imp.add_argument("file", metavar="FILE", help="a .csv or .parquet file (Parquet needs pyarrow)")
    imp.add_argument(
        "--journal", default=DEFAULT_JOURNAL, metavar="PATH", help=f"the journal (default {DEFAULT_JOURNAL})"
    )
    imp.add_argument("--window", type=float, default=None, metavar="S", help="attribution window in seconds (7 days)")
    imp.add_argument("--json", action="store_true", help="print the counts as JSON")
    imp.set_defaults(func=_import)

    rep = cmds.add_parser("report", help="lift and verdict of each metric and challenger on a route")
    rep.add_argument("route", metavar="ROUTE", help="the route")
    rep.add_argument(
        "--journal", default=DEFAULT_JOURNAL, metavar="PATH", help=f"the journal (default {DEFAULT_JOURNAL})"
    )
    rep.add_argument("--control", default="control", help="the control variant (default control)")
    rep.add_argument(
        "--metric",
        action="append",
        default=[],
        required=True,
        metavar="NAME:KIND[:DIRECTION]",
        help="a metric, e.g. conversion:binary or latency:mean:decrease (repeatable)",
    )
    rep.add_argument("--planned-units", type=int, default=10_000, metavar="N", help="units both arms plan to reach")
    rep.add_argument("--alpha", type=float, default=0.05, help="false-positive rate over all challengers (0.05)")
    rep.add_argument("--json", action="store_true", help="print the results as JSON")
    rep.set_defaults(func=_report)


# ---------------------------------------------------------------------- reading rows


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("cohortgate outcomes import: Parquet needs pyarrow (pip install pyarrow)") from None
        yield from pq.read_table(path).to_pylist()
        return
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _time(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return datetime.fromisoformat(str(value)).timestamp()


def to_record(row: dict[str, Any]) -> dict[str, Any]:
    """One row as a journal outcome record; ValueError says what is wrong with it."""
    metric = str(row.get("metric") or "").strip()
    if not metric:
        raise ValueError("no metric")
    try:
        value = float(row.get("value"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"value {row.get('value')!r} is not a number") from None
    exposure, request_id = (str(row.get(k) or "").strip() for k in ("exposure", "request_id"))
    if not exposure and not request_id:
        raise ValueError("neither exposure nor request_id")
    record: dict[str, Any] = {"kind": "outcome", "metric": metric, "value": value}
    if exposure:
        record["exposure"] = exposure
    else:
        record["request_id"] = request_id
    t = _time(row.get("t"))
    if t is not None:
        record["t"] = t
    return record


def _import(args: argparse.Namespace) -> int:
    from cohortgate.controller.outcomes import DEFAULT_WINDOW_S, append_journal, keys_from_env, read_journal
    from cohortgate.core.exposure import ExposureRefused, verify

    path = Path(args.file)
    if not path.exists():
        print(f"cohortgate outcomes import: no such file: {path}", file=sys.stderr)
        return 2
    keys = keys_from_env()
    window = args.window or DEFAULT_WINDOW_S
    now = time.time()

    def identity(record: dict[str, Any]) -> tuple[str, str]:
        return (record.get("exposure") or "rid:" + str(record.get("request_id")), record["metric"])

    seen = {identity(r) for r in read_journal(args.journal) if r.get("kind", "outcome") == "outcome" and "metric" in r}
    counts: Counter[str] = Counter()
    problems: list[str] = []
    accepted = []
    for line, row in enumerate(_rows(path), 2):
        try:
            record = to_record(row)
        except ValueError as exc:
            counts["bad_row"] += 1
            if len(problems) < 5:
                problems.append(f"{path}:{line}: {exc}")
            continue
        if keys is not None and "exposure" in record:
            try:
                verify(record["exposure"], keys, record.get("t", now), window)
            except ExposureRefused as exc:
                counts[exc.code] += 1
                continue
        key = identity(record)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        accepted.append(record)
    counts["accepted"] = append_journal(args.journal, accepted) if accepted else 0
    if args.json:
        print(json.dumps({"journal": args.journal, "verified": keys is not None, "counts": dict(counts)}))
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        detail = ", ".join(f"{n} {code}" for code, n in sorted(counts.items()) if code != "accepted" and n)
        print(f"{counts['accepted']} outcomes appended to {args.journal}" + (f" ({detail} left out)" if detail else ""))
        if keys is None:
            print(f"tokens not verified here ({EXPOSURE_KEY_ENV} unset): the controller verifies them")
    return 1 if counts["bad_row"] else 0


# ---------------------------------------------------------------------- report


def _spec(text: str, planned: int):
    from cohortgate.core.lift import MetricSpec

    parts = text.split(":")
    name, kind = parts[0], parts[1] if len(parts) > 1 else "binary"
    direction = parts[2] if len(parts) > 2 else "increase"
    return MetricSpec(name, kind=kind, direction=direction, role="primary", planned_units=planned)  # type: ignore[arg-type]


def _report(args: argparse.Namespace) -> int:
    from cohortgate.controller.outcomes import OutcomeLedger, keys_from_env, read_journal

    try:
        specs = [_spec(m, args.planned_units) for m in args.metric]
    except ValueError as exc:
        print(f"cohortgate outcomes report: {exc}", file=sys.stderr)
        return 2
    ledger = OutcomeLedger({args.route: specs}, {args.route: args.control}, keys_from_env(), alpha=args.alpha)
    ledger.ingest_many(read_journal(args.journal))
    results = ledger.results(args.route)
    if args.json:
        print(json.dumps({"counts": dict(ledger.counts), "results": [r.to_json() for r in results]}, indent=2))
        return 0
    if not results:
        print(f"no outcomes for route {args.route} with control {args.control} in {args.journal}")
        return 0
    head = f"{'metric':14}{'challenger':14}{'units':>14}{'control':>10}{'challenger':>11}  "
    print(f"{head}{'lift (always valid)':34}verdict")
    for r in results:
        b = r.bounds
        band = f"{r.rel:+.2%} [{b.rel_lo:+.2%}, {b.rel_hi:+.2%}]"
        units = f"{r.units_challenger}/{r.units_control}"
        print(
            f"{r.metric:14}{r.challenger:14}{units:>14}{r.control_value:>10.4g}{r.challenger_value:>11.4g}  "
            f"{band:34}{r.decision.verdict.value}"
        )
    return 0
