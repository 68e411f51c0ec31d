"""The policy's clusters as protobuf for delta xDS: a name, a version, and the packed ``Cluster`` bytes.

The same clusters as `clusters` (one renderer: each resource starts from `clusters._cluster_resource`),
for a gateway that serves them to Envoy over gRPC (``gateway.xds``) instead of writing a CDS file. Each
cluster is converted once and cached by its content: an edit of one route in 1 000 converts two clusters,
and the version of a cluster (a hash of its sorted-JSON fingerprint) is the same in every process, so an
Envoy that reconnects to a restarted gateway is sent only what differs.

Converting a resource dict with ``json_format.ParseDict`` costs ~0.25 ms a cluster (2 000 clusters: half a
second of GIL); plain ``http`` clusters instead join the bytes of their shape (everything but the name and
the endpoint, serialised once per shape) with a small message holding the name and the endpoint: protobuf
merges concatenated messages, so the bytes decode to the same ``Cluster`` (tests/deploy prove it). ``https``
clusters carry their host inside the packed TLS context and go through ``ParseDict``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cohortgate.deploy.envoy.addresses import is_ip
from cohortgate.deploy.envoy.clusters import (
    CLUSTER_TYPE_URL,
    _cluster_resource,
    _cluster_text,
    _Key,
    _key,
    _shape,
    unique_backends,
)

if TYPE_CHECKING:
    from cohortgate.core.policy import Backend


@dataclass(frozen=True, slots=True)
class ClusterResource:
    """One cluster as delta xDS sends it: ``value`` is the serialised ``envoy.config.cluster.v3.Cluster``."""

    name: str
    version: str  # names the content: the same cluster has the same version in every process
    value: bytes
    type_url: str = CLUSTER_TYPE_URL
    resolves: bool = False  # a DNS cluster: Envoy warms it (first resolution) after acknowledging it


@functools.cache
def _modules() -> Any:
    """The Cluster message, with every type its ``Any`` fields pack registered (ParseDict resolves them by name)."""
    import envoy.extensions.clusters.dns.v3.dns_cluster_pb2
    import envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2
    import envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2
    import envoy.extensions.transport_sockets.tls.v3.tls_pb2
    import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
    from envoy.config.cluster.v3 import cluster_pb2

    return cluster_pb2


def parse_resource(resource: dict[str, Any]) -> Any:
    """A CDS resource dict (with its ``@type``) as a ``Cluster`` message: the reference conversion."""
    from google.protobuf import json_format

    cluster = _modules().Cluster()
    json_format.ParseDict({k: v for k, v in resource.items() if k != "@type"}, cluster)
    return cluster


@functools.cache
def _shape_rest(scheme: str, ip: bool, upstream_ca: str | None, forward_authorization: bool, http2: bool) -> bytes:
    """A shape's cluster without its name and endpoint, serialised once."""
    import json

    cluster = parse_resource(json.loads(_shape(scheme, ip, upstream_ca, forward_authorization, http2).json))
    cluster.ClearField("name")
    cluster.ClearField("load_assignment")
    return bytes(cluster.SerializeToString())


def _head(name: str, host: str, port: int) -> bytes:
    """The name and the one endpoint (the fields `_shape_rest` leaves out)."""
    cluster = _modules().Cluster(name=name)
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    cluster.load_assignment.cluster_name = name
    endpoint.address.socket_address.address = host
    endpoint.address.socket_address.port_value = port
    return bytes(cluster.SerializeToString())


@functools.lru_cache(maxsize=16384)
def _resource(key: _Key) -> ClusterResource:
    name, scheme, host, port, upstream_ca, forward_authorization, http2 = key
    fingerprint, _ = _cluster_text(key)
    version = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    if scheme == "http":
        value = _head(name, host, port) + _shape_rest(scheme, is_ip(host), upstream_ca, forward_authorization, http2)
    else:
        value = bytes(parse_resource(_cluster_resource(*key)).SerializeToString())
    return ClusterResource(name=name, version=version, value=value, resolves=not is_ip(host))


def cluster_protos(backends: Iterable[Backend], *, upstream_ca: str | None = None) -> dict[str, ClusterResource]:
    """These backends' clusters by name (one per name, the first backend seen), each converted once per content."""
    return {b.cluster: _resource(_key(b, upstream_ca)) for b in unique_backends(backends)}
