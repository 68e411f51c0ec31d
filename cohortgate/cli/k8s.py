"""`cohortgate k8s render`: Kubernetes manifests (a Kustomize directory) rendered from a policy.

Plain manifests by default: the edge (Envoy + gateway in one pod, a Unix socket between them), one
Deployment + Service per model-backed backend pinned to its region, the controller, NetworkPolicies,
cert-manager Certificates and a ConfigMap holding the policy. With ``--mesh`` the edge is replaced
by the resources that make Envoy Gateway's or Istio's own Envoy call cohortgate's processor.
Nothing secret is ever written: certificates, the unit salt and Redis credentials come from Secrets
the cluster already holds (see docs/scaling.md). Apply with ``kubectl apply -k OUT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cohortgate.support.cliargs import add_tracing_options
from cohortgate.support.durations import duration_arg

DEFAULT_OUT = "deploy/k8s"
DESCRIPTION = (
    "Render Kubernetes manifests from a policy as a Kustomize directory: the edge (Envoy and the gateway "
    "in one pod), a Deployment and Service per model backend pinned to its region, the controller, "
    "NetworkPolicies, cert-manager Certificates and the policy as a ConfigMap. With --mesh, the resources "
    "that make Envoy Gateway's or Istio's own Envoy call the processor instead of the edge. Nothing secret "
    "is written: certificates, the unit salt and Redis credentials come from Secrets the cluster holds "
    "(docs/scaling.md). Apply with kubectl apply -k OUT."
)


def _route_name(text: str) -> tuple[str, str]:
    route, sep, name = text.partition("/")
    if not sep or not route or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: use ROUTE/VARIANT (or ROUTE/SHADOW)")
    return route, name


def _region(text: str) -> tuple[str, tuple[str, ...]]:
    region, sep, values = text.partition("=")
    parts = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not region or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: use POLICY_REGION=NODE_REGION[,NODE_REGION...]")
    return region, parts


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE")
    return key, value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of workers, or auto") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("k8s", help="render Kubernetes manifests from a policy")
    sub = group.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "render",
        help="write a Kustomize directory (kubectl apply -k OUT)",
        description=DESCRIPTION,
    )
    p.add_argument("--policy", required=True, type=Path, help="the policy file")
    p.add_argument("--namespace", default=None, help="namespace for everything (default cohortgate)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--image", default=None, help="the cohortgate image (default cohortgate:VERSION)")
    p.add_argument("--mesh", choices=("envoy-gateway", "istio"), default=None,
                   help="hook into an existing mesh's Envoy instead of rendering cohortgate's edge")
    p.add_argument("--mesh-gateway", metavar="NS/NAME", default=None,
                   help="the Gateway (envoy-gateway, default NAMESPACE/eg) or Istio Gateway "
                        "(istio, default istio-system/cohortgate) to attach to")
    p.add_argument("--istio-selector", metavar="KEY=VALUE", type=_label, action="append", default=None,
                   help="labels of the Istio ingress gateway pods (default istio=ingressgateway)")
    redis = p.add_mutually_exclusive_group()
    redis.add_argument("--with-redis", action="store_true", help="run a one-replica Redis StatefulSet (trials)")
    redis.add_argument("--redis-url", default=None, metavar="URL",
                       help="external Redis without credentials (else its URL comes from --redis-secret)")
    p.add_argument("--redis-secret", default=None, metavar="NAME",
                   help="the Secret whose key url holds the Redis URL (default cohortgate-redis)")
    p.add_argument("--gpu-variant", type=_route_name, action="append", default=[], metavar="ROUTE/VARIANT",
                   help="serve this variant (or shadow) on a GPU: nvidia.com/gpu and the GPU taint's toleration")
    p.add_argument("--transport", choices=("grpc", "http"), default="grpc", help="Envoy -> gateway (edge only)")
    p.add_argument("--grpc-server", choices=("grpcio", "fast"), default="fast", help="the gateway's gRPC server")
    p.add_argument("--processor-timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="how long a request waits for the processor before a 503 (default 1s)")
    p.add_argument("--target-rps", type=int, default=1000, metavar="N",
                   help="requests per second one edge pod is sized for (default 1000)")
    p.add_argument("--gateway-workers", type=_workers, default="auto", metavar="N|auto",
                   help="gateway processes per edge pod (cohortgate gateway --workers N; Envoy's --concurrency "
                        "follows); auto (the default): as many as the gateway's CPU request for --target-rps needs")
    p.add_argument("--sidecar-cpu", default=None, metavar="CPU",
                   help="each sidecar's CPU request and limit, e.g. 4 or 2500m (its onnxruntime threads: the "
                        "limit's cores but one); default: a request of 1, no limit, one thread")
    p.add_argument("--min-replicas", type=int, default=2, help="HPA minimum (default 2)")
    p.add_argument("--max-replicas", type=int, default=10, help="HPA maximum (default 10)")
    p.add_argument("--region", type=_region, action="append", default=[], metavar="POLICY=NODE[,NODE]",
                   help="map a policy region to topology.kubernetes.io/region values (default: the same name)")
    p.add_argument("--edge-region", default=None, metavar="REGION",
                   help="pin the edge, controller and Redis to this policy region (one edge per region)")
    p.add_argument("--host", action="append", default=[], metavar="DNS",
                   help="a name clients use: on the edge certificate / the mesh routes")
    p.add_argument("--trust-domain", default="cohortgate.local", help="SPIFFE trust domain")
    issuer = p.add_mutually_exclusive_group()
    issuer.add_argument("--issuer", default=None, metavar="NAME", help="cert-manager Issuer (default cohortgate-ca)")
    issuer.add_argument("--cluster-issuer", default=None, metavar="NAME", help="cert-manager ClusterIssuer")
    p.add_argument("--models-pvc", default="cohortgate-models", help="PVC holding the .onnx files, mounted read-only")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    add_tracing_options(
        p,
        "an OTLP/HTTP collector (http://HOST:PORT) for Envoy's tracer, the gateway, the sidecars and the controller",
        sample="the share of requests Envoy starts a trace for; the others follow its traceparent",
    )
    p.set_defaults(func=_render)


def _options(args: argparse.Namespace):
    from cohortgate.deploy.k8s.options import (
        DEFAULT_IMAGE,
        DEFAULT_NAMESPACE,
        DEFAULT_REDIS_SECRET,
        Mesh,
        RenderOptions,
    )

    issuer_kind, issuer_name = None, "cohortgate-ca"
    if args.issuer:
        issuer_kind, issuer_name = "Issuer", args.issuer
    elif args.cluster_issuer:
        issuer_kind, issuer_name = "ClusterIssuer", args.cluster_issuer
    extra = {}
    if args.istio_selector:
        extra["istio_selector"] = tuple(args.istio_selector)
    if args.processor_timeout is not None:
        extra["processor_timeout_s"] = args.processor_timeout
    return RenderOptions(
        namespace=args.namespace or DEFAULT_NAMESPACE,
        image=args.image or DEFAULT_IMAGE,
        mesh=Mesh(args.mesh) if args.mesh else None,
        with_redis=args.with_redis,
        redis_url=args.redis_url,
        redis_secret=args.redis_secret or DEFAULT_REDIS_SECRET,
        gpu=frozenset(args.gpu_variant),
        transport=args.transport,
        grpc_server=args.grpc_server,
        target_rps_per_pod=args.target_rps,
        gateway_workers=args.gateway_workers,
        sidecar_cpu=args.sidecar_cpu,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cluster_domain=args.cluster_domain,
        trust_domain=args.trust_domain,
        issuer_kind=issuer_kind,
        issuer_name=issuer_name,
        hosts=tuple(args.host),
        region_labels=dict(args.region),
        edge_region=args.edge_region,
        models_pvc=args.models_pvc,
        mesh_gateway=args.mesh_gateway,
        otlp_endpoint=args.otlp_endpoint,
        trace_sample=args.trace_sample,
        **extra,
    )


def _render(args: argparse.Namespace) -> int:
    from cohortgate.core.errors import PolicyError
    from cohortgate.core.policy import load_policy

    try:
        options = _options(args)
    except ValueError as exc:
        print(f"cohortgate k8s render: {exc}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy)
        raw = args.policy.read_bytes()
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    try:
        from cohortgate.deploy.k8s.render import render, write
    except ImportError as exc:  # the optional `k8s` extra
        print(f"cohortgate k8s render: {exc.name} is missing; pip install 'cohortgate[k8s]'", file=sys.stderr)
        return 2
    if options.edge_region is not None and options.edge_region not in {b.region for b in policy.backends}:
        print(f"cohortgate k8s render: --edge-region {options.edge_region!r} is no region of the policy",
              file=sys.stderr)
        return 2
    try:
        rendered = render(policy, raw, options, source=args.policy.name)
    except ValueError as exc:  # PlanError, sizing limits
        print(f"cohortgate k8s render: {exc}", file=sys.stderr)
        return 2
    for warning in rendered.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in write(rendered, args.out):
        print(path)
    return 0
