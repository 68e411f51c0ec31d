"""The delta-CDS side of the Envoy renderer: clusters as protobuf (`resources`) and the bootstrap's
DELTA_GRPC source (`render_bootstrap(xds_socket=...)`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohortgate.core.contract import XDS_CLUSTER, xds_socket
from cohortgate.deploy.envoy import resources
from cohortgate.deploy.envoy.clusters import _cluster_resource, _key, cluster_resources
from cohortgate.deploy.pki import CertPaths, init_certs
from tests.deploy.test_envoy import make_policy


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(
    "urls",
    [
        ["http://127.0.0.1:8080"],
        ["http://model.internal:80"],  # DNS: the DnsCluster extension
        ["https://model.example.com:443", "https://10.0.0.5:8443"],  # TLS: the ParseDict path
    ],
)
def test_cluster_protos_are_the_cds_resources(urls: list[str]) -> None:
    """The fast join of shape bytes decodes to exactly what ParseDict makes of the CDS resource."""
    policy = make_policy({"control": urls})
    protos = resources.cluster_protos(policy.backends)
    cluster_type = resources._modules().Cluster
    for b, doc in zip(policy.backends, cluster_resources(policy.backends), strict=True):
        got = cluster_type.FromString(protos[b.cluster].value)
        assert got == resources.parse_resource(doc)
        assert got.name == b.cluster


def test_versions_name_the_content() -> None:
    a = resources.cluster_protos(make_policy({"control": ["http://127.0.0.1:8080"]}).backends)
    b = resources.cluster_protos(make_policy({"control": ["http://127.0.0.1:8080"]}).backends)
    c = resources.cluster_protos(make_policy({"control": ["http://127.0.0.1:8081"]}).backends)
    name = "cg.m.control.0"
    assert a[name].version == b[name].version != c[name].version


def test_converted_once_per_content() -> None:
    policy = make_policy({"control": ["http://127.0.0.1:8090"]})
    before = resources._resource.cache_info().hits
    resources.cluster_protos(policy.backends)
    resources.cluster_protos(policy.backends)
    assert resources._resource.cache_info().hits > before
    assert _cluster_resource(*_key(policy.backends[0], None))["name"] == "cg.m.control.0"


def test_bootstrap_subscribes_to_the_gateways_delta_cds(tmp_path: Path, certs: CertPaths) -> None:
    from cohortgate.deploy.envoy import ProcessorAddress, render_bootstrap
    from cohortgate.deploy.envoy.extproc import EnvoyTls

    sock = str(tmp_path / "processor.sock")
    doc = render_bootstrap(
        tls=EnvoyTls.from_certs(certs),
        cds_path=tmp_path / "cds.json",
        processor=ProcessorAddress(uds=sock),
        xds_socket=xds_socket(sock),
    )
    source = doc["dynamic_resources"]["cds_config"]
    assert "path_config_source" not in source
    api = source["api_config_source"]
    assert api["api_type"] == "DELTA_GRPC" and api["transport_api_version"] == "V3"
    assert api["grpc_services"] == [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
    xds = next(c for c in doc["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER)
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address == {"pipe": {"path": f"{sock}.xds"}}
    assert "http2_protocol_options" in str(xds["typed_extension_protocol_options"])


def test_without_a_socket_the_bootstrap_reads_the_cds_file(tmp_path: Path, certs: CertPaths) -> None:
    from cohortgate.deploy.envoy import ProcessorAddress, render_bootstrap
    from cohortgate.deploy.envoy.extproc import EnvoyTls

    doc = render_bootstrap(
        tls=EnvoyTls.from_certs(certs), cds_path=tmp_path / "cds.json", processor=ProcessorAddress(uds="/x.sock")
    )
    assert doc["dynamic_resources"]["cds_config"]["path_config_source"]["path"] == str(tmp_path / "cds.json")
    assert all(c["name"] != XDS_CLUSTER for c in doc["static_resources"]["clusters"])


def test_envoy_validates_the_delta_bootstrap(tmp_path: Path, certs: CertPaths) -> None:
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import validate

    sock = str(tmp_path / "processor.sock")
    files = render(
        make_policy({"control": ["http://127.0.0.1:8080"]}),
        certs=certs,
        out_dir=tmp_path / "envoy",
        processor=ProcessorAddress(uds=sock),
        xds_socket=xds_socket(sock),
    )
    assert files.xds_socket == Path(f"{sock}.xds")
    validate(files.bootstrap)
