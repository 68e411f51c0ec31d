"""`cohortgate token`: print an ES256 JWT signed by the local signing key (for local use and tests)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cohortgate.support.durations import parse_duration


def signed_duration(text: str) -> float:
    """``--ttl``: a duration, negative for a token that has already expired (``--ttl=-5m``)."""
    negative = text.strip().startswith("-")
    try:
        value = parse_duration(text.strip().removeprefix("-"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return -value if negative else value


def parse_claim(text: str) -> tuple[str, Any]:
    """``k=v``; ``v`` is read as JSON when it parses (numbers, true, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid claim {text!r}: use KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token",
        help="print a JWT signed by the local signing key",
        description="Print an ES256 JWT signed by the current key in the certificate directory "
        "(its kid in the header), for local use and tests.",
    )
    parser.add_argument("--certs", default="certs", metavar="DIR", help="certificate directory (default certs)")
    parser.add_argument("--sub", required=True, help="the subject (user id)")
    parser.add_argument("--residency", help="the data-residency region claim, e.g. eu")
    parser.add_argument("--scope", action="append", default=[], metavar="S", help="a scope (repeatable)")
    parser.add_argument(
        "--claim", action="append", default=[], type=parse_claim, metavar="K=V", help="an extra claim (repeatable)"
    )
    parser.add_argument(
        "--ttl",
        type=signed_duration,
        default=900.0,
        help="lifetime, e.g. 15m (the default); negative (--ttl=-5m) for a token that expired that long ago",
    )
    parser.add_argument(
        "--expired", action="store_true", help="a token that expired --ttl ago, for testing how it is refused"
    )
    parser.add_argument(
        "--issuer", default="https://auth.cohortgate.local", help="the iss claim (default https://auth.cohortgate.local)"
    )
    parser.add_argument("--audience", default="cohortgate", help="the aud claim (default cohortgate)")
    parser.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    import time

    from cohortgate.deploy import pki

    ttl = abs(args.ttl)
    # An expired token keeps its lifetime and lies in the past: issued 2*ttl ago, expired ttl ago.
    now = time.time() - 2 * ttl if args.expired or args.ttl < 0 else None
    try:
        paths = pki.load_cert_paths(args.certs)
        token = pki.mint_token(
            paths,
            sub=args.sub,
            residency=args.residency,
            scopes=args.scope,
            claims=dict(args.claim),
            ttl_s=ttl,
            issuer=args.issuer,
            audience=args.audience,
            now=now,
        )
    except (ValueError, OSError) as exc:
        print(f"cohortgate token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
