"""`k8s render --gateway-workers N|auto` and `--sidecar-cpu`: the gateway's processes, Envoy's worker
threads and the CPU requests that go with them, and the sidecar's intra-op threads from its CPU (issue 25)."""

from __future__ import annotations

import socket

import pytest
import yaml

from cohortgate.cli import main
from cohortgate.core.contract import MAX_GATEWAY_WORKERS, worker_socket
from cohortgate.deploy import envoy as envoyconf
from cohortgate.deploy.k8s import objects, probe, sizing
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.render import Rendered, render
from tests.deploy.k8s.conftest import EXAMPLE, docs, named
from tests.deploy.k8s.test_render import _validate


def _render(example, **options) -> Rendered:
    policy, raw = example
    return render(policy, raw, RenderOptions(image="cohortgate:test", **options), source=EXAMPLE.name)


def _edge(rendered: Rendered) -> tuple[dict, dict, dict]:
    """(envoy container, gateway container, Envoy's bootstrap) of the edge pod."""
    pod = named(rendered, "Deployment", "cohortgate-edge")["spec"]["template"]["spec"]
    envoy, gateway = pod["containers"]
    bootstrap = yaml.safe_load(named(rendered, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"])
    return envoy, gateway, bootstrap


def _arg(container: dict, flag: str) -> str | None:
    args = container["args"]
    return args[args.index(flag) + 1] if flag in args else None


def _processor_sockets(bootstrap: dict) -> list[str]:
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == envoyconf.PROCESSOR_CLUSTER)
    return [
        e["endpoint"]["address"]["pipe"]["path"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def test_n_workers_set_the_gateway_envoy_and_their_requests(example):
    rendered = _render(example, gateway_workers=4)
    for doc in docs(rendered):
        _validate(doc)
    envoy, gateway, bootstrap = _edge(rendered)
    assert _arg(gateway, "--workers") == "4"
    assert _arg(envoy, "--concurrency") == "4"  # one Envoy worker thread per gateway worker
    sockets = [worker_socket(objects.SOCKET, i, 4) for i in range(4)]
    assert _processor_sockets(bootstrap) == sockets == [f"{objects.SOCKET}.w{i}" for i in range(4)]
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == envoyconf.PROCESSOR_CLUSTER)
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    # 1 000 req/s needs 50m of gateway and 75m of Envoy; four workers and four Envoy threads get 50m each
    assert gateway["resources"]["requests"]["cpu"] == "200m" and envoy["resources"]["requests"]["cpu"] == "200m"
    assert "cpu" not in gateway["resources"]["limits"] and "cpu" not in envoy["resources"]["limits"]
    for probe_ in ("readinessProbe", "livenessProbe", "startupProbe"):  # every worker's socket must answer
        assert gateway[probe_]["exec"]["command"] == [*objects.PROBE, "uds", *sockets]
    # the bootstrap is part of the pod's identity: another worker count rolls the pods
    annotations = named(rendered, "Deployment", "cohortgate-edge")["spec"]["template"]["metadata"]["annotations"]
    one = named(_render(example, gateway_workers=1), "Deployment", "cohortgate-edge")["spec"]["template"]
    assert (
        annotations["cohortgate.dev/bootstrap-sha256"]
        != one["metadata"]["annotations"]["cohortgate.dev/bootstrap-sha256"]
    )


def test_auto_follows_the_gateway_cpu_request(example):
    envoy, gateway, bootstrap = _edge(_render(example, target_rps_per_pod=20_000))
    # fast: 50 µs x 20 000 = 1000m, two workers at 60 % of a core each; Envoy 75 µs x 20 000 = 1500m
    assert gateway["resources"]["requests"]["cpu"] == "1000m" and envoy["resources"]["requests"]["cpu"] == "1500m"
    assert _arg(gateway, "--workers") == "2" and _arg(envoy, "--concurrency") == "2"
    assert len(_processor_sockets(bootstrap)) == 2
    envoy, gateway, bootstrap = _edge(_render(example))  # the default rate: one process, as before
    assert _arg(gateway, "--workers") is None and _arg(envoy, "--concurrency") == "1"
    assert _processor_sockets(bootstrap) == [objects.SOCKET]
    assert gateway["readinessProbe"]["exec"]["command"] == [*objects.PROBE, "uds", objects.SOCKET]


@pytest.mark.parametrize(
    ("rps", "expected"),
    [(1, 1), (12_000, 1), (12_001, 2), (24_000, 2), (100_000, 9), (MAX_GATEWAY_WORKERS * 12_000, MAX_GATEWAY_WORKERS)],
)
def test_auto_workers_carry_the_rate_at_the_headroom(rps, expected):
    size = sizing.edge("grpc", "fast", rps, "auto")
    assert size.gateway_workers == expected
    assert size.max_rps >= rps and size.envoy_concurrency >= size.gateway_workers
    assert size.envoy_concurrency * 1000 >= size.envoy_cpu_milli  # Envoy has the threads its request pays for


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gateway_workers": 0}, "1 to 64 or auto"),
        ({"gateway_workers": MAX_GATEWAY_WORKERS + 1}, "1 to 64 or auto"),
        ({"gateway_workers": "3"}, "1 to 64 or auto"),
        ({"gateway_workers": True}, "1 to 64 or auto"),
        ({"gateway_workers": 2, "target_rps_per_pod": 30_000}, "2 gateway workers top out near 24000"),
        ({"target_rps_per_pod": MAX_GATEWAY_WORKERS * 12_000 + 1}, "65 gateway workers"),
        ({"gateway_workers": 2, "mesh": Mesh.ISTIO}, "mesh reaches the gateway over TCP"),
        ({"mesh": Mesh.ISTIO, "target_rps_per_pod": 13_000}, "one gateway process tops out"),
        ({"sidecar_cpu": "0"}, "--sidecar-cpu"),
        ({"sidecar_cpu": "lots"}, "--sidecar-cpu"),
    ],
)
def test_bad_worker_and_cpu_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RenderOptions(**kwargs)


def test_a_mesh_gateway_stays_one_process(example):
    rendered = _render(example, mesh=Mesh.ENVOY_GATEWAY, target_rps_per_pod=5_000)
    container = named(rendered, "Deployment", "cohortgate-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert _arg(container, "--workers") is None and container["resources"]["requests"]["cpu"] == "250m"


@pytest.mark.parametrize(
    ("cpu", "threads", "limit"), [(None, "1", None), ("4", "3", "4"), ("2500m", "1", "2500m"), ("3.5", "2", "3.5")]
)
def test_sidecar_threads_follow_its_cpu(example, cpu, threads, limit):
    rendered = _render(example, sidecar_cpu=cpu)
    deployments = [
        d
        for d in docs(rendered, "Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "sidecar"
    ]
    assert deployments
    for deployment in deployments:
        _validate(deployment)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert _arg(container, "--threads") == threads
        assert container["resources"]["requests"]["cpu"] == (cpu or sizing.SIDECAR_CPU)
        assert container["resources"]["limits"].get("cpu") == limit


def test_the_cli_passes_workers_and_sidecar_cpu(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--gateway-workers", "3", "--sidecar-cpu", "2"]
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), *flags]) == 0
    edge = {d["kind"]: d for d in yaml.safe_load_all((out / "edge.yaml").read_text()) if d}
    envoy, gateway = edge["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert _arg(gateway, "--workers") == "3" and _arg(envoy, "--concurrency") == "3"
    sidecar = next(
        d for d in yaml.safe_load_all((out / "sidecars.yaml").read_text()) if d and d["kind"] == "Deployment"
    )
    assert _arg(sidecar["spec"]["template"]["spec"]["containers"][0], "--threads") == "1"
    assert main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--target-rps", "20000"]) == 0
    edge = {d["kind"]: d for d in yaml.safe_load_all((out / "edge.yaml").read_text()) if d}
    assert _arg(edge["Deployment"]["spec"]["template"]["spec"]["containers"][1], "--workers") == "2"
    with pytest.raises(SystemExit):
        main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(out), "--gateway-workers", "many"])
    rc = main(
        [
            "k8s",
            "render",
            "--policy",
            str(EXAMPLE),
            "--out",
            str(out),
            "--gateway-workers",
            "1",
            "--target-rps",
            "20000",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "'many': a number of workers, or auto" in err and "one gateway process tops out" in err


def test_the_probe_wants_every_socket(tmp_path, capsys):
    paths = [str(tmp_path / f"p.w{i}") for i in range(2)]
    listeners = []
    try:
        for path in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen()
            listeners.append(s)
        assert probe.main(["uds", *paths]) == 0
        assert probe.main(["uds", *paths, str(tmp_path / "p.w2")]) == 1
        assert "p.w2" in capsys.readouterr().err
        assert probe.main(["uds"]) == 2
    finally:
        for s in listeners:
            s.close()
