"""A ``protocol: grpc`` backend's cluster speaks HTTP/2 upstream (gRPC needs it end to end); every
other backend keeps explicit HTTP/1.1. The fast path (cached shapes) renders exactly the typed build."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cohortgate.core.policy import parse_policy
from cohortgate.deploy.envoy import clusters
from cohortgate.deploy.envoy.typed import dump_item

POLICY = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
routes:
  - name: g
    match: {host: g.example.com, path_prefix: /inference.GRPCInferenceService}
    variants:
      - name: control
        weight: 100
        backends:
          - {url: "http://127.0.0.1:9001", region: eu, protocol: grpc}
          - {url: "https://models.example.com:8443", region: us, protocol: grpc}
    shadows:
      - {name: s, percent: 10, backends: [{url: "http://127.0.0.1:9002", region: eu, protocol: grpc}]}
  - name: r
    match: {model: m}
    variants:
      - {name: control, weight: 100, backends: [{url: "http://127.0.0.1:9003", region: eu}]}
"""


def explicit(resource: dict[str, Any]) -> dict[str, Any]:
    options = resource["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return options["explicit_http_config"]


def test_grpc_backends_get_http2_and_others_http1() -> None:
    policy = parse_policy(POLICY)
    by_name = {r["name"]: r for r in clusters.cluster_resources(policy.backends, upstream_ca="/etc/ssl/ca.pem")}
    grpc_names = [b.cluster for b in policy.backends if b.protocol == "grpc"]
    assert len(grpc_names) == 3  # both variant backends and the shadow's
    for name in grpc_names:
        assert "http2_protocol_options" in explicit(by_name[name])
    http_name = policy.by_name["r"].variants[0].backends[0].cluster
    assert "http_protocol_options" in explicit(by_name[http_name])
    tls = json.dumps(by_name[grpc_names[1]]["transport_socket"])
    assert '"h2"' in tls and "http/1.1" not in tls  # ALPN offers HTTP/2 to a TLS gRPC backend


@pytest.mark.parametrize(
    "key",
    [
        ("g1", "http", "127.0.0.1", 9001, None, False, True),
        ("g2", "https", "models.example.com", 8443, "/etc/ssl/ca.pem", True, True),
        ("h1", "http", "127.0.0.1", 9003, None, False, False),
    ],
)
def test_grpc_shapes_equal_the_typed_build(key: tuple) -> None:
    reference = clusters._typed_resource(*key)
    assert clusters._cluster_resource(*key) == reference
    fingerprint, item = clusters._cluster_text(key)
    assert fingerprint == json.dumps(reference, sort_keys=True)
    assert item == dump_item(reference)


def test_switching_a_backend_to_grpc_changes_the_cds_version() -> None:
    http = parse_policy(POLICY.replace(", protocol: grpc", ""))
    grpc = parse_policy(POLICY)
    assert clusters.cds_text(http.backends)[0] != clusters.cds_text(grpc.backends)[0]
