"""`cohortgate policy validate|explain|diff|apply|schema`: the platform team's view of a policy file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cohortgate.cli._args import parse_header
from cohortgate.support.files import write_atomic


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policy", help="validate, explain and document policy files")
    cmds = parser.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    validate = cmds.add_parser("validate", help="check policy files; exit 1 listing every problem")
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy files to check")
    validate.set_defaults(func=_validate)

    explain = cmds.add_parser("explain", help="show the decision for one request, step by step")
    explain.add_argument("file", metavar="FILE", help="the policy file")
    explain.add_argument("--path", required=True, help="request path, e.g. /v2/models/tabular/infer")
    explain.add_argument("--method", default="POST", help="the request method (default POST)")
    explain.add_argument("--sub", help="the token's sub claim")
    explain.add_argument("--residency", help="the token's residency claim")
    explain.add_argument("--scope", action="append", default=[], help="a scope the token carries")
    explain.add_argument("--identity", help="the client certificate's SPIFFE ID")
    explain.add_argument(
        "--header", action="append", default=[], type=parse_header, metavar="K:V", help="a request header (repeatable)"
    )
    explain.add_argument("--claim", action="append", default=[], metavar="K=V", help="an extra claim (repeatable)")
    explain.add_argument("--request-id", default="explain-0", help="drives shadow sampling")
    explain.add_argument("--no-token", action="store_true", help="explain an unauthenticated request")
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")
    explain.set_defaults(func=_explain)

    diff = cmds.add_parser("diff", help="what a change does: routes, weights, backends, users moved")
    diff.add_argument("old", metavar="OLD", help="the policy file serving now")
    diff.add_argument("new", metavar="NEW", help="the edited policy file")
    diff.add_argument("--json", action="store_true", help="print the changes as JSON")
    diff.set_defaults(func=_diff)

    apply = cmds.add_parser("apply", help="validate FILE, then replace the live policy atomically")
    apply.add_argument("file", metavar="FILE", help="the new policy file")
    apply.add_argument(
        "--to",
        default="policies/live.yaml",
        metavar="LIVE",
        help="the file gateways watch (default policies/live.yaml)",
    )
    apply.set_defaults(func=_apply)

    schema = cmds.add_parser("schema", help="print the policy file's JSON Schema")
    schema.set_defaults(func=_schema)


def _validate(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy

    failed = False
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed = True
            print("\n".join(exc.problems), file=sys.stderr)
            continue
        for warning in missing_models(policy):
            print(f"{path}: warning: {warning}", file=sys.stderr)
        variants = sum(len(r.variants) for r in policy.routes)
        shadows = sum(len(r.shadows) for r in policy.routes)
        regions = sorted({b.region for b in policy.backends})
        print(
            f"{path}: ok: {len(policy.routes)} routes, {variants} variants, {shadows} shadows, "
            f"{len(policy.backends)} backends, regions {', '.join(regions)}"
        )
    return 1 if failed else 0


def missing_models(policy: Any) -> list[str]:
    """A backend's ``model:`` file that is not there: valid YAML, but `up` could not serve it."""
    from pathlib import Path

    out: dict[str, None] = {}  # a variant's backends in two regions often share one file
    for route in policy.routes:
        for kind, arms in (("variant", route.variants), ("shadow", route.shadows)):
            for arm in arms:
                for b in arm.backends:
                    if b.model is not None and not Path(b.model).is_file():
                        out[
                            f"route {route.name} {kind} {arm.name}: model file {b.model} is missing "
                            "(cohortgate models build writes the demo models)"
                        ] = None
    return list(out)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"cohortgate: {what} {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _explain(args: argparse.Namespace) -> int:
    from cohortgate.core.decide import Facts, decide
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    claims: dict[str, Any] | None = None
    if not args.no_token:
        claims = _pairs(args.claim, "--claim")
        if args.sub is not None:
            claims["sub"] = args.sub
        if args.residency is not None:
            claims["residency"] = args.residency
        if args.scope:
            claims["scope"] = " ".join(args.scope)
    headers = dict(args.header)
    path = args.path.split("?", 1)[0]
    facts = Facts(args.method.upper(), path, headers, args.identity, claims, args.request_id)
    decision = decide(policy, facts, trace=True)
    if args.json:
        print(json.dumps(_as_json(decision), indent=2))
    else:
        print(f"{facts.method} {facts.path}")
        for i, step in enumerate(decision.trace, 1):
            print(f"  {i}. {step}")
        if decision.allowed:
            shadows = ", ".join(decision.shadow_names) or "none"
            print(
                f"=> allow: route {decision.route}, variant {decision.variant}, cluster {decision.cluster}, "
                f"region {decision.region}, shadows {shadows}"
            )
        else:
            assert decision.denial is not None
            print(f"=> deny {decision.denial.status} {decision.denial.code}: {decision.message}")
    return 0


def _as_json(decision: Any) -> dict[str, Any]:
    denial = decision.denial
    return {
        "allowed": decision.allowed,
        "status": decision.status,
        "error": {"code": denial.code, "message": decision.message} if denial else None,
        "route": decision.route,
        "variant": decision.variant,
        "cluster": decision.cluster,
        "region": decision.region,
        "bucket": decision.bucket,
        "assignment": decision.assignment or None,
        "fallback_to_control": decision.fallback,
        "shadows": [{"name": n, "cluster": c} for n, c in zip(decision.shadow_names, decision.shadows, strict=True)],
        "steps": list(decision.trace),
    }


def _schema(args: argparse.Namespace) -> int:
    from cohortgate.core.schema import PolicyModel

    print(json.dumps(PolicyModel.model_json_schema(by_alias=True), indent=2))
    return 0


def _diff(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy
    from cohortgate.core.policydiff import diff

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    result = diff(old, new)
    if args.json:
        print(
            json.dumps(
                {
                    "global": list(result.global_changes),
                    "added_routes": list(result.added),
                    "removed_routes": list(result.removed),
                    "routes": [
                        {
                            "name": r.name,
                            "changes": list(r.changes),
                            "moved_share": r.moved_share,
                            "moves": [{"from": a, "to": b, "share": s} for a, b, s in r.moves],
                        }
                        for r in result.routes
                        if r.changes
                    ],
                },
                indent=2,
            )
        )
    else:
        print("\n".join(result.lines()))
    return 0


def _apply(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy

    source, live = Path(args.file), Path(args.to)
    try:
        load_policy(source)
    except PolicyError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(f"refused: {live} keeps its current policy", file=sys.stderr)
        return 1
    write_atomic(live, source.read_bytes())  # watchers see the old file or the new one, never half of one
    print(f"applied {source} -> {live}")
    return 0
