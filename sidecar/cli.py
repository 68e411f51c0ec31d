"""`cohortgate sidecar`: serve one ONNX model over the Open Inference Protocol v2."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cohortgate.support.cliargs import add_tracing_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sidecar",
        help="serve an ONNX model over OIP v2 (REST, binary tensors, dynamic batching)",
        description="Serve one ONNX model over the Open Inference Protocol v2.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model",
        metavar="REF",
        help="the .onnx file, or a reference: file://, https:// or s3:// with @sha256:<hex>, or a signed "
        "store version .../NAME/VERSION (docs/models.md)",
    )
    model.add_argument(
        "--model-file",
        metavar="PATH",
        help="a file holding the reference; when it names another one the model is swapped live",
    )
    p.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="KEY",
        help="ed25519:<base64> or a public-key PEM (repeatable); set: only versions signed by one serve",
    )
    p.add_argument("--kek", metavar="SPEC", help="key-encryption key for sealed models: file:PATH, env:NAME, cmd:CMD")
    p.add_argument("--model-cache", metavar="DIR", help="cache for fetched models (default ~/.cache/cohortgate/models)")
    p.add_argument(
        "--model-max-bytes", type=int, default=4 * 1024**3, metavar="BYTES", help="refuse larger models (default 4 GiB)"
    )
    p.add_argument("--name", help="OIP model name (default: the file's stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also serve OIP v2 gRPC (inference.GRPCInferenceService) on this port (default: REST only)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when onnxruntime offers it, else CPU (default auto)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="onnxruntime intra-op threads (default: all cores but one)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N front processes (HTTP, parsing, contracts) on the port, feeding one model executor through "
        "shared memory; batches form across them (default 1: one process)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        metavar="ROWS",
        help="merge queued requests up to this many rows; 1 turns batching off (default 64)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="wait up to this long from the oldest queued request to fill a batch "
        "(default 0: greedy, take what is queued)",
    )
    p.add_argument(
        "--inline-max-us",
        type=float,
        default=0.0,
        metavar="US",
        help="for one client at a time: a lone one-row request runs on the event loop, without the executor "
        "hop, while the model's lone runs take under this; under concurrent load it stops batching "
        "(default 0: off)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        metavar="N",
        help="requests allowed to wait; beyond it 503 with Retry-After (default 1024)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="larger request bodies get 413 (default 64 MiB)",
    )
    p.add_argument(
        "--report-to",
        metavar="URL",
        help="send shadow-comparison reports to an http(s):// URL or redis://host:port/db?stream=NAME",
    )
    p.add_argument("--variant", help="variant name for reports and the x-cohortgate-served-by header")
    p.add_argument(
        "--report-predictions",
        action="store_true",
        help="reports carry each one-row answer's prediction (top class or value, never the input): "
        "labels imported later give accuracy per variant (docs/outcomes.md)",
    )
    p.add_argument(
        "--contract",
        metavar="FILE",
        help="the model's data contract, a file or the JSON itself "
        "(default: the store manifest's, else M.contract.json beside M.onnx)",
    )
    p.add_argument(
        "--contract-mode",
        choices=("observe", "enforce"),
        help="enforce: inputs breaking the contract get 422; observe: served and counted (default: the contract's)",
    )
    p.add_argument(
        "--quality-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="send a quality report (drift sketches, violations) to --report-to every S seconds (default 10)",
    )
    p.add_argument("--route", help="the policy route this sidecar serves, named in its quality reports")
    p.add_argument(
        "--features-policy",
        metavar="FILE",
        help="join online features as this policy's --features-route declares them (docs/features.md)",
    )
    p.add_argument("--features-route", metavar="ROUTE", help="the route whose features: block this sidecar joins")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="demo knob: fail this fraction of infer requests with 500 (deterministic)",
    )
    p.add_argument(
        "--fault-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="demo knob: serve healthily this long from the first request before --fault-rate applies (default 0)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, wait up to this long for queued requests (default 30)",
    )
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="serve the OIP v2 system shared-memory extension to clients on this host (off: it lets a caller make "
        "the sidecar read and write /dev/shm objects; refused through the gateway; docs/sidecar.md)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "ecs"),
        help="text (default) or ecs (Elastic Common Schema JSON)",
    )
    add_tracing_options(
        p,
        "OTLP/HTTP collector, e.g. http://127.0.0.1:4318: one span per inference (needs the otel extra; off)",
        sample="trace this share of requests that carry no sampled traceparent",
    )
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from cohortgate.support.logs import configure
    from sidecar.model import ModelLoadError
    from sidecar.server import SidecarConfig, serve

    configure("sidecar", args.log_level, args.log_format)
    try:
        config = SidecarConfig(
            model_path=args.model or _reference_in(args.model_file),
            model_file=args.model_file,
            trusted_keys=tuple(args.trusted_key),
            kek=args.kek,
            model_cache_dir=args.model_cache,
            model_max_bytes=args.model_max_bytes,
            name=args.name,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            device=args.device,
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            inline_max_us=args.inline_max_us,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            intra_op_threads=args.threads,
            report_to=args.report_to,
            variant=args.variant,
            report_predictions=args.report_predictions,
            contract=args.contract,
            contract_mode=args.contract_mode,
            quality_interval_s=args.quality_interval,
            route=args.route,
            fault_rate=args.fault_rate,
            fault_after_s=args.fault_after,
            drain_timeout_s=args.drain_timeout,
            otlp_endpoint=args.otlp_endpoint,
            trace_ratio=args.trace_sample,
            features=_features(args.features_policy, args.features_route, args.variant),
            shared_memory=args.shared_memory,
        )
        if args.shared_memory and args.workers != 1:  # each front would hold its own regions
            raise ValueError("--shared-memory is not available with --workers yet")
    except ValueError as exc:
        print(f"cohortgate sidecar: {exc}", file=sys.stderr)
        return 2
    if args.workers != 1:
        from sidecar.workers import check, run_workers

        try:
            check(config, args.workers)
        except ValueError as exc:
            print(f"cohortgate sidecar: {exc}", file=sys.stderr)
            return 2
        return run_workers(config, args.workers, log_level=args.log_level, log_format=args.log_format)
    try:
        _run(serve(config))
    except ModelLoadError as exc:
        print(f"cohortgate sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # port in use, address not available
        print(f"cohortgate sidecar: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _features(policy: str | None, route: str | None, variant: str | None):
    """The join settings of ``route``'s features: block, or None (no block, or one this variant is not in)."""
    if (policy is None) != (route is None):
        raise ValueError("--features-policy and --features-route go together")
    if policy is None:
        return None
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy
    from sidecar.join import JoinSettings

    try:
        compiled = load_policy(policy)
    except PolicyError as exc:
        raise ValueError(f"--features-policy {policy}: {exc}") from None
    found = compiled.by_name.get(route)  # type: ignore[arg-type]
    if found is None:
        raise ValueError(f"--features-route {route!r} is not a route of {policy}")
    if found.features is None:
        raise ValueError(f"route {route!r} of {policy} has no features: block")
    return JoinSettings.from_features(found.features) if found.features.joins(variant) else None


def _reference_in(path: str) -> str:
    from sidecar.server import _read_reference

    try:
        return _read_reference(path)
    except OSError as exc:
        raise ValueError(f"cannot read --model-file {path}: {exc.strerror}") from None


def _run(main) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
