"""What `cohortgate k8s render` is asked for: one frozen, validated `RenderOptions`.

Every knob has a default that renders a working trial deployment of the example policy; the
validation here is the only place a bad flag is refused, so the builders can trust their input.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from cohortgate import __version__
from cohortgate.core.contract import MAX_GATEWAY_WORKERS
from cohortgate.deploy.envoy.addresses import TraceCollector
from cohortgate.deploy.envoy.extproc import MESSAGE_TIMEOUT
from cohortgate.deploy.k8s import sizing
from cohortgate.support.cliargs import DEFAULT_TRACE_SAMPLE

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")

DEFAULT_IMAGE = f"cohortgate:{__version__}"
DEFAULT_NAMESPACE = "cohortgate"
DEFAULT_REDIS_SECRET = "cohortgate-redis"


class Mesh(enum.Enum):
    """An existing Envoy fleet that calls cohortgate's processor instead of cohortgate's own edge."""

    ENVOY_GATEWAY = "envoy-gateway"
    ISTIO = "istio"


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Everything but the policy that decides the rendered manifests (CLI flags map one to one)."""

    namespace: str = DEFAULT_NAMESPACE
    image: str = DEFAULT_IMAGE
    mesh: Mesh | None = None
    with_redis: bool = False  # a one-replica StatefulSet for trials; else an external Redis
    redis_url: str | None = None  # external Redis without credentials; else the URL comes from a Secret
    redis_secret: str = DEFAULT_REDIS_SECRET  # Secret holding key ``url`` (external Redis, the default)
    gpu: frozenset[tuple[str, str]] = frozenset()  # (route, variant or shadow) served on a GPU
    transport: Literal["grpc", "http"] = "grpc"
    grpc_server: Literal["grpcio", "fast"] = "fast"
    target_rps_per_pod: int = 1000  # the request rate one edge pod is sized for
    # gateway processes per edge pod (`cohortgate gateway --workers`), or "auto": as many as its CPU request
    # needs (sizing.workers_for); Envoy's --concurrency follows
    gateway_workers: sizing.Workers = "auto"
    # each sidecar's CPU request and limit, its intra-op threads following (None: a request of 1, no limit)
    sidecar_cpu: str | None = None
    min_replicas: int = 2
    max_replicas: int = 10
    cluster_domain: str = "cluster.local"
    trust_domain: str = "cohortgate.local"
    issuer_kind: Literal["Issuer", "ClusterIssuer"] | None = None  # default: Issuer; ClusterIssuer with a mesh
    issuer_name: str = "cohortgate-ca"
    hosts: tuple[str, ...] = ()  # extra DNS names on the edge's server certificate
    region_labels: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    edge_region: str | None = None  # pin edge, controller and Redis to this policy region
    models_pvc: str = "cohortgate-models"
    mesh_gateway: str | None = None  # NS/NAME: the Gateway (EG) or Istio Gateway to attach to
    istio_selector: tuple[tuple[str, str], ...] = (("istio", "ingressgateway"),)
    processor_timeout_s: float = MESSAGE_TIMEOUT.total_seconds()  # ext_proc's message timeout
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector: Envoy's tracer on, every process exports spans
    trace_sample: float = DEFAULT_TRACE_SAMPLE  # the share of new traces Envoy starts (the others follow)

    def __post_init__(self) -> None:
        regions = MappingProxyType({k: tuple(v) for k, v in self.region_labels.items()})
        object.__setattr__(self, "region_labels", regions)
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self):
        for what, value in (
            ("namespace", self.namespace),
            ("Redis Secret name", self.redis_secret),
            ("issuer name", self.issuer_name),
            ("models PVC name", self.models_pvc),
        ):
            if not _DNS_LABEL.match(value):
                yield f"{what} {value!r} is not a DNS-1123 label"
        if not self.image or any(c.isspace() for c in self.image):
            yield f"image {self.image!r} is not an image reference"
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "rediss"):
                yield f"Redis URL {self.redis_url!r} must start with redis:// or rediss://"
            elif parts.password is not None or parts.username is not None:
                yield "the Redis URL carries credentials; put it in a Secret (key `url`) and pass --redis-secret"
        if self.with_redis and self.redis_url is not None:
            yield "--with-redis runs its own Redis; drop --redis-url"
        if not 1 <= self.min_replicas <= self.max_replicas:
            yield f"replicas: need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})"
        if self.target_rps_per_pod <= 0:
            yield "the request rate per pod must be positive"
        elif self.gateway_workers != "auto" and not (
            type(self.gateway_workers) is int and 1 <= self.gateway_workers <= MAX_GATEWAY_WORKERS
        ):
            yield f"--gateway-workers {self.gateway_workers!r}: give 1 to {MAX_GATEWAY_WORKERS} or auto"
        elif self.mesh is not None and self.gateway_workers not in ("auto", 1):
            yield "a mesh reaches the gateway over TCP, one process per pod: scale with replicas, not --gateway-workers"
        else:
            try:
                self.edge_sizing  # noqa: B018  (the rate the workers can carry)
            except ValueError as exc:
                yield str(exc)
        if self.sidecar_cpu is not None:
            try:
                sizing.cores(self.sidecar_cpu)
            except ValueError as exc:
                yield f"--sidecar-cpu: {exc}"
        if not _DNS_NAME.match(self.cluster_domain):
            yield f"cluster domain {self.cluster_domain!r} is not a DNS name"
        for host in self.hosts:
            if not _DNS_NAME.match(host):
                yield f"host {host!r} is not a DNS name"
        for region, values in self.region_labels.items():
            for value in values or ("",):
                if not value or not _LABEL_VALUE.match(value):
                    yield f"region {region!r}: node label value {value!r} is not a valid label value"
        if self.mesh_gateway is not None:
            ns, _, name = self.mesh_gateway.partition("/")
            if not (_DNS_LABEL.match(ns) and _DNS_LABEL.match(name)):
                yield f"mesh gateway {self.mesh_gateway!r} must be NAMESPACE/NAME"
        for key, value in self.istio_selector:
            if not key or not _LABEL_VALUE.match(value):
                yield f"Istio selector {key}={value} is not a label"
        if self.mesh is not None and self.issuer_kind == "Issuer":
            yield "a mesh needs a ClusterIssuer: the mesh's client certificate lives in the mesh's namespace"
        if not self.processor_timeout_s > 0:
            yield f"the processor timeout must be positive, not {self.processor_timeout_s!r}"
        if self.otlp_endpoint is not None:
            try:
                self.trace_collector  # noqa: B018  (validates the URL and the ratio)
            except ValueError as exc:
                yield str(exc)
        if self.transport == "http" and self.mesh is not None:
            yield "meshes call the processor over gRPC; --transport http is for the edge only"

    # ------------------------------------------------------------------ derived

    def node_regions(self, region: str) -> tuple[str, ...]:
        """The ``topology.kubernetes.io/region`` values a policy region maps to (itself by default)."""
        return self.region_labels.get(region) or (region,)

    def service_host(self, name: str) -> str:
        return f"{name}.{self.namespace}.svc.{self.cluster_domain}"

    @property
    def edge_sizing(self) -> sizing.EdgeSizing:
        """The gateway pod's sizing: CPU requests, gateway workers, Envoy's concurrency. With a mesh the
        gateway is reached over TCP, one process per pod (workers listen on Unix sockets)."""
        if self.mesh is not None:
            return sizing.edge("grpc", self.grpc_server, self.target_rps_per_pod, 1)
        return sizing.edge(self.transport, self.grpc_server, self.target_rps_per_pod, self.gateway_workers)

    @property
    def trace_collector(self) -> TraceCollector | None:
        """Envoy's tracer target (None: tracing off)."""
        if self.otlp_endpoint is None:
            return None
        return TraceCollector.parse(self.otlp_endpoint, self.trace_sample)

    def tracing_args(self, *, follow: bool = True) -> list[str]:
        """The flags that make a cohortgate process export its spans; ``follow``: sample nothing on
        its own (ratio 0), only what Envoy's traceparent says, so one trace per request is kept."""
        if self.otlp_endpoint is None:
            return []
        return ["--otlp-endpoint", self.otlp_endpoint, *(["--trace-sample", "0"] if follow else [])]

    @property
    def issuer(self) -> tuple[str, str]:
        """(kind, name) of the cert-manager issuer; a mesh needs a ClusterIssuer (certs in two namespaces)."""
        kind = self.issuer_kind or ("ClusterIssuer" if self.mesh is not None else "Issuer")
        return kind, self.issuer_name

    @property
    def mesh_gateway_ref(self) -> tuple[str, str]:
        """(namespace, name) of the mesh's gateway, with each mesh's usual default."""
        if self.mesh_gateway is not None:
            ns, _, name = self.mesh_gateway.partition("/")
            return ns, name
        if self.mesh is Mesh.ISTIO:
            return "istio-system", "cohortgate"
        return self.namespace, "eg"
