"""`cohortgate gateway`: run the ext_proc processor beside Envoy (`gateway.service`)."""

from __future__ import annotations

import argparse
import sys

from cohortgate.core.contract import MAX_GATEWAY_WORKERS, MAX_REQUEST_BYTES
from cohortgate.support.cliargs import add_tracing_options


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    suffix = value[-1:] if value[-1:] in units else ""
    try:
        number = int(value[: len(value) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1048576, 512k or 16m") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return number * units[suffix]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the ext_proc gateway that Envoy consults on every request",
        description="Verify the JWT and SPIFFE identity of every request Envoy forwards, decide its "
        "route, variant and shadows under the policy, and answer with routing headers or a JSON denial. "
        "The policy file is watched (and SIGHUP reloads it); a bad file keeps the old policy. "
        "With --envoy-cds/--envoy-admin new clusters reach Envoy, confirmed, before the policy naming them.",
    )
    parser.add_argument("--policy", required=True, metavar="P", help="the policy file")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processor processes, one event loop and Unix socket each (PATH.w0 .. PATH.wN-1: render "
        "Envoy with --processor-workers N); the parent reloads the policy, sums /metrics, restarts workers",
    )
    parser.add_argument("--certs", metavar="DIR", help="certificate directory (TCP listens with mTLS)")
    parser.add_argument(
        "--transport",
        choices=("grpc", "http"),
        default="grpc",
        help="grpc: the standard ExternalProcessor service (default); http: Envoy's http_service "
        "(work in progress in Envoy 1.40, opt-in)",
    )
    parser.add_argument(
        "--grpc-server",
        choices=("grpcio", "fast"),
        default="fast",
        help="the gRPC server: fast (default; cohortgate's own HTTP/2 server, ~45 µs a decision) or grpcio "
        "(the reference implementation, ~200 µs)",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        help="uds:PATH or tcp:HOST:PORT (default uds:.cohortgate/processor.sock, as envoy render assumes)",
    )
    parser.add_argument(
        "--audit-log", default="-", metavar="FILE", help="JSON audit lines: a file, - for stdout (default)"
    )
    parser.add_argument("--no-audit", action="store_true", help="write no audit trail")
    parser.add_argument(
        "--max-body", type=_size, default=MAX_REQUEST_BYTES, metavar="SIZE", help="largest request body (default 16m)"
    )
    parser.add_argument("--trust-domain", help="accept client SPIFFE IDs from this trust domain only")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="follow the controller's effective weights in this Redis (they override the file's weights)",
    )
    parser.add_argument(
        "--state-file",
        metavar="PATH",
        help="follow the embedded controller's state file; with --redis, a local copy kept across restarts",
    )
    parser.add_argument(
        "--metrics", type=_host_port, metavar="HOST:PORT", help="serve /metrics (Prometheus) and /healthz here"
    )
    parser.add_argument(
        "--watch-interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="check the policy file for changes this often (default 0.5; 0: reload on SIGHUP only)",
    )
    parser.add_argument(
        "--envoy-cds",
        metavar="PATH",
        help="Envoy's filesystem-CDS file (cds.yaml): a reload adds new clusters there first (needs --envoy-admin)",
    )
    parser.add_argument(
        "--envoy-xds",
        metavar="PATH",
        help="serve Envoy delta CDS on this Unix socket (render Envoy with --xds-socket PATH): a reload sends only "
        "the changed clusters and waits for Envoy's ACK (--envoy-admin, optional here, checks DNS clusters warmed)",
    )
    parser.add_argument(
        "--envoy-admin",
        metavar="URL",
        help="Envoy's admin URL, e.g. http://127.0.0.1:9901: new clusters are confirmed before the swap",
    )
    parser.add_argument(
        "--reload-grace",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="clusters a reload drops stay in Envoy this long, for requests in flight (default 2)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="logging level (default info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "ecs"),
        help="service log and audit lines: text (default) or ecs (Elastic Common Schema JSON, docs/observability.md)",
    )
    add_tracing_options(
        parser,
        "OTLP/HTTP collector, e.g. http://127.0.0.1:4318: one span per decision (needs the otel extra; off by default)",
        sample="trace this share of requests that carry no sampled traceparent",
    )
    parser.set_defaults(func=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import PolicyError
    from cohortgate.support.logs import configure
    from gateway.service import GatewayConfig, ListenAddress, default_socket_path, run

    configure("gateway", args.log_level, args.log_format)
    try:
        listen = ListenAddress.parse(args.listen) if args.listen else ListenAddress(uds=default_socket_path())
    except ValueError as exc:
        print(f"cohortgate gateway: {exc}", file=sys.stderr)
        return 2
    config = GatewayConfig(
        policy_path=args.policy,
        listen=listen,
        transport=args.transport,
        grpc_server=args.grpc_server,
        certs_dir=args.certs,
        audit_log=None if args.no_audit else args.audit_log,
        audit_format="ecs" if args.log_format == "ecs" else "json",
        otlp_endpoint=args.otlp_endpoint,
        trace_ratio=args.trace_sample,
        max_body_bytes=args.max_body,
        trust_domain=args.trust_domain,
        redis_url=args.redis,
        state_file=args.state_file,
        metrics_listen=args.metrics,
        watch_s=max(0.0, args.watch_interval),
        envoy_cds=args.envoy_cds,
        envoy_admin=args.envoy_admin,
        envoy_xds=args.envoy_xds,
        reload_grace_s=max(0.0, args.reload_grace),
    )
    if args.envoy_xds is not None and args.envoy_cds is not None:
        print("cohortgate gateway: give --envoy-xds or --envoy-cds, not both", file=sys.stderr)
        return 2
    if args.envoy_xds is None and (args.envoy_cds is None) != (args.envoy_admin is None):
        print("cohortgate gateway: --envoy-cds and --envoy-admin go together", file=sys.stderr)
        return 2
    if not 1 <= args.workers <= MAX_GATEWAY_WORKERS:
        print(f"cohortgate gateway: --workers must be 1 to {MAX_GATEWAY_WORKERS}", file=sys.stderr)
        return 2
    if args.workers > 1 and listen.uds is None:
        print("cohortgate gateway: --workers needs --listen uds:PATH (one socket per worker)", file=sys.stderr)
        return 2
    try:
        if args.workers > 1:
            from gateway.workers import run_workers

            return run_workers(config, args.workers, log_level=args.log_level, log_format=args.log_format)
        return run(config)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"cohortgate gateway: {exc}", file=sys.stderr)
        return 1
