"""The alerting rules, evaluated by Prometheus's own ``promtool test rules`` on input series per alert.

Each case feeds series shaped like what the stack exports (labels included) and states which alerts
fire, with which labels and annotations; a neighbour series that must not fire sits beside each one.
promtool comes from Debian's prometheus package (``make system-deps``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cohortgate.cli import main as cli
from cohortgate.deploy import alerts
from cohortgate.deploy.promql import EXPORTED, metric_names
from tests.needs import missing

PROMTOOL = shutil.which("promtool")

GW = {"job": alerts.GATEWAY_JOB, "instance": "gw1:9102"}
GW2 = {"job": alerts.GATEWAY_JOB, "instance": "gw2:9102"}
ENVOY = {"job": alerts.ENVOY_JOB, "instance": "envoy1:9901"}
SC = {"job": alerts.SIDECAR_JOB, "instance": "sc1:8080", "model": "tabular"}
SC2 = {"job": alerts.SIDECAR_JOB, "instance": "sc2:8080", "model": "tabular"}
CTL = {"job": alerts.CONTROLLER_JOB, "instance": "ctl:8600"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def expected(alert: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
    """What promtool should report: the rule's labels plus ``labels``, its annotations expanded."""
    rule = next(r for r in alerts.rules() if r.alert == alert)

    def expand(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return text.replace("{{ $value | humanize }}", value)

    return {
        "exp_labels": {"severity": rule.severity, "service": "cohortgate", **rule.labels, **labels},
        "exp_annotations": {"summary": expand(rule.summary), "description": expand(rule.description)},
    }


def action(route: str, variant: str, act: str, values: str, actor: str = "controller") -> dict[str, str]:
    labels = {**CTL, "route": route, "variant": variant, "action": act, "actor": actor}
    return series("cohortgate_controller_actions_total", labels, values)


#: (alert, input series, eval time, alerts expected at that time)
CASES: list[tuple[str, list[dict[str, str]], str, list[dict[str, Any]]]] = [
    (
        "CohortgateProcessorDown",
        [series("up", GW, "1 1 0 0 0 0"), series("up", GW2, "1x6")],
        "5m",
        [expected("CohortgateProcessorDown", GW)],
    ),
    (
        "CohortgateFailClosed",
        [
            series(
                "envoy_http_ext_proc_cohortgate_streams_failed",
                {**ENVOY, "envoy_http_conn_manager_prefix": "cohortgate"},
                "0 0 0+60x10",
            ),
            series(
                "envoy_http_ext_proc_cohortgate_streams_failed",
                {**ENVOY, "instance": "envoy2:9901", "envoy_http_conn_manager_prefix": "cohortgate"},
                "0x12",
            ),
        ],
        "8m",
        [expected("CohortgateFailClosed", ENVOY, "1")],
    ),
    (
        "CohortgateProcessorUnreachable",
        [
            series(
                "envoy_cluster_upstream_cx_connect_fail",
                {**ENVOY, "envoy_cluster_name": "cohortgate_processor"},
                "0+60x10",
            ),
            series(
                "envoy_cluster_upstream_cx_connect_fail",
                {**ENVOY, "envoy_cluster_name": "cohortgate-tabular-control"},
                "0+60x10",
            ),
        ],
        "8m",
        [expected("CohortgateProcessorUnreachable", ENVOY)],
    ),
    (
        "CohortgateProcessorErrors",
        [
            series("cohortgate_decisions_total", {**GW, "outcome": "error", "code": "internal"}, "0+60x10"),
            series("cohortgate_decisions_total", {**GW2, "outcome": "error", "code": "internal"}, "5x10"),
            series("cohortgate_decisions_total", {**GW2, "outcome": "allowed", "code": "none"}, "0+600x10"),
        ],
        "8m",
        [expected("CohortgateProcessorErrors", GW, "1")],
    ),
    (
        "CohortgateDenialSpike",
        [
            # 0.1/s for 70 minutes, then 1/s: a tenfold spike
            series(
                "cohortgate_decisions_total", {**GW, "outcome": "denied", "code": "invalid_token"}, "0+6x70 480+60x15"
            ),
            # 1/s all along: high, but no spike
            series("cohortgate_decisions_total", {**GW, "outcome": "denied", "code": "forbidden"}, "0+60x86"),
        ],
        "80m",
        [expected("CohortgateDenialSpike", {"code": "invalid_token"}, "1")],
    ),
    (
        "CohortgateSampleRatioMismatch",
        [
            action("tabular", "canary", "halt", "0 0 1 1 1"),
            # a halt with a control-breach alert on the same route is not an SRM
            action("scoring", "canary", "halt", "0 0 1 1 1"),
            action("scoring", "control", "alert", "0 0 1 1 1"),
        ],
        "4m",
        [expected("CohortgateSampleRatioMismatch", {"route": "tabular", "variant": "canary"})],
    ),
    (
        "CohortgateControlBreach",
        [action("scoring", "control", "alert", "0 0 1 1 1"), action("tabular", "canary", "halt", "0 0 1 1 1")],
        "4m",
        [expected("CohortgateControlBreach", {"route": "scoring", "variant": "control"})],
    ),
    (
        "CohortgateRollback",
        [action("tabular", "canary", "rollback", "0 0 1 1 1"), action("tabular", "canary", "promote", "0 1 2 3 4")],
        "4m",
        [expected("CohortgateRollback", {"route": "tabular", "variant": "canary", "actor": "controller"})],
    ),
    (
        "CohortgateSidecarSaturated",
        [series("cohortgate_sidecar_queue_depth", SC, "100x10"), series("cohortgate_sidecar_queue_depth", SC2, "3x10")],
        "6m",
        [expected("CohortgateSidecarSaturated", SC)],
    ),
    (
        "CohortgateSidecarShedding",
        [
            series("cohortgate_sidecar_request_failures_total", {**SC, "status": "503"}, "0+60x10"),
            series("cohortgate_sidecar_request_failures_total", {**SC2, "status": "400"}, "0+60x10"),
        ],
        "8m",
        [expected("CohortgateSidecarShedding", SC)],
    ),
    (
        "CohortgateSidecarNotReady",
        [series("cohortgate_sidecar_ready", SC, "0x10"), series("cohortgate_sidecar_ready", SC2, "1x10")],
        "6m",
        [expected("CohortgateSidecarNotReady", SC)],
    ),
    (
        "CohortgateGatewaysDisagree",
        [
            series("cohortgate_variant_weight", {**GW, "route": "tabular", "variant": "canary"}, "10x5"),
            series("cohortgate_variant_weight", {**GW2, "route": "tabular", "variant": "canary"}, "25x5"),
            series("cohortgate_variant_weight", {**GW, "route": "tabular", "variant": "control"}, "90x5"),
            series("cohortgate_variant_weight", {**GW2, "route": "tabular", "variant": "control"}, "90x5"),
        ],
        "4m",
        [expected("CohortgateGatewaysDisagree", {"route": "tabular", "variant": "canary"})],
    ),
    (
        "CohortgateStateRefused",
        [
            series("cohortgate_state_updates_total", {**GW, "result": "invalid"}, "0 1 1 1"),
            series("cohortgate_state_updates_total", {**GW2, "result": "ok"}, "0 1 2 3"),
        ],
        "3m",
        [expected("CohortgateStateRefused", GW)],
    ),
    (
        "CohortgateStaleWeights",
        [
            action("tabular", "canary", "rollback", "0 0 1 1 1 1 1"),
            series("cohortgate_state_updates_total", {**GW, "result": "ok"}, "0 0 1 1 1 1 1"),
            series("cohortgate_state_updates_total", {**GW2, "result": "ok"}, "0x7"),  # never applied it
        ],
        "5m",
        [expected("CohortgateStaleWeights", {})],
    ),
    (
        "CohortgateStaleWeights",  # every gateway followed: silent
        [
            action("tabular", "canary", "rollback", "0 0 1 1 1 1 1"),
            series("cohortgate_state_updates_total", {**GW, "result": "ok"}, "0 0 1 1 1 1 1"),
            series("cohortgate_state_updates_total", {**GW2, "result": "ok"}, "0 0 0 1 1 1 1"),
        ],
        "5m",
        [],
    ),
]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        missing("promtool is not installed (make system-deps installs Debian's prometheus package)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_tests(tmp_path: Path, cases: list[tuple[str, list[dict[str, str]], str, list[dict[str, Any]]]]) -> Path:
    (tmp_path / "rules.yaml").write_text(alerts.render())
    doc = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp}],
            }
            for name, inputs, at, exp in cases
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=400))
    return path


def test_every_alert_fires_on_its_series_and_not_on_its_neighbours(tmp_path: Path) -> None:
    tests = write_tests(tmp_path, CASES)
    result = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """The harness can fail: expecting the stale-weights alert where every gateway followed is refused."""
    wrong = [(CASES[-1][0], CASES[-1][1], CASES[-1][2], [expected("CohortgateStaleWeights", {})])]
    result = promtool("test", "rules", write_tests(tmp_path, wrong).name, cwd=tmp_path)
    assert result.returncode != 0
    assert "CohortgateStaleWeights" in result.stdout + result.stderr


def test_every_rule_has_a_case() -> None:
    assert {r.alert for r in alerts.rules()} == {name for name, *_ in CASES}


def test_rule_file_checks_and_cli_writes_it(tmp_path: Path) -> None:
    out = tmp_path / "rules" / "cohortgate.yaml"
    assert cli(["alerts", "render", "--out", str(out), "--queue-depth", "7"]) == 0
    result = promtool("check", "rules", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts.rules())} rules found" in result.stdout
    assert "cohortgate_sidecar_queue_depth) > 7 or" in out.read_text()


@pytest.mark.parametrize("rule", alerts.rules(), ids=lambda r: r.alert)
def test_rules_name_only_metrics_of_the_stack(rule: alerts.Rule) -> None:
    """Every metric a rule names is in the list the stack exports (checked against live scrapes in
    tests/integration/test_observability.py)."""
    assert metric_names(rule.expr) <= EXPORTED | {"up"}


def test_the_prometheus_rule_manifest_holds_the_same_rules(tmp_path: Path) -> None:
    out = tmp_path / "rule.yaml"
    args = ["alerts", "render", "--k8s", "--namespace", "obs", "--label", "release=kps", "--out", str(out)]
    assert cli(args) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["namespace"] == "obs"
    assert doc["metadata"]["labels"]["release"] == "kps"
    assert doc["spec"] == yaml.safe_load(alerts.render())  # the groups promtool tested, unchanged
