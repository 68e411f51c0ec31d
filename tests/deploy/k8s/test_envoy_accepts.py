"""The real Envoy accepts what the Kubernetes render gives it: the edge bootstrap with its CDS
clusters, and the filter, clusters and route an Istio EnvoyFilter patches in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cohortgate.deploy import pki
from cohortgate.deploy.envoyproc import validate
from cohortgate.deploy.k8s import objects
from cohortgate.deploy.k8s.options import RenderOptions
from cohortgate.deploy.k8s.render import render
from tests.deploy.k8s.conftest import EXAMPLE, named

pytestmark = pytest.mark.integration


def _localise(text: str, certs: pki.CertPaths, policy_dir: Path) -> str:
    """In-pod paths -> files on this machine (the Secret's keys are cert-manager's names)."""
    tls = objects.ENVOY_TLS_DIR
    return (
        text.replace(f"{tls}/tls.crt", str(certs.envoy_cert))
        .replace(f"{tls}/tls.key", str(certs.envoy_key))
        .replace(f"{tls}/ca.crt", str(certs.ca_cert))
        .replace("/etc/cohortgate/policy", str(policy_dir))
    )


def test_envoy_validates_the_edge_bootstrap_and_clusters(renders, tmp_path):
    certs = pki.init_certs(tmp_path / "certs")
    rendered = renders["edge"]
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    data = named(rendered, "ConfigMap", "cohortgate-policy")["data"]
    (policy_dir / "cds.yaml").write_text(data["cds.yaml"])
    bootstrap = named(rendered, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    path = tmp_path / "bootstrap.yaml"
    path.write_text(_localise(bootstrap, certs, policy_dir))
    validate(path)  # raises EnvoyConfigError with Envoy's message


def test_envoy_validates_the_istio_patches(renders, tmp_path):
    """The EnvoyFilter's ext_proc filter, clusters and route, assembled into a bootstrap of their own."""
    rendered = renders["istio"]
    patches = named(rendered, "EnvoyFilter", "cohortgate")["spec"]["configPatches"]
    ext_proc = patches[0]["patch"]["value"]
    clusters = [p["patch"]["value"] for p in patches if p["applyTo"] == "CLUSTER"]
    route = next(p for p in patches if p["applyTo"] == "HTTP_ROUTE")["patch"]["value"]
    processor = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    hcm_type = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    hcm = {
        "@type": f"type.googleapis.com/{hcm_type}",
        "stat_prefix": "istio-like",
        "route_config": {
            "name": "r",
            "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}],
        },
        "http_filters": [
            ext_proc,
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }  # fmt: skip
    bootstrap = {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                    "typed_config": hcm}]}],
                }
            ],
            "clusters": [
                *clusters,
                {
                    "name": processor,
                    "type": "STATIC",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": processor,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": "127.0.0.1", "port_value": 9002}}}}]}],
                    },
                },
            ],
        }
    }  # fmt: skip
    path = tmp_path / "istio-like.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    validate(path)


def test_envoy_validates_the_edge_bootstrap_with_several_gateway_workers(example, tmp_path):
    """`--gateway-workers 3`: the processor cluster's three socket endpoints, least-request balanced."""
    policy, raw = example
    rendered = render(policy, raw, RenderOptions(gateway_workers=3), source=EXAMPLE.name)
    certs = pki.init_certs(tmp_path / "certs")
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "cds.yaml").write_text(named(rendered, "ConfigMap", "cohortgate-policy")["data"]["cds.yaml"])
    bootstrap = named(rendered, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    assert bootstrap.count("/run/cohortgate/processor.sock.w") == 3
    path = tmp_path / "bootstrap.yaml"
    path.write_text(_localise(bootstrap, certs, policy_dir))
    validate(path)
