"""`k8s render --otlp-endpoint`: Envoy's tracer in the edge bootstrap (accepted by the real Envoy),
and every cohortgate process exporting to the same collector, following Envoy's sampling."""

from __future__ import annotations

import contextlib

import pytest
import yaml

from cohortgate.cli import main
from cohortgate.deploy import pki
from cohortgate.deploy.envoyproc import validate
from cohortgate.deploy.k8s.options import RenderOptions
from cohortgate.deploy.k8s.render import render
from cohortgate.support.cliargs import sample_ratio
from tests.deploy.k8s.conftest import EXAMPLE, docs, named
from tests.deploy.k8s.test_envoy_accepts import _localise

COLLECTOR = "http://otel-collector.observability:4318"


@pytest.fixture(scope="module")
def traced(example):
    policy, raw = example
    return render(policy, raw, RenderOptions(otlp_endpoint=COLLECTOR, trace_sample=0.05), source=EXAMPLE.name)


def _args(rendered, kind: str) -> dict[str, list[str]]:
    out = {}
    for d in docs(rendered, kind):
        for c in d["spec"]["template"]["spec"]["containers"]:
            out[f"{d['metadata']['name']}/{c['name']}"] = c.get("args") or []
    return out


def test_every_cohortgate_process_exports_to_the_collector_and_follows_envoy(traced):
    args = _args(traced, "Deployment")
    ours = {k: v for k, v in args.items() if v and v[0] in ("gateway", "sidecar", "controller")}
    assert {v[0] for v in ours.values()} == {"gateway", "sidecar", "controller"}
    for name, a in ours.items():
        assert a[a.index("--otlp-endpoint") + 1] == COLLECTOR, name
        if a[0] != "controller":  # the controller's decisions are traces of their own
            assert a[a.index("--trace-sample") + 1] == "0", name


def test_the_edge_bootstrap_carries_the_tracer_and_envoy_accepts_it(traced, renders, tmp_path):
    bootstrap = named(traced, "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    doc = yaml.safe_load(bootstrap)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["random_sampling"]["value"] == pytest.approx(5.0)
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert "cohortgate_otlp" in clusters
    plain = named(renders["edge"], "ConfigMap", "cohortgate-envoy")["data"]["bootstrap.yaml"]
    assert "tracing" not in yaml.safe_load(plain)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # fmt: skip  # noqa: E501
    certs = pki.init_certs(tmp_path / "certs")
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "cds.yaml").write_text(named(traced, "ConfigMap", "cohortgate-policy")["data"]["cds.yaml"])
    path = tmp_path / "bootstrap.yaml"
    path.write_text(_localise(bootstrap, certs, policy_dir))
    validate(path)


def test_without_an_endpoint_nothing_traces(renders):
    for a in _args(renders["edge"], "Deployment").values():
        assert "--otlp-endpoint" not in a


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--otlp-endpoint", "https://collector:4318"], "http://HOST:PORT"),
        (["--otlp-endpoint", "http://collector:4318", "--trace-sample", "1.5"], "within 0..1"),
    ],
)
def test_bad_tracing_flags_are_refused_with_a_sentence(flags, says, tmp_path, capsys):
    with pytest.raises(SystemExit) if "1.5" in flags else contextlib.nullcontext():
        code = main(["k8s", "render", "--policy", str(EXAMPLE), "--out", str(tmp_path / "out"), *flags])
        assert code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("text", ["-0.1", "1.01", "2"])
def test_every_commands_trace_sample_is_a_share(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=r"within 0\.\.1"):
        sample_ratio(text)
    assert sample_ratio("0") == 0.0 and sample_ratio("1") == 1.0
