"""`cohortgate up`: the whole stack on this machine, in one command.

Builds the demo models and mints certificates and the dev signing key when missing, starts one
sidecar per policy backend that names a local model, the controller, the gateway and Envoy, waits
for each, then prints the endpoints and a copy-paste curl. A child that dies is restarted (with a
backoff; a crash loop is reported and left down) while the others keep serving. Ctrl-C (or
SIGTERM) stops everything, Envoy first, after its drain. Editing the policy file applies live.
``<state-dir>/run.json`` tells scripts where everything is (and how often each child restarted);
``<state-dir>/logs/`` holds each child's log.

With ``--demo`` the canary fails a share of its requests and `cohortgate traffic` runs in the
background (its log: ``<state-dir>/logs/traffic.log``): the controller rolls the canary back
within a minute, on the dashboard, in `cohortgate status --watch` and in this output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cohortgate.core.contract import MAX_GATEWAY_WORKERS, REDIS_ENV
from cohortgate.support.cliargs import add_tracing_options

if TYPE_CHECKING:
    from cohortgate.local.stack import StackOptions

DEMO_FAULT_RATE = 0.3
DEMO_FAULT_AFTER_S = 20.0  # from the canary's first request: long enough to see it healthy on the page


DESCRIPTION = (
    "Run the whole stack on this machine: build the demo models and mint certificates when missing, "
    "start a sidecar per backend that names a local model, the controller, the gateway and Envoy, then "
    "print the endpoints. A child that dies is restarted; Ctrl-C stops everything; edits of the policy "
    "file apply live. STATE-DIR/run.json tells scripts (and cohortgate call, traffic, status) where "
    "everything is; STATE-DIR/logs holds each child's log. With --demo the canary fails a share of its "
    "requests under background traffic, and the controller rolls it back within a minute."
)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the whole stack locally: sidecars, controller, gateway, Envoy",
        description=DESCRIPTION,
    )
    p.add_argument(
        "--policy",
        type=Path,
        default=Path("policies/example.yaml"),
        help="the policy file (default policies/example.yaml); edits apply live",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get(REDIS_ENV) or None,
        help="share state and events through this Redis (default $COHORTGATE_REDIS; none = embedded)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".cohortgate"),
        help="run.json, logs, sockets, the effective policy (default .cohortgate)",
    )
    p.add_argument(
        "--transport",
        choices=("grpc", "http"),
        default="grpc",
        help="how Envoy calls the gateway (default grpc; http is Envoy's work-in-progress http_service)",
    )
    p.add_argument(
        "--canary-fault-rate",
        type=_fraction,
        default=None,
        metavar="F",
        help="demo knob: the canary's sidecars fail this fraction of requests with 500, so "
        f"cohortgate traffic shows an automatic rollback (default 0; {DEMO_FAULT_RATE:g} with --demo)",
    )
    p.add_argument(
        "--canary-fault-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="demo knob: the faulty canary serves healthily this long from its first request "
        f"(default 0; {DEMO_FAULT_AFTER_S:g} with --demo, so the page shows it go bad)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="the demo: a faulty canary (see --canary-fault-rate) and cohortgate traffic in the background, "
        "so the controller rolls the canary back within a minute while you watch",
    )
    p.add_argument(
        "--demo-drift",
        type=_drift_spec,
        default=None,
        metavar="SPEC",
        help="demo knob: the demo traffic plants input drift (cohortgate traffic --drift SPEC, e.g. "
        "feature=0,after=30s,variant=canary) instead of a faulty canary; implies --demo (make demo-quality)",
    )
    p.add_argument(
        "--certs",
        type=Path,
        default=None,
        metavar="DIR",
        help="certificate directory (default: the one holding the policy's jwks file)",
    )
    p.add_argument(
        "--free-ports",
        action="store_true",
        help="take free ports for everything instead of the usual ones (tests, stacks side by side)",
    )
    p.add_argument("--port", type=_port, default=None, help="Envoy's HTTPS port (default 8443, else a free one)")
    p.add_argument(
        "--controller-port", type=_port, default=None, help="the controller API's port (default 9480, else a free one)"
    )
    p.add_argument(
        "--dashboard-port", type=_port, default=None, help="the dashboard's port (default 9481, else a free one)"
    )
    p.add_argument(
        "--gateway-metrics-port",
        type=_port,
        default=None,
        help="the gateway's /metrics and /healthz port (default 9482, else a free one)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        metavar="N",
        help="gateway processor processes (default 1); match --concurrency on a many-core host (docs/performance.md)",
    )
    add_tracing_options(
        p,
        "trace Envoy, the gateway and the sidecars to this OTLP/HTTP collector, http://HOST:PORT (needs the otel "
        "extra; default off)",
        sample="the share of requests without a sampled traceparent to trace",
    )
    p.add_argument(
        "--no-warm-spares",
        dest="warm_spares",
        action="store_false",
        help="restart a dead child cold: no spare Python process per kind with its modules imported ahead",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restart a dead child at most N times a minute; one more exit is a crash loop, left down (default 5)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long each child may take to become ready (default 30)",
    )
    p.set_defaults(func=_up)


def _drift_spec(text: str) -> str:
    """`cohortgate traffic --drift`'s syntax, checked here so a typo fails `up` at once, not its child."""
    from cohortgate.cli.traffic import parse_drift

    parse_drift(text)
    return text


def _up(args: argparse.Namespace) -> int:
    if not args.policy.is_file():  # first, and alone: nothing else is worth saying without a policy
        reason = "no such file" if not args.policy.exists() else "not a file"
        print(f"cohortgate up: cannot read the policy {args.policy}: {reason}", file=sys.stderr)
        return 2
    from cohortgate.local.stack import Stack

    if args.redis and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        print(f"cohortgate up: --redis wants a redis:// URL, got {args.redis!r}", file=sys.stderr)
        return 2
    return Stack(stack_options(args)).run()


def stack_options(args: argparse.Namespace) -> StackOptions:
    """The parsed flags as the stack's options (the demo knobs' defaults resolved)."""
    from cohortgate.local.stack import StackOptions

    faulty = args.demo and not args.demo_drift  # the drift demo's canary is healthy: only its inputs move
    return StackOptions(
        policy=args.policy,
        state_dir=args.state_dir,
        certs_dir=args.certs,
        redis=args.redis,
        transport=args.transport,
        canary_fault_rate=(
            args.canary_fault_rate if args.canary_fault_rate is not None else DEMO_FAULT_RATE if faulty else 0.0
        ),
        canary_fault_after_s=(
            args.canary_fault_after if args.canary_fault_after is not None else DEMO_FAULT_AFTER_S if faulty else 0.0
        ),
        demo=args.demo or bool(args.demo_drift),
        demo_drift=args.demo_drift or "",
        free_ports=args.free_ports,
        envoy_port=args.port,
        controller_port=args.controller_port,
        dashboard_port=args.dashboard_port,
        gateway_metrics_port=args.gateway_metrics_port,
        max_restarts=max(0, args.max_restarts),
        warm_spares=args.warm_spares,
        concurrency=max(1, args.concurrency),
        gateway_workers=min(max(1, args.gateway_workers), MAX_GATEWAY_WORKERS),
        ready_timeout_s=args.ready_timeout,
        otlp_endpoint=args.otlp_endpoint,
        trace_sample=args.trace_sample,
    )
