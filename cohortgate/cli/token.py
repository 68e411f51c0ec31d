"""`cohortgate token`: print an ES256 JWT signed by the local signing key (for local use and tests)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cohortgate.support.durations import duration_arg


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
        "(`kid` header set), for local use and tests.",
    )
    parser.add_argument("--certs", default="certs", metavar="DIR", help="certificate directory")
    parser.add_argument("--sub", required=True, help="the subject (user id)")
    parser.add_argument("--residency", help="the data-residency region claim, e.g. eu")
    parser.add_argument("--scope", action="append", default=[], metavar="S", help="a scope (repeatable)")
    parser.add_argument("--claim", action="append", default=[], type=parse_claim, metavar="K=V", help="an extra claim")
    parser.add_argument("--ttl", type=duration_arg, default=900.0, help="lifetime, e.g. 15m (default)")
    parser.add_argument("--issuer", default="https://auth.cohortgate.local", help="the iss claim")
    parser.add_argument("--audience", default="cohortgate", help="the aud claim")
    parser.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    from cohortgate.deploy import pki

    try:
        paths = pki.load_cert_paths(args.certs)
        token = pki.mint_token(
            paths,
            sub=args.sub,
            residency=args.residency,
            scopes=args.scope,
            claims=dict(args.claim),
            ttl_s=args.ttl,
            issuer=args.issuer,
            audience=args.audience,
        )
    except (ValueError, OSError) as exc:
        print(f"cohortgate token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
