"""Prometheus alerting rules over the metrics cohortgate and Envoy really export (``cohortgate alerts render``).

The rules are data (`Rule`), rendered to a Prometheus rule file as text; nothing here talks to
Prometheus. Every metric a rule names is exported by one of:

=================================  ==============================================================
gateway ``--metrics``              ``cohortgate_decisions_total``, ``cohortgate_variant_weight``,
                                   ``cohortgate_state_updates_total`` (gateway/metrics.py)
controller API ``/metrics``        ``cohortgate_controller_actions_total``, ``cohortgate_requests_total``
                                   (cohortgate/controller/metrics.py)
sidecar ``/metrics``               ``cohortgate_sidecar_*`` (sidecar/metrics.py)
Envoy admin ``/stats/prometheus``  ``envoy_http_ext_proc_cohortgate_streams_failed``,
                                   ``envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name=
                                   "cohortgate_processor"}`` (the ext_proc filter's and the processor
                                   cluster's stats; names read from a running Envoy 1.40)
=================================  ==============================================================

tests/deploy/test_alerts.py runs ``promtool test rules`` with input series for each alert, and
tests/integration/test_observability.py checks every name against scrapes of a running stack.

SRM has no metric of its own: the controller halts a variant on a sample-ratio mismatch or on a
control breach, and counts the latter as an extra ``alert`` action, so a ``halt`` without an
``alert`` on the same route is an SRM halt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

#: Prometheus job names the rules (and the Grafana dashboard's variables) assume; docs/observability.md
#: shows the scrape config that sets them.
GATEWAY_JOB = "cohortgate-gateway"
CONTROLLER_JOB = "cohortgate-controller"
SIDECAR_JOB = "cohortgate-sidecar"
ENVOY_JOB = "cohortgate-envoy"

GROUP = "cohortgate"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The knobs an operator tunes; defaults suit a few requests per second and up."""

    denial_spike_ratio: float = 3.0  # 5-minute denial rate against the hour before, per code
    denial_min_rate: float = 0.2  # denials/s below which a "spike" is noise
    sidecar_queue_depth: int = 64  # requests waiting for a batch
    sidecar_queue_p95_s: float = 0.1  # 95th percentile wait for a batch


@dataclass(frozen=True, slots=True)
class Rule:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"alert": self.alert, "expr": self.expr}
        if self.for_ != "0s":
            out["for"] = self.for_
        out["labels"] = {"severity": self.severity, "service": "cohortgate", **self.labels}
        out["annotations"] = {"summary": self.summary, "description": self.description}
        return out


def rules(t: Thresholds = Thresholds()) -> tuple[Rule, ...]:
    """The alerting rules, in the order the rule file lists them."""
    denied = 'cohortgate_decisions_total{outcome="denied"}'
    weight_actions = 'cohortgate_controller_actions_total{action=~"rollback|promote|resume"}'
    return (
        Rule(
            "CohortgateProcessorDown",
            f'up{{job="{GATEWAY_JOB}"}} == 0',
            "1m",
            "critical",
            "cohortgate gateway {{ $labels.instance }} is not answering scrapes",
            "Envoy fails closed without its processor: every request on this edge is answered 503.",
        ),
        Rule(
            "CohortgateFailClosed",
            "sum by (job, instance) (rate(envoy_http_ext_proc_cohortgate_streams_failed[2m])) > 0",
            "1m",
            "critical",
            "Envoy {{ $labels.instance }} answers 503: the processor stream fails",
            "ext_proc streams to the processor fail ({{ $value | humanize }}/s), so Envoy answers those "
            "requests 503 (fail-closed). Check the gateway process and its socket.",
        ),
        Rule(
            "CohortgateProcessorUnreachable",
            "sum by (job, instance) "
            '(rate(envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name="cohortgate_processor"}[2m])) > 0',
            "1m",
            "critical",
            "Envoy {{ $labels.instance }} cannot connect to the processor",
            "Connections to the cohortgate_processor cluster fail; requests are answered 503 (fail-closed).",
        ),
        Rule(
            "CohortgateProcessorErrors",
            'sum by (job, instance) (rate(cohortgate_decisions_total{outcome="error"}[5m])) > 0',
            "2m",
            "warning",
            "gateway {{ $labels.instance }} answers internal errors",
            "The processor caught exceptions it answered fail-closed ({{ $value | humanize }}/s); its log says why.",
        ),
        Rule(
            "CohortgateDenialSpike",
            f"sum by (code) (rate({denied}[5m])) > {t.denial_spike_ratio:g} * "
            f"(sum by (code) (rate({denied}[1h] offset 5m)) or sum by (code) (rate({denied}[5m])) * 0)"
            f" and sum by (code) (rate({denied}[5m])) > {t.denial_min_rate:g}",
            "5m",
            "warning",
            "denials with code {{ $labels.code }} spiked",
            f"Denials coded {{{{ $labels.code }}}} run at {{{{ $value | humanize }}}}/s, more than "
            f"{t.denial_spike_ratio:g}x the hour before: a bad client release, an expired key or an attack.",
        ),
        Rule(
            "CohortgateSampleRatioMismatch",
            'sum by (route, variant) (increase(cohortgate_controller_actions_total{action="halt"}[10m])) > 0 '
            'unless on (route) sum by (route) (increase(cohortgate_controller_actions_total{action="alert"}[10m])) > 0',
            "0s",
            "warning",
            "SRM halted {{ $labels.route }}/{{ $labels.variant }}",
            "Assignment counts do not fit the weights (sample-ratio mismatch): the controller halted the "
            "experiment; its results are not trustworthy until the cause is found (docs/statistics.md).",
        ),
        Rule(
            "CohortgateControlBreach",
            'sum by (route, variant) (increase(cohortgate_controller_actions_total{action="alert"}[10m])) > 0',
            "0s",
            "critical",
            "control of {{ $labels.route }} breaches a guardrail",
            "The route's control variant itself exceeds an absolute guardrail; rollouts are halted.",
        ),
        Rule(
            "CohortgateRollback",
            "sum by (route, variant, actor) "
            '(increase(cohortgate_controller_actions_total{action="rollback"}[10m])) > 0',
            "0s",
            "warning",
            "{{ $labels.route }}/{{ $labels.variant }} was rolled back ({{ $labels.actor }})",
            "The variant's users are back on control; the audit trail holds the evidence.",
        ),
        Rule(
            "CohortgateSidecarSaturated",
            f"max by (job, instance, model) (cohortgate_sidecar_queue_depth) > {t.sidecar_queue_depth} or "
            "histogram_quantile(0.95, sum by (job, instance, model, le) "
            "(rate(cohortgate_sidecar_queue_seconds_bucket[5m])))"
            f" > {t.sidecar_queue_p95_s:g}",
            "5m",
            "warning",
            "sidecar {{ $labels.instance }} ({{ $labels.model }}) is saturated",
            "Requests wait for a batch longer than they should (queue depth or p95 wait over the threshold). "
            "Add replicas or raise --max-batch-size.",
        ),
        Rule(
            "CohortgateSidecarShedding",
            'sum by (job, instance, model) (rate(cohortgate_sidecar_request_failures_total{status="503"}[5m])) > 0',
            "2m",
            "warning",
            "sidecar {{ $labels.instance }} ({{ $labels.model }}) sheds load",
            "The sidecar answers 503 (queue full, not ready or shutting down).",
        ),
        Rule(
            "CohortgateSidecarNotReady",
            "max by (job, instance, model) (cohortgate_sidecar_ready) == 0",
            "5m",
            "warning",
            "sidecar {{ $labels.instance }} ({{ $labels.model }}) is not ready",
            "The model has not loaded (or failed to): the sidecar answers 503.",
        ),
        Rule(
            "CohortgateGatewaysDisagree",
            "max by (route, variant) (cohortgate_variant_weight) "
            "!= min by (route, variant) (cohortgate_variant_weight)",
            "2m",
            "critical",
            "gateways apply different weights to {{ $labels.route }}/{{ $labels.variant }}",
            "At least one gateway does not follow the store (Redis or state file): its users get stale weights.",
        ),
        Rule(
            "CohortgateStateRefused",
            'sum by (job, instance) (increase(cohortgate_state_updates_total{result="invalid"}[5m])) > 0',
            "0s",
            "critical",
            "gateway {{ $labels.instance }} refuses the controller's state",
            "The gateway keeps its old weights; the controller and gateway may run different policies.",
        ),
        Rule(
            "CohortgateStaleWeights",
            f"sum(increase({weight_actions}[5m])) > 0 unless on () "
            'min(increase(cohortgate_state_updates_total{result="ok"}[10m])) > 0',
            "2m",
            "critical",
            "the controller changed weights but a gateway applied no new state",
            "A rollback, promotion or resume was decided, and some gateway has not applied a new state since: "
            "it is not following the store.",
        ),
    )


def render(t: Thresholds = Thresholds()) -> str:
    """The rule file (``rule_files:`` in prometheus.yml), as YAML text."""
    doc = {"groups": [{"name": GROUP, "rules": [r.as_dict() for r in rules(t)]}]}
    return "# Rendered by `cohortgate alerts render`; see docs/observability.md.\n" + yaml.safe_dump(
        doc, sort_keys=False, width=200
    )


def prometheus_rule(
    t: Thresholds = Thresholds(), namespace: str = "cohortgate", labels: dict[str, str] | None = None
) -> str:
    """The same rules as a Prometheus Operator ``PrometheusRule`` (``kubectl apply -f``). An operator
    picks rules up by its ``ruleSelector``; kube-prometheus-stack's selects ``release: <its release>``,
    so pass that in ``labels``."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "cohortgate",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "cohortgate", **(labels or {})},
        },
        "spec": {"groups": [{"name": GROUP, "rules": [r.as_dict() for r in rules(t)]}]},
    }
    return yaml.safe_dump(doc, sort_keys=False, width=200)


def scrape_config(gateway: list[str], controller: list[str], sidecar: list[str], envoy: list[str]) -> str:
    """A ``scrape_configs`` section with the job names the rules and the dashboard assume."""
    jobs = [
        {"job_name": GATEWAY_JOB, "static_configs": [{"targets": gateway}]},
        {"job_name": CONTROLLER_JOB, "static_configs": [{"targets": controller}]},
        {"job_name": SIDECAR_JOB, "static_configs": [{"targets": sidecar}]},
        {"job_name": ENVOY_JOB, "metrics_path": "/stats/prometheus", "static_configs": [{"targets": envoy}]},
    ]
    return yaml.safe_dump({"scrape_configs": [j for j in jobs if j["static_configs"][0]["targets"]]}, sort_keys=False)
