"""The Grafana dashboard: every query parses (promtool), names only exported metrics, and the model
survives a round trip through the Grafana Foundation SDK's dashboard model without losing a field."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cohortgate.cli import main as cli
from cohortgate.deploy import grafana
from cohortgate.deploy.promql import EXPORTED, metric_names
from tests.needs import import_or_missing, missing

#: Grafana's own variables, replaced by what Grafana would send so promtool can parse the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "30s", "$route": ".*", "$variant": ".*"}


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool is not installed (make system-deps installs Debian's prometheus package)")
    exprs = grafana.queries(grafana.dashboard())
    assert len(exprs) >= 15
    rules = [{"record": f"cohortgate:check_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "q.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip  # noqa: E501
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_a_broken_query_is_caught(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses an unbalanced query."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool is not installed")
    rules = [{"record": "cohortgate:broken", "expr": "sum by (route (rate(cohortgate_requests_total[1m]))"}]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "q.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip  # noqa: E501
    assert result.returncode != 0


def test_queries_name_only_exported_metrics_and_cover_the_brief() -> None:
    named: set[str] = set()
    for expr in grafana.queries(grafana.dashboard()):
        names = metric_names(concrete(expr))
        assert names, expr
        assert names <= EXPORTED, (expr, names - EXPORTED)
        named |= names
    for needed in (
        "cohortgate_requests_total",  # traffic and errors per route and variant
        "cohortgate_request_duration_seconds_bucket",  # latency
        "cohortgate_variant_weight",  # effective weights
        "cohortgate_controller_actions_total",  # rollbacks
        "cohortgate_decisions_total",  # denials by code
        "cohortgate_shadow_copies_total",  # shadows
        "cohortgate_sidecar_batch_size_bucket",  # sidecar batch sizes
    ):
        assert needed in named


def _lost(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths in ``a`` missing or changed in ``b``."""
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return [path]
        return [p for k in a for p in ([f"{path}/{k}"] if k not in b else _lost(a[k], b[k], f"{path}/{k}"))]
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [path]
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _lost(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_dashboard_round_trips_through_the_foundation_sdk_model() -> None:
    """The SDK's model is generated from Grafana's dashboard schema: a field it does not know, or one of
    the wrong shape, is dropped or changed on the way through, and the test names it."""
    dashboard_model = import_or_missing("grafana_foundation_sdk.models.dashboard")
    encoder = import_or_missing("grafana_foundation_sdk.cog.encoder")
    plugins = import_or_missing("grafana_foundation_sdk.cog.plugins")
    plugins.register_default_plugins()
    doc = grafana.dashboard()
    model = dashboard_model.Dashboard.from_json(doc)
    back = json.loads(json.dumps(model, cls=encoder.JSONEncoder))
    assert _lost(doc, back) == []
    assert back["schemaVersion"] == grafana.SCHEMA_VERSION
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    # no two panels overlap on the 24-column grid
    cells = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
        assert g["x"] + g["w"] <= 24


def test_the_round_trip_catches_an_unknown_field() -> None:
    dashboard_model = import_or_missing("grafana_foundation_sdk.models.dashboard")
    encoder = import_or_missing("grafana_foundation_sdk.cog.encoder")
    doc = grafana.dashboard()
    doc["panels"][1]["gridPosition"] = doc["panels"][1].pop("gridPos")  # a typo Grafana would ignore
    back = json.loads(json.dumps(dashboard_model.Dashboard.from_json(doc), cls=encoder.JSONEncoder))
    assert "/panels[1]/gridPosition" in _lost(doc, back)


def test_cli_writes_provisionable_files(tmp_path: Path) -> None:
    assert cli(["grafana", "render", "--out", str(tmp_path), "--prometheus-url", "http://127.0.0.1:9090"]) == 0
    doc = json.loads((tmp_path / "dashboards" / "cohortgate.json").read_text())
    assert doc["uid"] == grafana.UID
    ds = yaml.safe_load((tmp_path / "provisioning" / "datasources" / "cohortgate.yaml").read_text())
    assert ds["apiVersion"] == 1
    assert ds["datasources"][0]["uid"] == grafana.DATASOURCE_UID
    assert ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
    prov = yaml.safe_load((tmp_path / "provisioning" / "dashboards" / "cohortgate.yaml").read_text())
    assert prov["providers"][0]["type"] == "file"
    # the dashboard's datasource variable defaults to the provisioned datasource
    var = next(v for v in doc["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == grafana.DATASOURCE_UID
