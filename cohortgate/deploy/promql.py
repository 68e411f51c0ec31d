"""The metric names cohortgate's processes and Envoy export, and the names a PromQL expression reads.

`EXPORTED` is what the rules (`cohortgate.deploy.alerts`) and the dashboard (`cohortgate.deploy.grafana`)
may name; tests/integration/test_observability.py scrapes a running gateway, controller, sidecar
collector and Envoy and checks that every name here really appears, so the list cannot drift from
gateway/metrics.py, cohortgate/controller/metrics.py, sidecar/metrics.py and gateway/h2/metrics.py.

`metric_names` is a lexer, not a parser (parsing is promtool's job, in the tests): it drops strings,
label matchers, grouping clauses, durations, functions and keywords, and what is left are names.
"""

from __future__ import annotations

import re


def _histogram(name: str) -> frozenset[str]:
    return frozenset({f"{name}_bucket", f"{name}_sum", f"{name}_count"})


GATEWAY = frozenset(
    {
        "cohortgate_decisions_total",
        "cohortgate_routed_requests_total",
        "cohortgate_mirror_decisions_total",
        "cohortgate_policy_reloads_total",
        "cohortgate_policy_info",
        "cohortgate_variant_weight",
        "cohortgate_state_updates_total",
        "cohortgate_extproc_h2_streams_total",
        "cohortgate_extproc_h2_processor_errors_total",
        "cohortgate_extproc_h2_open_streams",
    }
)
CONTROLLER = frozenset(
    {
        "cohortgate_requests_total",
        *_histogram("cohortgate_request_duration_seconds"),
        "cohortgate_shadow_copies_total",
        "cohortgate_events_total",
        "cohortgate_events_dropped_total",
        "cohortgate_controller_actions_total",
        "cohortgate_controller_leader",
        "cohortgate_controller_ticks_total",
        "cohortgate_controller_p_value",
    }
)
SIDECAR = frozenset(
    {
        "cohortgate_sidecar_requests_total",
        "cohortgate_sidecar_request_failures_total",
        *_histogram("cohortgate_sidecar_request_seconds"),
        *_histogram("cohortgate_sidecar_queue_seconds"),
        *_histogram("cohortgate_sidecar_compute_seconds"),
        *_histogram("cohortgate_sidecar_batch_size"),
        *_histogram("cohortgate_sidecar_batch_requests"),
        "cohortgate_sidecar_queue_depth",
        "cohortgate_sidecar_ready",
        "cohortgate_sidecar_shadow_reports_total",
    }
)
#: Envoy's own stats (admin ``/stats/prometheus``) for the HCM and ext_proc filter whose stat_prefix
#: is ``cohortgate`` (cohortgate/deploy/envoy/) and the ``cohortgate_processor`` cluster.
ENVOY = frozenset(
    {
        "envoy_http_ext_proc_cohortgate_streams_failed",
        "envoy_http_ext_proc_cohortgate_streams_started",
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_http_downstream_rq_xx",
    }
)
EXPORTED = GATEWAY | CONTROLLER | SIDECAR | ENVOY

_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
        "group", "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> frozenset[str]:
    """The metric names ``expr`` selects (``rate(x_total{a="b"}[5m])`` -> ``{"x_total"}``)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # the exponent or suffix of a number
        names.add(word)
    return frozenset(names)
