# ruff: noqa: E501  (a PromQL query reads best on one line)
"""A provisionable Grafana dashboard over the metrics cohortgate really exports (``cohortgate grafana render``).

Pure data: `dashboard` returns the dashboard model (Grafana's JSON, schemaVersion 39) and
`provisioning` the datasource and dashboard-provider files Grafana reads at start; `write` puts
them in a directory laid out as Grafana's ``/etc/grafana/provisioning`` and ``/var/lib/grafana``
expect (docs/observability.md). Every query names only metrics in `cohortgate.deploy.promql.EXPORTED`;
tests/deploy/test_grafana.py parses each with promtool and round-trips the model through the Grafana
Foundation SDK's.

Shadow *agreement* is not a Prometheus metric (the controller computes it and serves it on its API
and dashboard page); the shadow row shows the mirrored copies and the sidecars' report deliveries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

UID = "cohortgate-overview"
DATASOURCE_UID = "cohortgate-prometheus"
SCHEMA_VERSION = 39

_SEL = 'route=~"$route", variant=~"$variant"'
_RATE = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class PanelSpec:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""


def _q(expr: str, legend: str) -> Query:
    return Query(expr, legend)


#: (row title, panels); each row is 24 units wide, two or three panels a row.
ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Traffic",
        (
            PanelSpec(
                "Answered requests by variant",
                (_q(f"sum by (route, variant) (rate(cohortgate_requests_total{{{_SEL}}}[{_RATE}]))", "{{route}}/{{variant}}"),),
                "reqps",
                description="From Envoy's access log, as the controller counts them.",
            ),
            PanelSpec(
                "Routing decisions by variant",
                (
                    _q(
                        f"sum by (route, variant) (rate(cohortgate_routed_requests_total{{{_SEL}}}[{_RATE}]))",
                        "{{route}}/{{variant}}",
                    ),
                ),
                "reqps",
                description="Allowed requests by the variant the processor chose.",
            ),
            PanelSpec(
                "Effective weights",
                (_q(f"max by (route, variant) (cohortgate_variant_weight{{{_SEL}}})", "{{route}}/{{variant}}"),),
                "percent",
                description="What the gateways apply now (max over gateways; an alert fires if they disagree).",
            ),
        ),
    ),
    (
        "Errors and latency",
        (
            PanelSpec(
                "Error ratio (5xx and no answer)",
                (
                    _q(
                        f'sum by (route, variant) (rate(cohortgate_requests_total{{{_SEL}, status_class=~"5xx|none"}}[{_RATE}]))'
                        f" / sum by (route, variant) (rate(cohortgate_requests_total{{{_SEL}}}[{_RATE}]))",
                        "{{route}}/{{variant}}",
                    ),
                ),
                "percentunit",
            ),
            PanelSpec(
                "Latency p95",
                (
                    _q(
                        "histogram_quantile(0.95, sum by (route, variant, le) "
                        f"(rate(cohortgate_request_duration_seconds_bucket{{{_SEL}}}[{_RATE}])))",
                        "{{route}}/{{variant}}",
                    ),
                ),
                "s",
            ),
            PanelSpec(
                "Harm tests: always-valid p-values",
                (
                    _q(
                        'min by (route, variant, metric) (cohortgate_controller_p_value{route=~"$route", variant=~"$variant"})',
                        "{{route}}/{{variant}} {{metric}}",
                    ),
                ),
                "short",
                description="The controller's sequential harm tests; below the policy's alpha a variant is rolled back.",
            ),
        ),
    ),
    (
        "Decisions",
        (
            PanelSpec(
                "Denials by code",
                (
                    _q(
                        f'sum by (code) (rate(cohortgate_decisions_total{{outcome="denied"}}[{_RATE}]))',
                        "{{code}}",
                    ),
                ),
                "reqps",
            ),
            PanelSpec(
                "Rollbacks, halts and promotions",
                (
                    _q(
                        'sum by (route, variant, action) (increase(cohortgate_controller_actions_total{route=~"$route"}[$__range]))',
                        "{{route}}/{{variant}} {{action}}",
                    ),
                ),
                "short",
                "stat",
                "Controller actions in the time range (rollback, halt, promote, resume, alert).",
            ),
            PanelSpec(
                "Fail-closed and processor errors",
                (
                    _q(f"sum(rate(envoy_http_ext_proc_cohortgate_streams_failed[{_RATE}]))", "ext_proc stream failed (503)"),
                    _q(f'sum(rate(cohortgate_decisions_total{{outcome="error"}}[{_RATE}]))', "processor error"),
                    _q(
                        f'sum by (envoy_response_code_class) (rate(envoy_http_downstream_rq_xx{{envoy_http_conn_manager_prefix="cohortgate"}}[{_RATE}]))',
                        "Envoy {{envoy_response_code_class}}xx",
                    ),
                ),
                "reqps",
            ),
        ),
    ),
    (
        "Shadows and sidecars",
        (
            PanelSpec(
                "Shadow copies and reports",
                (
                    _q(f'sum by (route, shadow) (rate(cohortgate_shadow_copies_total{{route=~"$route"}}[{_RATE}]))', "{{route}} → {{shadow}}"),
                    _q(f"sum by (model, outcome) (rate(cohortgate_sidecar_shadow_reports_total[{_RATE}]))", "{{model}} report {{outcome}}"),
                ),
                "reqps",
                description="Agreement itself is on the controller's page (/api/state), not in Prometheus.",
            ),
            PanelSpec(
                "Sidecar batch size",
                (
                    _q(f"histogram_quantile(0.5, sum by (model, le) (rate(cohortgate_sidecar_batch_size_bucket[{_RATE}])))", "{{model}} p50"),
                    _q(f"histogram_quantile(0.95, sum by (model, le) (rate(cohortgate_sidecar_batch_size_bucket[{_RATE}])))", "{{model}} p95"),
                ),
                "short",
            ),
            PanelSpec(
                "Sidecar queue",
                (
                    _q("sum by (model) (cohortgate_sidecar_queue_depth)", "{{model}} waiting"),
                    _q(
                        f"histogram_quantile(0.95, sum by (model, le) (rate(cohortgate_sidecar_queue_seconds_bucket[{_RATE}])))",
                        "{{model}} p95 wait (s)",
                    ),
                ),
                "short",
            ),
        ),
    ),
)  # fmt: skip


def _datasource() -> dict[str, str]:
    return {"type": "prometheus", "uid": "${datasource}"}


def _panel(spec: PanelSpec, pid: int, x: int, y: int, w: int) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "id": pid,
        "type": spec.kind,
        "title": spec.title,
        "description": spec.description,
        "datasource": _datasource(),
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": _datasource(), "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(spec.queries)
        ],
    }
    if spec.kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return panel


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": _datasource(),
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    """The dashboard model (what Grafana's 'Export → JSON' shows)."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, specs in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        pid, y = pid + 1, y + 1
        w = 24 // len(specs)
        for i, spec in enumerate(specs):
            panels.append(_panel(spec, pid, i * w, y, w))
            pid += 1
        y += 8
    return {
        "uid": UID,
        "title": "cohortgate",
        "description": "Traffic, errors, latency, weights, decisions and rollbacks per route and variant.",
        "tags": ["cohortgate"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m"]},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "name": "Rollbacks",
                    "enable": True,
                    "iconColor": "red",
                    "datasource": _datasource(),
                    "expr": 'sum by (route, variant) (changes(cohortgate_controller_actions_total{action="rollback"}[1m])) > 0',
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": DATASOURCE_UID},
                },
                _variable("route", "label_values(cohortgate_variant_weight, route)"),
                _variable("variant", 'label_values(cohortgate_variant_weight{route=~"$route"}, variant)'),
            ]
        },
        "panels": panels,
    }  # fmt: skip


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a dashboard model: panel targets, annotations, variable queries
    (``label_values(SELECTOR, label)`` contributes its selector)."""
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    out += [a["expr"] for a in doc["annotations"]["list"]]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            inner = v["query"]["query"].removeprefix("label_values(").removesuffix(")")
            out.append(inner.rsplit(",", 1)[0])
    return out


def provisioning(
    prometheus_url: str, dashboards_path: str = "/var/lib/grafana/dashboards/cohortgate"
) -> dict[str, str]:
    """Relative path -> YAML text of the datasource and dashboard-provider provisioning files."""
    datasources = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "uid": DATASOURCE_UID,
                "access": "proxy",
                "url": prometheus_url,
                "isDefault": True,
                "editable": False,
            }
        ],
    }
    providers = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "cohortgate",
                "folder": "cohortgate",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": True,
                "options": {"path": dashboards_path},
            }
        ],
    }
    return {
        "provisioning/datasources/cohortgate.yaml": yaml.safe_dump(datasources, sort_keys=False),
        "provisioning/dashboards/cohortgate.yaml": yaml.safe_dump(providers, sort_keys=False),
    }


def write(out: Path, prometheus_url: str = "http://prometheus:9090") -> list[Path]:
    """Write ``dashboards/cohortgate.json`` and the provisioning files under ``out``; returns the paths."""
    files = {**provisioning(prometheus_url), "dashboards/cohortgate.json": json.dumps(dashboard(), indent=2) + "\n"}
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
