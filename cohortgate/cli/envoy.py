"""`cohortgate envoy render`: write Envoy's bootstrap and CDS files for a policy.

The bootstrap is static (listener, ext_proc filter, processor cluster); the policy's clusters go to
``cds.yaml``, which a running Envoy re-reads when it is replaced. Paths are written as given, so
relative ``--certs`` and ``--out`` resolve against the directory Envoy is started from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from cohortgate.cli.gateway import _size
from cohortgate.deploy.envoy.bootstrap import MAX_REQUEST_BYTES
from cohortgate.deploy.envoy.extproc import MESSAGE_TIMEOUT
from cohortgate.support.cliargs import add_tracing_options
from cohortgate.support.durations import duration_arg

DEFAULT_OUT = ".cohortgate/envoy"
DEFAULT_PROCESSOR = "uds:.cohortgate/processor.sock"


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("envoy", help="render Envoy's configuration from a policy")
    sub = group.add_subparsers(dest="envoy_command", required=True, metavar="ACTION")

    render = sub.add_parser(
        "render",
        help="write bootstrap.yaml (static) and cds.yaml (the policy's clusters) into --out",
        description="Write Envoy's bootstrap (listener, ext_proc filter, processor cluster: static) and cds.yaml "
        "(the policy's clusters, which a running Envoy re-reads when the file is replaced) into --out. Paths "
        "are written as given, so relative --certs and --out resolve against the directory Envoy starts in.",
    )
    render.add_argument("--policy", required=True, type=Path, help="the policy file")
    render.add_argument(
        "--certs",
        default=Path("certs"),
        type=Path,
        help="the certificate directory from cohortgate certs init (default certs)",
    )
    render.add_argument(
        "--transport",
        choices=("grpc", "http"),
        default="grpc",
        help="how Envoy calls the processor: gRPC ext_proc (default) or the work-in-progress http_service",
    )
    render.add_argument(
        "--processor",
        default=DEFAULT_PROCESSOR,
        metavar="uds:PATH|tcp:HOST:PORT",
        help=f"where the processor listens (default {DEFAULT_PROCESSOR}); TCP off loopback uses mTLS",
    )
    render.add_argument(
        "--processor-workers",
        type=int,
        default=1,
        metavar="N",
        help="the gateway runs N worker processes (cohortgate gateway --workers N): one endpoint each, "
        "on the --processor socket's PATH.w0 .. PATH.wN-1 (default 1: PATH itself)",
    )
    render.add_argument(
        "--processor-tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force mTLS to a TCP processor on or off (default: on unless the host is loopback)",
    )
    render.add_argument("--listen-port", type=int, default=8443, help="the HTTPS (mTLS) listener's port (default 8443)")
    render.add_argument("--listen-address", default="127.0.0.1", help="the listener's address (default 127.0.0.1)")
    render.add_argument(
        "--admin-port", type=int, default=9901, help="the admin port, always on 127.0.0.1 (default 9901)"
    )
    render.add_argument(
        "--admin-socket",
        default=None,
        metavar="PATH",
        help="put admin on this Unix socket instead, mode 0600 so only Envoy's user can use it",
    )
    render.add_argument(
        "--processor-timeout",
        type=duration_arg,
        default=MESSAGE_TIMEOUT.total_seconds(),
        metavar="DURATION",
        help=f"how long a request waits for the processor before a 503 (default {MESSAGE_TIMEOUT.total_seconds():g}s); "
        "shorter fails faster when it hangs, but a busy host then refuses requests",
    )
    render.add_argument(
        "--max-body",
        type=_size,
        default=MAX_REQUEST_BYTES,
        metavar="SIZE",
        help="the largest request body, whatever its framing (default 16m); give the gateway the same --max-body",
    )
    render.add_argument(
        "--access-log",
        default=None,
        metavar="uds:PATH|tcp:HOST:PORT",
        help="stream access logs to a gRPC access-log service there (default off)",
    )
    render.add_argument(
        "--concurrency", type=int, default=None, help="the Envoy workers you will run with (--concurrency)"
    )
    add_tracing_options(
        render,
        "Envoy's OpenTelemetry tracer exports to this OTLP/HTTP collector, http://HOST:PORT (default off)",
        sample="start a trace for this share of requests without a traceparent; a client's sampled flag is kept",
    )
    render.add_argument("--upstream-ca", default=None, help="a CA bundle for https backends (default: the system's)")
    render.add_argument(
        "--xds-socket",
        default=None,
        metavar="PATH",
        help="take the policy's clusters from the gateway's delta CDS on this Unix socket (cohortgate gateway "
        "--envoy-xds PATH) instead of the CDS file",
    )
    render.add_argument(
        "--out", default=Path(DEFAULT_OUT), type=Path, help=f"the output directory (default {DEFAULT_OUT})"
    )
    render.add_argument("--validate", action="store_true", help="run envoy --mode validate on the result")
    render.set_defaults(func=_render)


def _cert_paths(directory: Path):
    from cohortgate.deploy import pki

    try:
        return pki.load_cert_paths(directory)
    except FileNotFoundError:
        # Rendering does not read the files, so it works before `certs init` (and in a clean
        # clone, for envoy/example); Envoy needs them only when it starts.
        print(f"note: {directory} is not initialised; run `cohortgate certs init --dir {directory}`", file=sys.stderr)
        return pki._layout(directory, pki.DEFAULT_TRUST_DOMAIN)


def _render(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy import envoy as envoyconf

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    try:
        processor = envoyconf.ProcessorAddress.parse(
            args.processor, tls=args.processor_tls, workers=args.processor_workers
        )
        access_log = envoyconf.AccessLogTarget.parse(args.access_log) if args.access_log else None
        tracing = envoyconf.TraceCollector.parse(args.otlp_endpoint, args.trace_sample) if args.otlp_endpoint else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = envoyconf.render(
        policy,
        certs=_cert_paths(args.certs),
        out_dir=args.out,
        processor=processor,
        transport=args.transport,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        admin_socket=args.admin_socket,
        access_log=access_log,
        concurrency=args.concurrency,
        listen_address=args.listen_address,
        upstream_ca=args.upstream_ca,
        message_timeout=dt.timedelta(seconds=args.processor_timeout),
        max_request_bytes=args.max_body,
        tracing=tracing,
        xds_socket=args.xds_socket,
    )
    print(files.bootstrap)
    print(files.cds)
    if args.validate:
        from cohortgate.deploy.envoyproc import EnvoyConfigError, validate

        try:
            validate(files.bootstrap)
        except EnvoyConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print("valid", file=sys.stderr)
    return 0
