"""Envoy's OpenTelemetry tracer (rendered only when a collector is given) and the stats tag rule that
keeps a policy cluster's dotted name whole in ``envoy_cluster_name``. A real Envoy validates the traced
bootstrap and, for the tag rule, serves its Prometheus page from the rendered config."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cohortgate.cli import main
from cohortgate.core.contract import cluster_name
from cohortgate.deploy import envoy as ec
from cohortgate.deploy.envoy.telemetry import CLUSTER_NAME_TAG_REGEX, OTLP_CLUSTER
from tests.deploy.test_envoy import EXAMPLE
from tests.deploy.test_envoy_package import _find
from tests.integration.conftest import free_port

#: Envoy starts in about a second; a loaded 2-core CI machine may take many
ENVOY_START_TIMEOUT_S = 60.0


def _render(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    argv = ["envoy", "render", "--policy", str(EXAMPLE), "--out", str(out), "--certs", str(tmp_path / "none")]
    assert main([*argv, *extra]) == 0
    return yaml.safe_load((out / "bootstrap.yaml").read_text())


def _hcm(doc: dict) -> dict:
    return _find(doc, "HttpConnectionManager")


def test_no_tracer_unless_a_collector_is_given(tmp_path: Path) -> None:
    doc = _render(tmp_path)
    assert "tracing" not in _hcm(doc)
    assert OTLP_CLUSTER not in [c["name"] for c in doc["static_resources"]["clusters"]]


def test_the_tracer_exports_otlp_http_to_the_collector_at_the_given_rate(tmp_path: Path) -> None:
    doc = _render(tmp_path, "--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "0.25")
    tracing = _hcm(doc)["tracing"]
    assert tracing["random_sampling"] == {"value": 25.0}
    assert tracing["spawn_upstream_span"] is True  # the sidecar's span hangs off Envoy's upstream span
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    config = provider["typed_config"]
    assert config["service_name"] == "cohortgate-envoy"
    assert config["http_service"]["http_uri"] == {
        "uri": "http://127.0.0.1:4318/v1/traces",
        "cluster": OTLP_CLUSTER,
        "timeout": "2s",
    }
    (collector,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER]
    assert collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 4318}
    }


def test_trace_collector_accepts_only_plain_http_and_a_ratio_in_range() -> None:
    assert ec.TraceCollector.parse("http://collector/otel/").uri == "http://collector:4318/otel/v1/traces"
    for bad in ("https://collector:4318", "collector:4318", "grpc://c:4317"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            ec.TraceCollector.parse(bad)
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        ec.TraceCollector.parse("http://c:4318", 1.5)
    assert main(["envoy", "render", "--policy", str(EXAMPLE), "--otlp-endpoint", "https://c"]) == 2


def test_the_traced_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path / "certs")]) == 0
    out = tmp_path / "out"
    argv = ["envoy", "render", "--policy", str(EXAMPLE), "--out", str(out), "--certs", str(tmp_path / "certs")]
    assert main([*argv, "--otlp-endpoint", "http://127.0.0.1:4318", "--validate"]) == 0


@pytest.mark.parametrize(
    ("stat", "tag"),
    [
        (f"cluster.{cluster_name('ae-scoring', 'control', 0)}.upstream_rq_total", "cg.ae-scoring.control.0"),
        (f"cluster.{cluster_name('tabular', 'canary', 12)}.upstream_rq_5xx", "cg.tabular.canary.12"),
        ("cluster.cohortgate_processor.upstream_cx_connect_fail", "cohortgate_processor"),
    ],
)
def test_the_tag_rule_takes_the_whole_cluster_name(stat: str, tag: str) -> None:
    """Envoy's rule (RE2): group 1 is cut from the name, group 2 is the value."""
    match = re.match(CLUSTER_NAME_TAG_REGEX, stat)
    assert match is not None and match.group(2) == tag
    assert stat.replace(match.group(1), "", 1).startswith("cluster.upstream_")


def test_envoy_labels_cluster_stats_with_the_full_dotted_name(tmp_path: Path) -> None:
    """A real Envoy, from the rendered bootstrap: stats of ``cg.ROUTE.VARIANT.N`` clusters are
    ``envoy_cluster_*{envoy_cluster_name="cg.ROUTE.VARIANT.N"}``, the processor's keep their name."""
    from cohortgate.deploy.envoyproc import envoy_binary

    assert main(["certs", "init", "--dir", str(tmp_path / "certs")]) == 0
    admin, listen = free_port(), free_port()
    out = tmp_path / "out"
    argv = ["envoy", "render", "--policy", str(EXAMPLE), "--out", str(out), "--certs", str(tmp_path / "certs")]
    assert main([*argv, "--admin-port", str(admin), "--listen-port", str(listen)]) == 0
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(out / "bootstrap.yaml"), "--concurrency", "1", "-l", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + ENVOY_START_TIMEOUT_S
        page = ""
        while time.monotonic() < deadline and "cg.tabular.control.0" not in page:
            time.sleep(0.25)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                continue
        assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="cg.tabular.control.0"}' in page
        assert 'envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name="cohortgate_processor"}' in page
        assert 'envoy_cluster_name="cg"' not in page
        assert "envoy_cluster_tabular_" not in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_up_passes_the_collector_to_the_gateway_and_each_sidecar() -> None:
    """`cohortgate up --otlp-endpoint URL --trace-sample R`: the recipes carry the flags (Envoy's
    bootstrap gets the tracer from the same options), and nothing when tracing is off."""
    from cohortgate.local import recipes
    from tests.local.test_recipes import layout, spec

    on = layout(otlp_endpoint="http://127.0.0.1:4318", trace_sample=0.05)
    flags = ("--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "0.05")
    for argv in (recipes.gateway_recipe(on, Path("/srv/cds.yaml")).argv, recipes.sidecar_recipe(spec(), 8102, on).argv):
        assert any(argv[i : i + 4] == flags for i in range(len(argv))), argv
    off = layout()
    for argv in (
        recipes.gateway_recipe(off, Path("/srv/cds.yaml")).argv,
        recipes.sidecar_recipe(spec(), 8102, off).argv,
    ):
        assert "--otlp-endpoint" not in argv


def test_up_parses_the_tracing_flags() -> None:
    import argparse

    from cohortgate.cli.up import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["up", "--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "0.2"])
    assert (args.otlp_endpoint, args.trace_sample) == ("http://127.0.0.1:4318", 0.2)
