"""Offline checks of `cohortgate k8s render` on the example policy.

Golden files live in tests/deploy/k8s/golden/CONFIG/; regenerate them after an intended change with
``COHORTGATE_UPDATE_GOLDEN=1 pytest tests/deploy/k8s`` and review the diff.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.cli import main
from cohortgate.core.contract import HEADER_SHADOWS
from cohortgate.core.decide import Facts, decide
from cohortgate.deploy import envoy as envoyconf
from cohortgate.deploy.k8s import sizing
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import PlanError, dns_name
from cohortgate.deploy.k8s.render import render
from tests.deploy.k8s import crd_schemas
from tests.deploy.k8s.conftest import CONFIGS, EXAMPLE, GOLDEN_FLAGS, K8S_VERSION, docs, named

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("COHORTGATE_UPDATE_GOLDEN") == "1"
REGION = "topology.kubernetes.io/region"


def _validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in crd_schemas.BY_KIND:
        jsonschema.Draft202012Validator(crd_schemas.BY_KIND[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------ validity


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_manifest_validates(renders, config):
    """Core kinds against the Kubernetes 1.33 schemas (strict), CRDs against their trimmed schemas."""
    kinds = set()
    for doc in docs(renders[config]):
        _validate(doc)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="x"), "Deployment"),
        (lambda d: d["spec"]["template"]["spec"].update(hostNetwrok=True), "Deployment"),
        (lambda d: d["spec"]["ports"][0].update(port="https"), "Service"),
    ],
)
def test_the_validator_rejects_broken_core_manifests(renders, mutate, kind):
    doc = copy.deepcopy(docs(renders["edge"], kind)[0])
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("config", "kind", "mutate"),
    [
        ("envoy-gateway", "EnvoyExtensionPolicy", lambda d: d["spec"]["extProc"][0].update(backendRef={})),
        ("envoy-gateway", "EnvoyExtensionPolicy", lambda d: d["spec"]["extProc"][0].update(messageTimeout="0.2s")),
        ("envoy-gateway", "HTTPRoute", lambda d: d["spec"]["rules"][0].update(backendRef=[])),
        ("istio", "EnvoyFilter", lambda d: d["spec"]["configPatches"][0].update(apply_to="HTTP_FILTER")),
        ("istio", "EnvoyFilter", lambda d: d["spec"]["configPatches"][0]["patch"].update(operation="PREPEND")),
        ("istio", "Certificate", lambda d: d["spec"].update(dnsName=["x"])),
    ],
)
def test_the_crd_schemas_reject_broken_resources(renders, config, kind, mutate):
    doc = copy.deepcopy(docs(renders[config], kind)[0])
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_golden(renders, config):
    directory = GOLDEN / config
    files = renders[config].files
    if UPDATE:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.yaml"):
            stale.unlink()
        for name, text in files.items():
            (directory / name).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(directory.glob("*.yaml"))}
    assert sorted(expected) == sorted(files), "rendered file set changed (COHORTGATE_UPDATE_GOLDEN=1 to accept)"
    for name, text in files.items():
        assert text == expected[name], f"{config}/{name} differs from its golden file (COHORTGATE_UPDATE_GOLDEN=1)"


def test_kustomization_lists_every_file(renders):
    for rendered in renders.values():
        kustomization = rendered.documents["kustomization.yaml"][0]
        assert kustomization["resources"] == [n for n in rendered.files if n != "kustomization.yaml"]
        assert "namespace" not in kustomization  # resources in the mesh's namespace keep theirs


# ----------------------------------------------------------------------------------- residency


def test_every_sidecar_is_pinned_to_its_backends_region(renders, example):
    policy, _ = example
    region_of = {b.cluster: b.region for b in policy.backends}
    plan = renders["edge"].plan
    deployments = {d["metadata"]["name"]: d for d in docs(renders["edge"], "Deployment")}
    assert plan.sidecars, "the example policy has model-backed backends"
    for s in plan.sidecars:
        pod = deployments[s.name]["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [{"key": REGION, "operator": "In", "values": [region_of[s.cluster]]}]}]
    # The `ae` backends can only run in `ae`.
    ae = [s.name for s in plan.sidecars if region_of[s.cluster] == "ae"]
    assert sorted(ae) == ["cg-ae-scoring-control-0", "cg-tabular-control-1"]


def test_region_names_map_to_node_labels(example):
    policy, raw = example
    rendered = render(policy, raw, RenderOptions(region_labels={"ae": ("me-central-1", "me-south-1")}))
    pod = named(rendered, "Deployment", "cg-ae-scoring-control-0")["spec"]["template"]["spec"]
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert expr[0]["matchExpressions"][0]["values"] == ["me-central-1", "me-south-1"]
    eu = named(rendered, "Deployment", "cg-tabular-control-0")["spec"]["template"]["spec"]
    assert eu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ][0]["values"] == ["eu"]


def test_edge_region_pins_edge_controller_and_redis(example):
    policy, raw = example
    rendered = render(policy, raw, RenderOptions(edge_region="eu", with_redis=True))
    for kind, name in (("Deployment", "cohortgate-edge"), ("Deployment", "cohortgate-controller"),
                       ("StatefulSet", "cohortgate-redis")):  # fmt: skip
        pod = named(rendered, kind, name)["spec"]["template"]["spec"]
        values = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][
            0
        ]["matchExpressions"][0]["values"]
        assert values == ["eu"]


def test_the_in_cluster_policy_routes_like_the_original(renders, example):
    policy, _ = example
    plan = renders["edge"].plan
    assert [(b.cluster, b.region) for b in plan.policy.backends] == [(b.cluster, b.region) for b in policy.backends]
    # every model backend is its sidecar's Service (an outcomes route's backend, the controller API, is
    # not a sidecar: its in-cluster address is not rendered yet)
    owners = [o for r in plan.policy.routes if r.kind == "model" for o in (*r.variants, *r.shadows)]
    for b in [b for o in owners for b in o.backends]:
        assert b.host.endswith(".cohortgate.svc.cluster.local") and b.port == 8000 and b.model is None
    for sub in ("alice", "bob", "qa-canary", "carol"):
        for residency in ("eu", "ae"):
            facts = Facts(
                method="POST",
                path="/v2/models/tabular/infer",
                headers={},
                identity="spiffe://cohortgate.local/app-demo",
                claims={"sub": sub, "residency": residency, "scope": "predict"},
                request_id="r-1",
            )
            a, b = decide(policy, facts), decide(plan.policy, facts)
            assert (a.allowed, a.cluster, a.variant, a.shadows) == (b.allowed, b.cluster, b.variant, b.shadows)
    assert plan.policy.jwt.jwks == "/etc/cohortgate/jwks/jwks.json"


# ------------------------------------------------------------------------------------------ GPU


def test_gpu_variants_request_a_gpu_and_tolerate_the_taint(renders):
    for d in docs(renders["edge"], "Deployment"):
        if d["metadata"]["labels"].get("app.kubernetes.io/component") != "sidecar":
            continue
        pod = d["spec"]["template"]["spec"]
        container = pod["containers"][0]
        gpu = d["metadata"]["name"] == "cg-tabular-canary-0"
        assert (container["resources"]["limits"].get("nvidia.com/gpu") == "1") is gpu
        assert (container["resources"]["requests"].get("nvidia.com/gpu") == "1") is gpu
        tolerations = pod.get("tolerations") or []
        assert (tolerations == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]) is gpu
        device = container["args"][container["args"].index("--device") + 1]
        assert device == ("cuda" if gpu else "cpu")


def test_gpu_flag_must_name_a_model_backed_variant(example):
    policy, raw = example
    with pytest.raises(PlanError, match="tabular/nope"):
        render(policy, raw, RenderOptions(gpu=frozenset({("tabular", "nope")})))


# ----------------------------------------------------------------------------------- no secrets


def test_no_secret_material_in_any_rendered_file(renders, tmp_path):
    from cohortgate.deploy import pki

    certs = pki.init_certs(tmp_path / "certs")
    secret_bodies = []
    for path in (certs.ca_key, certs.envoy_key, certs.processor_key, certs.jwt_key, certs.envoy_client_key):
        pem = path.read_text()
        body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        secret_bodies.append(body[20:60])  # any 40 characters of the key's base64
    pattern = re.compile(r"-----BEGIN|PRIVATE KEY|eyJ[A-Za-z0-9_-]{8,}\.eyJ|redis://[^/\s]*:[^@/\s]+@")
    for rendered in renders.values():
        for name, text in rendered.files.items():
            assert not pattern.search(text), f"{name} carries something secret-looking"
            for body in secret_bodies:
                assert body not in text
            for doc in yaml.safe_load_all(text):
                assert doc["kind"] != "Secret", f"{name} renders a Secret"
                _no_inline_secret_values(doc)


def _no_inline_secret_values(node) -> None:
    """Env values with a secret-ish name must come from a secretKeyRef, never a literal."""
    if isinstance(node, dict):
        if {"name", "value"} <= node.keys() and re.search(r"SALT|TOKEN|PASSWORD|KEY", node["name"]):
            raise AssertionError(f"env {node['name']} has a literal value")
        for value in node.values():
            _no_inline_secret_values(value)
    elif isinstance(node, list):
        for value in node:
            _no_inline_secret_values(value)


def test_secrets_are_referenced_by_name(renders):
    edge = named(renders["edge"], "Deployment", "cohortgate-edge")["spec"]["template"]["spec"]
    gateway = next(c for c in edge["containers"] if c["name"] == "gateway")
    salt = next(e for e in gateway["env"] if e["name"] == "COHORTGATE_UNIT_SALT")
    assert salt["valueFrom"]["secretKeyRef"] == {"key": "salt", "name": "cohortgate-unit-salt"}
    tls = next(v for v in edge["volumes"] if v["name"] == "envoy-tls")
    assert tls["secret"]["secretName"] == "cohortgate-envoy-tls"
    certificate = named(renders["edge"], "Certificate", "cohortgate-envoy")
    assert certificate["spec"]["secretName"] == "cohortgate-envoy-tls"


def test_external_redis_url_comes_from_a_secret_by_default(example):
    policy, raw = example
    rendered = render(policy, raw, RenderOptions())
    container = named(rendered, "Deployment", "cohortgate-controller")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["COHORTGATE_REDIS"]["valueFrom"]["secretKeyRef"] == {"key": "url", "name": "cohortgate-redis"}
    assert "$(COHORTGATE_REDIS)" in container["args"]
    assert "redis.yaml" not in rendered.files


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redis_url": "redis://:hunter2@redis:6379/0"}, "credentials"),
        ({"redis_url": "redis://user:pw@redis:6379/0"}, "credentials"),
        ({"redis_url": "http://redis:6379"}, "redis://"),
        ({"with_redis": True, "redis_url": "redis://r:6379"}, "--with-redis"),
        ({"mesh": Mesh.ISTIO, "issuer_kind": "Issuer"}, "ClusterIssuer"),
        ({"mesh": Mesh.ISTIO, "transport": "http"}, "gRPC"),
        ({"namespace": "Bad_NS"}, "DNS-1123"),
        ({"min_replicas": 3, "max_replicas": 2}, "replicas"),
        ({"region_labels": {"eu": ("bad value!",)}}, "label value"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RenderOptions(**kwargs)


# ------------------------------------------------------------------------------------- the edge


def test_edge_pod_shares_a_unix_socket_and_no_processor_port(renders):
    rendered = renders["edge"]
    pod = named(rendered, "Deployment", "cohortgate-edge")["spec"]["template"]["spec"]
    envoy, gateway = pod["containers"]
    assert (envoy["name"], gateway["name"]) == ("envoy", "gateway")
    run = next(v for v in pod["volumes"] if v["name"] == "run")
    assert run["emptyDir"]["medium"] == "Memory"
    for c in (envoy, gateway):
        assert {"mountPath": "/run/cohortgate", "name": "run", "readOnly": False} in c["volumeMounts"]
        assert c["readinessProbe"] and c["livenessProbe"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["args"][gateway["args"].index("--listen") + 1] == "uds:/run/cohortgate/processor.sock"
    assert "ports" not in gateway  # no TCP port for the processor hop
    assert [p["containerPort"] for p in envoy["ports"]] == [8443]
    # Same non-root user in both containers: the socket's 0600 mode admits exactly Envoy.
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    bootstrap = yaml.safe_load(named(rendered, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"])
    processor = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == envoyconf.PROCESSOR_CLUSTER)
    address = processor["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address == {"pipe": {"path": "/run/cohortgate/processor.sock"}}
    cds = bootstrap["dynamic_resources"]["cds_config"]["path_config_source"]
    assert cds["path"] == "/etc/cohortgate/policy/cds.yaml"
    assert cds["watched_directory"]["path"] == "/etc/cohortgate/policy"  # ConfigMap symlink swaps


def test_policy_and_clusters_share_one_configmap(renders):
    data = named(renders["edge"], "ConfigMap", "cohortgate-policy")["data"]
    assert set(data) == {"policy.yaml", "cds.yaml"}
    clusters = {r["name"] for r in yaml.safe_load(data["cds.yaml"])["resources"]}
    assert clusters == {b.cluster for b in renders["edge"].plan.policy.backends}


def test_hpa_pdb_and_service_select_the_edge_pods(renders):
    rendered = renders["edge"]
    deployment = named(rendered, "Deployment", "cohortgate-edge")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # owned by the HPA
    hpa = named(rendered, "HorizontalPodAutoscaler", "cohortgate-edge")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cohortgate-edge"}
    assert {m["containerResource"]["container"] for m in hpa["spec"]["metrics"]} == {"gateway", "envoy"}
    pdb = named(rendered, "PodDisruptionBudget", "cohortgate-edge")
    service = named(rendered, "Service", "cohortgate-edge")
    for sel in (pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert sel.items() <= pod_labels.items()


def test_edge_requests_follow_the_benchmark_figures(renders):
    pod = named(renders["edge"], "Deployment", "cohortgate-edge")["spec"]["template"]["spec"]
    cpu = {c["name"]: c["resources"]["requests"]["cpu"] for c in pod["containers"]}
    # the fast server: 50 µs x 1000 req/s = 50m; Envoy with ext_proc: 75 µs x 1000 = 75m.
    assert cpu == {"gateway": "50m", "envoy": "75m"}


def test_sizing_limits_and_pod_counts():
    fast = sizing.edge("grpc", "fast", 10_000)
    assert fast.gateway_cpu_milli == 500 and fast.envoy_cpu_milli == 750
    assert fast.pods_for(70_000) == 10
    with pytest.raises(ValueError, match="tops out"):
        sizing.edge("grpc", "grpcio", 5_000)
    with pytest.raises(ValueError, match="tops out"):
        sizing.edge("grpc", "fast", 13_000)


def test_only_the_edge_reaches_the_sidecars(renders):
    policy = named(renders["edge"], "NetworkPolicy", "cohortgate-sidecars")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "sidecar"
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    edge = {"app.kubernetes.io/name": "cohortgate", "app.kubernetes.io/component": "edge"}
    assert rule["from"] == [{"podSelector": {"matchLabels": edge}}]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    for s in renders["edge"].plan.sidecars:
        service = named(renders["edge"], "Service", s.name)
        assert service["spec"]["ports"][0]["port"] == 8000


def test_controller_is_a_single_replica(renders):
    controller = named(renders["edge"], "Deployment", "cohortgate-controller")
    assert controller["spec"]["replicas"] == 1
    pod = controller["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:3] == ["controller", "--policy", "/etc/cohortgate/policy/policy.yaml"]
    # The API is loopback-only (the controller refuses anything else); its token comes from a Secret.
    assert args[args.index("--listen") + 1] == "127.0.0.1:9480"
    assert args[args.index("--token-file") + 1] == "/etc/cohortgate/admin/token"
    token = next(v for v in pod["volumes"] if v["name"] == "admin-token")
    assert token["secret"]["secretName"] == "cohortgate-admin-token"


def test_redis_statefulset_only_with_the_flag(renders):
    assert named(renders["edge"], "StatefulSet", "cohortgate-redis")["spec"]["replicas"] == 1
    assert not docs(renders["istio"], "StatefulSet")


# ------------------------------------------------------------------------------------- meshes


def test_envoy_gateway_extension_policy(renders):
    rendered = renders["envoy-gateway"]
    assert not [d for d in docs(rendered, "Deployment") if d["metadata"]["name"] == "cohortgate-edge"]
    policy = named(rendered, "EnvoyExtensionPolicy", "cohortgate")
    routes = docs(rendered, "HTTPRoute")
    assert [t["name"] for t in policy["spec"]["targetRefs"]] == [r["metadata"]["name"] for r in routes]
    (ext_proc,) = policy["spec"]["extProc"]
    assert ext_proc["backendRefs"] == [{"name": "cohortgate-gateway", "port": 9002}]
    assert ext_proc["failOpen"] is False and ext_proc["messageTimeout"] == "1000ms"
    assert ext_proc["processingMode"] == {"request": {"attributes": list(envoyconf.REQUEST_ATTRIBUTES)}}


def test_envoy_gateway_routes_cover_every_decision(renders):
    """Each (cluster, mirrors) answer of the processor has a rule forwarding and mirroring exactly so."""
    rendered = renders["envoy-gateway"]
    rules = [r for route in docs(rendered, "HTTPRoute") for r in route["spec"]["rules"]]
    first = rules[0]
    assert "headers" not in first["matches"][0]
    assert first["filters"][0]["extensionRef"]["name"] == "cohortgate-unrouted"
    service = {s.cluster: s.name for s in rendered.plan.sidecars}
    table = {}
    for rule in rules[1:]:
        headers = {h["name"]: h["value"] for h in rule["matches"][0]["headers"]}
        mirrors = tuple(service_of(f) for f in rule.get("filters", []) if f["type"] != "RequestHeaderModifier")
        table[(headers.pop("x-cohortgate-cluster"), tuple(headers[k] for k in sorted(headers)))] = (
            rule["backendRefs"][0]["name"],
            mirrors,
        )
    for sub in ("alice", "bob", "carol", "dave", "erin", "qa-canary"):
        for residency, request_id in (("eu", "a"), ("eu", "b"), ("ae", "c")):
            d = decide(
                rendered.plan.policy,
                Facts("POST", "/v2/models/tabular/infer", {}, "spiffe://cohortgate.local/app-demo",
                      {"sub": sub, "residency": residency, "scope": "predict"}, request_id),
            )  # fmt: skip
            assert d.allowed
            backend, mirrors = table[(d.cluster, d.shadows)]
            assert backend == service[d.cluster]
            assert mirrors == tuple(service[c] for c in d.shadows)
    filter_ = named(rendered, "HTTPRouteFilter", "cohortgate-unrouted")["spec"]["directResponse"]
    assert filter_["statusCode"] == 503 and filter_["contentType"] == "application/json"


def service_of(route_filter: dict) -> str:
    assert route_filter["type"] == "RequestMirror"
    return route_filter["requestMirror"]["backendRef"]["name"]


def test_istio_envoy_filter(renders):
    rendered = renders["istio"]
    envoy_filter = named(rendered, "EnvoyFilter", "cohortgate")
    assert envoy_filter["metadata"]["namespace"] == "istio-system"
    assert envoy_filter["spec"]["workloadSelector"] == {"labels": {"istio": "ingressgateway"}}
    patches = envoy_filter["spec"]["configPatches"]
    http_filter = patches[0]
    assert http_filter["applyTo"] == "HTTP_FILTER"
    assert http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"] == {
        "name": "envoy.filters.http.router"
    }
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    value = http_filter["patch"]["value"]
    assert value["name"] == "envoy.filters.http.ext_proc"
    config = value["typed_config"]
    assert config["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        "outbound|9002||cohortgate-gateway.cohortgate.svc.cluster.local"
    )
    assert config["failure_mode_allow"] is False
    clusters = [p["patch"]["value"]["name"] for p in patches if p["applyTo"] == "CLUSTER"]
    assert clusters == [b.cluster for b in rendered.plan.policy.backends]
    (route_patch,) = [p for p in patches if p["applyTo"] == "HTTP_ROUTE"]
    vs = named(rendered, "VirtualService", "cohortgate")
    assert route_patch["match"]["routeConfiguration"]["vhost"]["route"]["name"] == vs["spec"]["http"][0]["name"]
    assert route_patch["patch"]["value"]["route"]["cluster_header"] == "x-cohortgate-cluster"
    mirrors = route_patch["patch"]["value"]["route"]["request_mirror_policies"]
    assert [m["cluster_header"] for m in mirrors] == list(HEADER_SHADOWS)
    assert vs["spec"]["hosts"] == ["models.example.com"]
    assert vs["spec"]["http"][0]["route"][0]["destination"]["host"].startswith("cohortgate-unrouted.")
    # One ext_proc filter and one route action for the edge and the mesh: Istio's are the edge's own,
    # with only the processor's cluster name (and the edge's route name and match) differing.
    edge = renders["edge"]
    edge_bootstrap = yaml.safe_load(named(edge, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"])
    edge_hcm = edge_bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    edge_ext_proc = edge_hcm["http_filters"][0]
    edge_ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = config["grpc_service"]["envoy_grpc"][
        "cluster_name"
    ]
    assert value == edge_ext_proc
    edge_route = edge_hcm["route_config"]["virtual_hosts"][0]["routes"][-1]  # the route for any request
    assert route_patch["patch"]["value"] == {k: v for k, v in edge_route.items() if k not in ("name", "match")}
    dr = named(rendered, "DestinationRule", "cohortgate-gateway")["spec"]
    assert dr["trafficPolicy"]["tls"]["mode"] == "MUTUAL"
    assert dr["trafficPolicy"]["tls"]["subjectAltNames"] == ["spiffe://cohortgate.local/gateway"]


@pytest.mark.parametrize("config", ["envoy-gateway", "istio"])
def test_mesh_gateway_deployment_and_network_policies(renders, config):
    rendered = renders[config]
    pod = named(rendered, "Deployment", "cohortgate-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][container["args"].index("--listen") + 1] == "tcp:0.0.0.0:9002"
    assert container["args"][container["args"].index("--certs") + 1] == "/etc/cohortgate/certs"
    paths = [i["path"] for s in next(v for v in pod["volumes"] if v["name"] == "processor-tls")["projected"]["sources"]
             for i in s["secret"]["items"]]  # fmt: skip
    assert paths == ["processor.crt", "processor.key", "ca.crt"]
    gw_policy = named(rendered, "NetworkPolicy", "cohortgate-gateway")["spec"]
    assert gw_policy["ingress"][0]["ports"] == [{"port": 9002, "protocol": "TCP"}]
    certs = {c["metadata"]["name"]: c for c in docs(rendered, "Certificate")}
    assert certs["cohortgate-processor"]["spec"]["uris"] == ["spiffe://cohortgate.local/gateway"]
    assert certs["cohortgate-mesh-client"]["spec"]["uris"] == ["spiffe://cohortgate.local/envoy"]
    assert certs["cohortgate-mesh-client"]["spec"]["issuerRef"]["kind"] == "ClusterIssuer"


# ------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cli_writes_what_the_golden_files_hold(tmp_path, config):
    out = tmp_path / "out"
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), *GOLDEN_FLAGS[config]]) == 0
    written = {p.name: p.read_text() for p in out.iterdir()}
    golden = {p.name: p.read_text() for p in (GOLDEN / config).glob("*.yaml")}
    assert written == golden


def test_cli_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--gpu-variant", "tabular/x"]) == 2
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--redis-url", "redis://:p@r:1"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nroutes: []\n")
    assert main(["k8s", "render", "--policy", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tabular/x" in err and "credentials" in err and "bad.yaml:" in err
    assert not out.exists()


def test_cli_removes_files_of_an_earlier_render(tmp_path):
    out = tmp_path / "out"
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--with-redis"]) == 0
    assert (out / "edge.yaml").exists() and (out / "redis.yaml").exists()
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--mesh", "istio"]) == 0
    assert not (out / "edge.yaml").exists() and not (out / "redis.yaml").exists()
    assert (out / "mesh.yaml").exists()


# -------------------------------------------------------------------------------- properties


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63).filter(
    lambda s: s[0].isalnum() and s[-1].isalnum()
)


@given(_NAME, _NAME, st.integers(min_value=0, max_value=99))
def test_backend_names_are_dns_labels(route, variant, index):
    name = dns_name("cg", route, variant, str(index))
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert name == dns_name("cg", route, variant, str(index))
    if len(f"cg-{route}-{variant}-{index}") <= 63:
        assert name == f"cg-{route}-{variant}-{index}"


def test_long_names_stay_distinct():
    a = dns_name("cg", "r" * 40, "variant-a" + "x" * 20, "0")
    b = dns_name("cg", "r" * 40, "variant-b" + "x" * 20, "0")
    assert a != b and len(a) == len(b) == 63


def test_no_secret_like_base64_in_configmaps(renders):
    """ConfigMaps hold the policy, Envoy's bootstrap and its clusters: none of it decodes to a key."""
    for rendered in renders.values():
        for cm in docs(rendered, "ConfigMap"):
            for text in cm["data"].values():
                for blob in re.findall(r"[A-Za-z0-9+/=]{120,}", text):
                    assert b"PRIVATE" not in base64.b64decode(blob + "==", validate=False)


def test_edge_bootstrap_names_only_files_the_pod_has(renders):
    """No placeholder certificate paths: the edge pod's TLS Secret holds tls.crt, tls.key, ca.crt."""
    text = named(renders["edge"], "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    assert "unused" not in text
    files = {line.split("filename:")[1].strip() for line in text.splitlines() if "filename:" in line}
    assert files == {f"/etc/cohortgate/tls/envoy/{name}" for name in ("tls.crt", "tls.key", "ca.crt")}


def _with_forward_authorization(route_index: int, *, drop_shadows: bool):
    from cohortgate.core.policy import parse_policy

    raw = yaml.safe_load(EXAMPLE.read_text())
    route = raw["routes"][route_index]
    route["forward_authorization"] = True
    if drop_shadows:
        route.pop("shadows", None)
    text = yaml.safe_dump(raw, sort_keys=False)
    return parse_policy(text, filename=str(EXAMPLE), base_dir=EXAMPLE.parent), text


def test_envoy_gateway_rules_remove_authorization_unless_the_route_keeps_it(renders):
    """Issue 16.7 with a mesh: each HTTPRoute rule removes the bearer token before the backend and
    its mirrors; a forward_authorization route keeps it, and with shadows is refused (a mirror would
    get the token too)."""
    strip = {"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["authorization"]}}
    rules = [r for d in docs(renders["envoy-gateway"], "HTTPRoute") for r in d["spec"]["rules"] if "backendRefs" in r]
    assert rules and all(r["filters"][0] == strip for r in rules)

    index = next(i for i, r in enumerate(yaml.safe_load(EXAMPLE.read_text())["routes"]) if r.get("shadows"))
    policy, text = _with_forward_authorization(index, drop_shadows=False)
    with pytest.raises(PlanError, match="forward_authorization with shadows"):
        render(policy, text, CONFIGS["envoy-gateway"])
    policy, text = _with_forward_authorization(index, drop_shadows=True)
    kept = {b.cluster for v in policy.routes[index].variants for b in v.backends}
    rendered = render(policy, text, CONFIGS["envoy-gateway"])
    for d in docs(rendered, "HTTPRoute"):
        for rule in d["spec"]["rules"]:
            cluster = next((h["value"] for m in rule["matches"] for h in m.get("headers", [])), None)
            if cluster in kept:
                assert strip not in (rule.get("filters") or [])
            elif cluster is not None:
                assert rule["filters"][0] == strip
    # Istio embeds the edge's clusters, which carry the rule themselves.
    assert render(policy, text, CONFIGS["istio"]).files


def test_processor_timeout_reaches_the_edge_and_both_meshes(example):
    """One setting (k8s render --processor-timeout) for every Envoy that calls the processor."""
    policy, raw = example
    options = {name: dataclasses.replace(o, processor_timeout_s=2.5) for name, o in CONFIGS.items()}
    edge = render(policy, raw, options["edge"])
    bootstrap = named(edge, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    assert "message_timeout: 2.500s" in bootstrap
    eg = named(render(policy, raw, options["envoy-gateway"]), "EnvoyExtensionPolicy", "cohortgate")
    assert eg["spec"]["extProc"][0]["messageTimeout"] == "2500ms"
    istio = named(render(policy, raw, options["istio"]), "EnvoyFilter", "cohortgate")
    assert istio["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["message_timeout"] == "2.500s"
    with pytest.raises(ValueError, match="processor timeout"):
        RenderOptions(processor_timeout_s=0)


def test_an_outcomes_route_is_named_in_a_warning_not_a_loopback_one(renders):
    """The example's outcomes route posts to the controller's API, which the render keeps pod-local:
    the user is told in one sentence what to do instead of a generic loopback warning."""
    warnings = renders["edge"].warnings
    outcomes = [w for w in warnings if "kind: outcomes" in w]
    assert outcomes and all("Redis stream" in w for w in outcomes)
    assert not any("9480" in w and "loopback" in w for w in warnings)
