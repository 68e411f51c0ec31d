"""Which stack a client command talks to, decided one way for call, traffic, status and the actions.

1. Flags win: ``--gateway``/``--certs`` for Envoy, ``--api``/``--token-file`` for the controller
   ($COHORTGATE_API and $COHORTGATE_TOKEN_FILE count as those flags).
2. Otherwise ``<state-dir>/run.json``, which `cohortgate up` writes. A stale one (its `up` is gone)
   is an error, never a reason to guess: another stack may hold those ports now. So is a missing one
   when ``--state-dir`` was given: the user named an `up` stack, not the defaults.
3. Otherwise the defaults of a stack started by hand as the README does: Envoy on
   https://127.0.0.1:8443 with certificates in certs/, the controller on http://127.0.0.1:9480 with
   its token in .cohortgate/admin.token (the defaults of `envoy render`, `certs init`, `controller`).

A group whose flag is given never reads run.json, so a half-given group cannot mix two stacks.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cohortgate.core.contract import API_ENV, TOKEN_FILE_ENV

if TYPE_CHECKING:
    from cohortgate.local.client import StackInfo

DEFAULT_STATE_DIR = ".cohortgate"
DEFAULT_GATEWAY = "https://127.0.0.1:8443"
DEFAULT_CERTS = "certs"
DEFAULT_API = "http://127.0.0.1:9480"
DEFAULT_TOKEN_FILE = ".cohortgate/admin.token"


class NoStack(Exception):
    """The command cannot tell which stack to talk to; the message says what to do."""


def add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help=f"where cohortgate up keeps run.json (default {DEFAULT_STATE_DIR})",
    )


def add_gateway_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway",
        metavar="URL",
        default=None,
        help=f"Envoy's HTTPS address for a stack started by hand (default: run.json, else {DEFAULT_GATEWAY})",
    )
    p.add_argument(
        "--certs",
        metavar="DIR",
        default=None,
        help=f"that stack's certificate directory (default: run.json, else {DEFAULT_CERTS})",
    )


def add_controller_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        metavar="URL",
        default=os.environ.get(API_ENV) or None,
        help=f"the controller's API (default: $COHORTGATE_API, run.json, else {DEFAULT_API})",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get(TOKEN_FILE_ENV) or None,
        help=f"the controller's admin token (default: $COHORTGATE_TOKEN_FILE, run.json, else {DEFAULT_TOKEN_FILE})",
    )


def state_dir(args: argparse.Namespace) -> str:
    return args.state_dir or DEFAULT_STATE_DIR


def _run_file(args: argparse.Namespace) -> StackInfo | None:
    """The live stack's run.json; None when there is none; NoStack when it is stale or unreadable,
    or missing from a ``--state-dir`` given explicitly."""
    from cohortgate.local.client import RUN_FILE, StackInfo, StackNotRunning

    directory = state_dir(args)
    if not (Path(directory) / RUN_FILE).exists():
        if args.state_dir is not None:
            raise NoStack(
                f"{Path(directory) / RUN_FILE} not found: start the stack with cohortgate up --state-dir {directory}"
            )
        return None
    try:
        return StackInfo.load(directory)
    except StackNotRunning as exc:
        raise NoStack(f"{exc} (or pass --gateway/--api for a stack started by hand)") from None


def stack_info(args: argparse.Namespace) -> StackInfo:
    """What `call` and `traffic` need: Envoy's address, the CA, client certificates, the signing key."""
    from cohortgate.local.client import StackInfo

    explicit = args.gateway is not None or args.certs is not None
    info = None if explicit else _run_file(args)
    if info is not None and getattr(args, "api", None) is None and getattr(args, "token_file", None) is None:
        return info
    if explicit or info is None:  # a stack started by hand: its controller by flag or default
        api = (getattr(args, "api", None) or DEFAULT_API).rstrip("/")
        token_file = getattr(args, "token_file", None) or DEFAULT_TOKEN_FILE
    else:  # up's Envoy, but another controller named by flag
        api, token_file = controller_target(args, info)
        return replace(info, controller_api=api, raw={**info.raw, "admin_token_file": token_file})
    from cohortgate.deploy import pki

    url = args.gateway or DEFAULT_GATEWAY
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise NoStack(f"--gateway wants https://HOST:PORT (Envoy's mTLS listener), got {url!r}")
    try:
        paths = pki.load_cert_paths(args.certs or DEFAULT_CERTS)
    except FileNotFoundError as exc:
        where = "" if explicit else f" (no {state_dir(args)}/run.json either: is `cohortgate up` running?)"
        raise NoStack(f"{exc}{where}") from None
    return StackInfo(
        gateway_url=url,
        host=parts.hostname,
        port=parts.port or 443,
        ca=paths.ca_cert,
        certs_dir=paths.dir,
        clients=paths.clients,
        controller_api=api,
        raw={"endpoints": {"gateway": url, "controller_api": api}, "admin_token_file": token_file},
    )


def controller_target(args: argparse.Namespace, info: StackInfo | None = None) -> tuple[str, str]:
    """``(api, token_file)`` for `status`, `rollback`, `promote`, `resume` (and `traffic`'s audit reads)."""
    if args.api is not None or args.token_file is not None:
        return (args.api or DEFAULT_API).rstrip("/"), args.token_file or DEFAULT_TOKEN_FILE
    if info is None:
        info = _run_file(args)
    if info is not None and info.controller_api:
        return info.controller_api.rstrip("/"), str(info.raw.get("admin_token_file") or DEFAULT_TOKEN_FILE)
    return DEFAULT_API, DEFAULT_TOKEN_FILE
