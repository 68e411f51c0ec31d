"""`cohortgate certs`: mint the local CA, TLS certificates and JWT signing key (`cohortgate.deploy.pki`)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("certs", help="mint local mTLS certificates and the JWT signing key")
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    init = sub.add_parser(
        "init",
        help="create whatever is missing in the certificate directory",
        description="Mint a CA, Envoy's and the processor's certificates, one client certificate per "
        "--client (URI SAN spiffe://TRUST-DOMAIN/NAME), an ES256 JWT signing key and jwks.json. "
        "Existing files are kept unless --force.",
    )
    init.add_argument("--dir", default="certs", help="output directory (default: certs)")
    init.add_argument(
        "--trust-domain", default="cohortgate.local", help="the SPIFFE trust domain (default cohortgate.local)"
    )
    init.add_argument(
        "--client",
        action="append",
        metavar="NAME",
        help="a client identity to mint (repeatable; default: app-demo and qa)",
    )
    init.add_argument("--force", action="store_true", help="regenerate everything")
    init.set_defaults(func=_init)

    rotate = sub.add_parser(
        "rotate-jwt",
        help="make a new JWT signing key current, keeping the previous one in jwks.json",
    )
    rotate.add_argument("--dir", default="certs", help="certificate directory (default: certs)")
    rotate.add_argument("--keep", type=int, default=2, help="keys kept in jwks.json (default: 2)")
    rotate.set_defaults(func=_rotate)


def _init(args: argparse.Namespace) -> int:
    from cohortgate.deploy import pki

    written: list[str] = []
    clients = args.client if args.client else pki.DEFAULT_CLIENTS
    try:
        paths = pki.init_certs(
            args.dir, args.trust_domain, clients, force=args.force, on_write=lambda p: written.append(str(p))
        )
    except (ValueError, OSError) as exc:
        print(f"cohortgate certs init: {exc}", file=sys.stderr)
        return 2
    for path in dict.fromkeys(written):
        print(f"wrote {path}")
    if not written:
        print(f"{paths.dir}: everything already present (use --force to regenerate)")
    for name in paths.clients:
        print(f"client {name}: {paths.spiffe_id(name)}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from cohortgate.deploy import pki

    try:
        kid = pki.rotate_jwt_key(args.dir, keep=args.keep)
    except (ValueError, OSError) as exc:
        print(f"cohortgate certs rotate-jwt: {exc}", file=sys.stderr)
        return 2
    print(f"new signing key {kid}; previous key kept in jwks.json for verification")
    return 0
