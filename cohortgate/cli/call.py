"""`cohortgate call MODEL`: one inference through the running stack, as a client app would make it.

Finds the stack as `_stack` says (flags, else `up`'s run.json, else the hand-started defaults),
mints a token with the stack's dev signing key, and POSTs an OIP v2 request to Envoy over mTLS
with the ``app-demo`` certificate. Prints the variant that served it and the response.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cohortgate.cli._args import parse_header
from cohortgate.cli._stack import NoStack, add_gateway_options, add_state_dir, stack_info
from cohortgate.cli.token import parse_claim
from cohortgate.core.contract import HEADER_ROUTE, HEADER_SERVED_BY, HEADER_VARIANT

DESCRIPTION = (
    "Call a model through the running stack as a client app would: mTLS with a client certificate, "
    "a fresh token from the stack's signing key, an OIP v2 infer request. Prints the variant that "
    "answered and the response. The stack is the one cohortgate up runs (its run.json), or, with "
    "--gateway/--certs or without a run.json, one started by hand. Exit status: 0 on success, 1 on "
    "a 4xx or 5xx answer (its JSON error printed), 2 when the stack cannot be reached."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "call",
        help="call a model through the running stack (mTLS + a fresh token) and show the variant",
        description=DESCRIPTION,
    )
    p.add_argument("model", metavar="MODEL", help="OIP model name, e.g. tabular (POST /v2/models/MODEL/infer)")
    p.add_argument("--sub", default="alice", help="the token's subject, i.e. the user (default alice)")
    p.add_argument("--residency", default="eu", help="the residency claim (default eu; '' for none)")
    p.add_argument("--scope", action="append", default=None, metavar="S", help="a scope (default: predict)")
    p.add_argument(
        "--claim",
        action="append",
        default=[],
        type=parse_claim,
        metavar="K=V",
        help="an extra claim, e.g. tier=gold (repeatable)",
    )
    p.add_argument(
        "--input",
        metavar="JSON",
        help="an OIP body, one row of numbers, a list of rows, or @FILE (default: one row of the tabular demo data)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        type=parse_header,
        metavar="K:V",
        help="an extra request header (repeatable)",
    )
    p.add_argument("--client", default="app-demo", help="client certificate name (default app-demo)")
    p.add_argument("--no-token", action="store_true", help="send no Authorization header (expect 401)")
    add_state_dir(p)
    add_gateway_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: status, variant, headers, body")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=_call)


def _call(args: argparse.Namespace) -> int:
    import http.client
    import ssl

    from cohortgate.local.client import StackNotRunning, demo_body, infer_path, parse_input, ssl_context, token_minter

    try:
        info = stack_info(args)
        ctx = ssl_context(info, args.client)
        body = parse_input(args.input) if args.input else demo_body()
    except (NoStack, StackNotRunning, ValueError, OSError, ssl.SSLError) as exc:
        print(f"cohortgate call: {exc}", file=sys.stderr)
        return 2
    headers = {"content-type": "application/json", "accept": "application/json"}
    headers.update(args.header)
    if not args.no_token:
        mint = token_minter(info)
        scopes = args.scope if args.scope is not None else ["predict"]
        token = mint(args.sub, residency=args.residency or None, scopes=scopes, claims=dict(args.claim))
        headers["authorization"] = f"Bearer {token}"

    path = infer_path(args.model)
    started = time.perf_counter()
    conn = http.client.HTTPSConnection(info.host, info.port, context=ctx, timeout=args.timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        print(
            f"cohortgate call: cannot reach {info.gateway_url}{path}: {exc} (is the stack running?)",
            file=sys.stderr,
        )
        return 2
    finally:
        conn.close()
    latency_ms = (time.perf_counter() - started) * 1000
    got = {k.lower(): v for k, v in response.getheaders()}
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    status = response.status
    summary = {
        "status": status,
        "variant": got.get(HEADER_VARIANT),
        "route": got.get(HEADER_ROUTE),
        "served_by": got.get(HEADER_SERVED_BY),
        "request_id": got.get("x-request-id"),
        "latency_ms": round(latency_ms, 2),
    }
    if args.json:
        print(json.dumps({**summary, "headers": got, "body": payload}, indent=2))
    else:
        parts = [f"HTTP {status} {_phrase(status, response.reason)}"]
        parts += [f"{k.replace('_', ' ')}: {summary[k]}" for k in ("variant", "route", "served_by") if summary[k]]
        parts.append(f"{latency_ms:.1f} ms")
        print("  ".join(parts))
        print(payload if isinstance(payload, str) else json.dumps(payload))
    return 0 if status < 400 else 1


def _phrase(status: int, reason: str) -> str:
    """Envoy says "Unknown" for statuses it has no name for (451); Python knows them."""
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return reason
