"""`cohortgate report ROUTE`: an experiment's result as a document to attach to a review.

Three sources, one document (`cohortgate.controller.report`):

* the running controller (default): ``GET /status`` and ``GET /outcomes?route=R`` with the admin
  token, found as `cohortgate status` finds it (flags, else `up`'s run.json, else the defaults);
* ``--journal FILE --policy P``: offline, from an outcome journal, looked at evenly through the
  file so the lift-over-time plot has a history;
* ``--archived [WHEN]``: a finished experiment the controller archived (``experiments/`` in the
  state directory), the latest or the one finished at WHEN (its file's Unix time).

``--format md|html|csv|json`` (default md); ``--out FILE`` writes it there (Markdown's plots as
SVG files beside it, ``FILE-STEM-*.svg``), else it goes to stdout (Markdown then draws each lift as a
text sparkline).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cohortgate.cli._stack import NoStack, add_controller_options, add_state_dir, controller_target, state_dir

FORMATS = ("md", "html", "csv", "json")
OFFLINE_LOOKS = 60  # looks spread through a journal offline: the points of its lift-over-time plot


class ReportError(Exception):
    """Why no report could be made, in a sentence; exit status 2 (usage) or 1 (the controller)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="an experiment's result as a document (md, html, csv, json): design, traffic, SRM, lifts, decision",
        description="Reads the running controller, or a journal offline (--journal with --policy), or the "
        "archive of a finished experiment (--archived).",
    )
    p.add_argument("route", metavar="ROUTE", help="the route's name in the policy")
    p.add_argument("--format", choices=FORMATS, default="md", help="the document's format (default md)")
    p.add_argument("--out", metavar="FILE", default=None, help="write here (md: plots as SVG files beside it)")
    p.add_argument("--journal", metavar="FILE", default=None, help="offline: an outcome journal (with --policy)")
    p.add_argument("--policy", metavar="FILE", default=None, help="offline: the policy declaring the route's metrics")
    p.add_argument(
        "--archived",
        nargs="?",
        const="latest",
        default=None,
        metavar="WHEN",
        help="a finished experiment from the archive: the latest, or the one finished at WHEN (Unix time)",
    )
    p.add_argument("--archive-dir", metavar="DIR", default=None, help="the archive (default: STATE-DIR/experiments)")
    add_state_dir(p)
    add_controller_options(p)
    p.set_defaults(func=_report)


# ---------------------------------------------------------------------- sources


def _get(api: str, token_file: str, path: str) -> Any:
    from cohortgate.support import http

    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise ReportError(
            f"cannot read the admin token {token_file}: {exc.strerror} (is the controller running? "
            "or pass --token-file, or --journal with --policy to work offline)",
            1,
        ) from None
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Cohortgate-Actor": f"cli:{getpass.getuser()}@{socket.gethostname()}",
    }
    try:
        reply = http.call(api + path, headers=headers, timeout=10)
    except OSError as exc:
        raise ReportError(f"cannot reach the controller at {api}: {getattr(exc, 'reason', exc)}", 1) from None
    if reply.status >= 400:
        try:
            err = reply.json()["error"]
            message = f"{err['message']} ({reply.status} {err['code']})"
        except (ValueError, KeyError, TypeError):
            message = f"the controller answered {reply.status}"
        raise ReportError(message, 1)
    return reply.json()


def live_document(args: argparse.Namespace) -> dict[str, Any]:
    from cohortgate.controller import report as R

    try:
        api, token_file = controller_target(args)
    except NoStack as exc:
        raise ReportError(str(exc)) from None
    status = _get(api, token_file, "/status")
    route = (status.get("routes") or {}).get(args.route)
    if route is None:
        known = ", ".join(sorted(status.get("routes") or {})) or "none"
        raise ReportError(f"the controller's policy has no route {args.route!r} (routes: {known})")
    outcomes = _get(api, token_file, f"/outcomes?route={args.route}")
    design = (outcomes.get("design") or {}).get(args.route)
    if design is None:
        raise ReportError(f"route {args.route!r} declares no outcome metrics: nothing to report (docs/outcomes.md)")
    return R.document(
        args.route,
        design=design,
        results=outcomes.get("results") or [],
        history=(outcomes.get("history") or {}).get(args.route) or [],
        status=route,
        counts=outcomes.get("counts"),
        labels=(outcomes.get("labels") or {}).get(args.route) or [],
        srm=route.get("srm"),
        generated_at=time.time(),
        source=f"controller {api}",
    )


def offline_document(args: argparse.Namespace) -> dict[str, Any]:
    """A journal replayed into a ledger, looked at `OFFLINE_LOOKS` times through the file."""
    from cohortgate.controller import report as R
    from cohortgate.controller.gating import attribution_window, metric_specs
    from cohortgate.controller.lift_history import LiftHistory
    from cohortgate.controller.outcomes import OutcomeLedger, keys_from_env, read_journal
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy

    if not args.policy:
        raise ReportError("--journal needs --policy: the policy declares the route's variants and metrics")
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        raise ReportError(str(exc)) from None
    route = policy.by_name.get(args.route)
    if route is None:
        raise ReportError(f"{args.policy} has no route {args.route!r} (routes: {', '.join(policy.by_name)})")
    if not route.metrics:
        raise ReportError(f"route {args.route!r} declares no outcome metrics in {args.policy} (docs/outcomes.md)")
    if not Path(args.journal).exists():
        raise ReportError(f"no such journal: {args.journal}")
    ledger = OutcomeLedger(
        {args.route: metric_specs(policy)[args.route]},
        {args.route: route.control.name},
        keys_from_env(),
        window_s=attribution_window(policy),
    )
    records = list(read_journal(args.journal))
    history = LiftHistory()
    step = max(1, -(-len(records) // OFFLINE_LOOKS))  # ceil: at most OFFLINE_LOOKS looks
    t = 0.0
    results: list[dict[str, Any]] = []
    for i, record in enumerate(records, 1):
        ledger.ingest(record)
        with contextlib.suppress(TypeError, ValueError):  # a record without a usable time keeps the last one
            t = max(t, float(record.get("t") or 0.0))
        if i % step == 0 or i == len(records):
            results = [r.to_json() for r in ledger.results(args.route)]
            history.record(t or float(i), results)
    return R.document(
        args.route,
        design=R.design_of(route, ledger.alpha),
        results=results,
        history=history.series(args.route),
        counts=dict(ledger.counts),
        labels=ledger.labels.results(args.route, route.control.name),
        generated_at=time.time(),
        source=f"journal {args.journal} with policy {args.policy}",
    )


def archived_document(args: argparse.Namespace) -> dict[str, Any]:
    from cohortgate.controller import archive as A

    directory = Path(args.archive_dir) if args.archive_dir else Path(state_dir(args)) / A.ARCHIVE_DIRNAME
    paths = A.archived(directory, args.route)
    if not paths:
        raise ReportError(f"no archived experiment for route {args.route!r} in {directory}")
    if args.archived == "latest":
        path = paths[-1]
    else:
        path = next((p for p in paths if p.stem == args.archived), None)  # type: ignore[assignment]
        if path is None:
            whens = ", ".join(p.stem for p in paths)
            raise ReportError(f"no experiment on route {args.route!r} finished at {args.archived} (archived: {whens})")
    try:
        return A.read(path)
    except ValueError as exc:
        raise ReportError(str(exc)) from None


# ---------------------------------------------------------------------- the command


def _report(args: argparse.Namespace) -> int:
    from cohortgate.controller import report as R

    try:
        if args.archived is not None:
            doc = archived_document(args)
        elif args.journal is not None:
            doc = offline_document(args)
        else:
            doc = live_document(args)
    except ReportError as exc:
        print(f"cohortgate report: {exc}", file=sys.stderr)
        return exc.status
    if args.out is None:
        sys.stdout.write(R.render(doc, args.format))
        return 0
    out = Path(args.out)
    stem = out.stem if args.format == "md" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(R.render(doc, args.format, stem), encoding="utf-8")
    written = [out]
    if stem is not None:
        for name, svg in R.plot_files(doc, stem).items():
            (out.parent / name).write_text(svg, encoding="utf-8")
            written.append(out.parent / name)
    print(f"report on route {args.route}: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
