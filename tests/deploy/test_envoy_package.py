"""The shape of `cohortgate.deploy.envoy`: one CDS renderer, renderers that return text, no import
cycle with the process module, and the per-cluster Authorization rule (issue 16.7)."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

from cohortgate.core.policy import parse_policy
from cohortgate.deploy import envoy as ec
from cohortgate.deploy.envoy import clusters
from tests.deploy.test_envoy import EXAMPLE, make_policy

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cohortgate" / "deploy" / "envoy"
HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"


def _upstream_filters(resource: dict) -> list[dict]:
    options = resource["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return options.get("http_filters", [])


def test_cds_text_is_the_cluster_resources_and_its_version_names_them() -> None:
    """One renderer: the file's resources are exactly the documents Istio embeds, and the version
    is the hash of their sorted JSON (what a reload compares before rewriting)."""
    policy = make_policy(
        {"control": ["http://127.0.0.1:9", "https://models.example.com"], "canary": ["http://10.0.0.1:80"]},
        shadows={"judge": ["http://127.0.0.1:10"]},
    )
    version, text = ec.cds_text(policy.backends, upstream_ca="/ca.pem", source="p.yaml")
    document = yaml.safe_load(text)
    resources = ec.cluster_resources(policy.backends, upstream_ca="/ca.pem")
    assert document["resources"] == resources
    assert document["version_info"] == version
    assert version == hashlib.sha256(json.dumps(resources, sort_keys=True).encode()).hexdigest()[:16]
    assert text.startswith("# Envoy clusters (filesystem CDS) rendered by `cohortgate envoy render` from p.yaml.")
    empty_version, empty = ec.cds_text((), source="p.yaml")
    assert yaml.safe_load(empty)["resources"] == [] and empty_version != version


def test_cluster_resources_are_fresh_copies() -> None:
    policy = make_policy({"control": ["http://127.0.0.1:9"]})
    first = ec.cluster_resources(policy.backends)
    first[0]["name"] = "mutated"
    assert ec.cluster_resources(policy.backends)[0]["name"] == "cg.m.control.0"
    assert yaml.safe_load(ec.cds_text(policy.backends)[1])["resources"][0]["name"] == "cg.m.control.0"


def test_the_renderer_never_imports_the_process_module() -> None:
    """envoyproc imports the renderer (for EnvoyFiles and the listener's name), never the reverse."""
    for module in PACKAGE.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any("envoyproc" in name for name in imported), module.name
    code = "import sys, cohortgate.deploy.envoy; print('cohortgate.deploy.envoyproc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_files_module_writes() -> None:
    """Renderers return text; `files` is the one writer (write_atomic) in the package."""
    writers = {
        module.name
        for module in PACKAGE.glob("*.py")
        if any(word in module.read_text() for word in ("write_atomic", "write_text(", "open("))
    }
    assert writers == {"files.py"}


def test_backends_lose_authorization_unless_their_route_keeps_it_and_shadows_always_do() -> None:
    policy = make_policy({"control": ["http://127.0.0.1:9"]}, shadows={"judge": ["http://127.0.0.1:10"]})
    by_name = {r["name"]: r for r in ec.cluster_resources(policy.backends)}
    for name in ("cg.m.control.0", "cg.m.judge.0"):
        mutation, codec = _upstream_filters(by_name[name])
        assert mutation["typed_config"]["@type"] == HEADER_MUTATION
        assert mutation["typed_config"]["mutations"]["request_mutations"] == [{"remove": "authorization"}]
        assert codec["name"] == "envoy.filters.http.upstream_codec"  # Envoy requires it last

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["routes"][0]["forward_authorization"] = True
    kept = parse_policy(yaml.safe_dump(raw), filename="kept.yaml", base_dir=EXAMPLE.parent)
    route = kept.routes[0]
    variants = {b.cluster for v in route.variants for b in v.backends}
    shadows = {b.cluster for s in route.shadows for b in s.backends}
    assert variants and shadows, "the example's first route needs a shadow for this test"
    for resource in ec.cluster_resources(kept.backends):
        if resource["name"] in variants:
            assert _upstream_filters(resource) == []
        elif resource["name"] in shadows:
            assert _upstream_filters(resource)[0]["typed_config"]["@type"] == HEADER_MUTATION


def test_admin_on_a_unix_socket_is_mode_0600(tmp_path: Path) -> None:
    from cohortgate.deploy.pki import init_certs

    certs = init_certs(tmp_path / "certs")
    doc = ec.render_bootstrap(
        tls=ec.EnvoyTls.from_certs(certs),
        cds_path=tmp_path / "cds.yaml",
        processor=ec.ProcessorAddress(uds="/run/p.sock"),
        admin_port=None,
        admin_socket=str(tmp_path / "admin.sock"),
    )
    assert doc["admin"]["address"] == {"pipe": {"path": str(tmp_path / "admin.sock"), "mode": 0o600}}
    assert clusters.CLUSTER_TYPE_URL.endswith("Cluster")


def test_envoy_render_flags_set_the_processor_timeout_body_limit_and_admin_socket(tmp_path: Path) -> None:
    """The processor's message timeout is a product setting (issue 18): the CLI sets it, and the
    http transport's own request timeout with it."""
    from cohortgate.cli import main

    out = tmp_path / "out"
    argv = ["envoy", "render", "--policy", str(EXAMPLE), "--out", str(out), "--certs", str(tmp_path / "none")]
    extra = ["--transport", "http", "--processor-timeout", "250ms", "--max-body", "1m"]
    assert main([*argv, *extra, "--admin-socket", str(tmp_path / "admin.sock")]) == 0
    doc = yaml.safe_load((out / "bootstrap.yaml").read_text())
    ext_proc = _find(doc, "ExternalProcessor")
    assert ext_proc["message_timeout"] == "0.250s"
    assert ext_proc["http_service"]["http_service"]["http_uri"]["timeout"] == "0.250s"
    assert _find(doc, "BodySizeLimit")["max_request_bytes"] == 1 << 20
    assert _find(doc, "filters.http.buffer.v3.Buffer")["max_request_bytes"] == 1 << 20
    assert doc["admin"]["address"] == {"pipe": {"path": str(tmp_path / "admin.sock"), "mode": 0o600}}

    assert main([*argv]) == 0  # the defaults: 1 s, 16 MiB, admin on 127.0.0.1:9901
    doc = yaml.safe_load((out / "bootstrap.yaml").read_text())
    assert _find(doc, "ExternalProcessor")["message_timeout"] == "1s"
    assert _find(doc, "BodySizeLimit")["max_request_bytes"] == 16 << 20
    assert doc["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}


def _find(document: object, type_suffix: str) -> dict:
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("@type", "")).endswith(type_suffix):
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"no {type_suffix}")
