"""Envoy's own telemetry: its OpenTelemetry tracer (off unless a collector is given) and the stats
tag rule that keeps a dotted cluster name whole.

Tracing: the HTTP connection manager starts one server span per request (``cohortgate-envoy``),
a child of the client's ``traceparent`` when it brings one, else a new trace started for
``ratio`` of requests; a parent's sampled flag is kept either way. Envoy sends its context to the
processor (the ext_proc gRPC call's metadata) and upstream (``traceparent`` on the forwarded
request, from an upstream span of its own), so the processor's and the sidecar's spans join it.

Stats: Envoy's default ``envoy.cluster_name`` tag stops at the first dot, so the policy's clusters
(``cg.ROUTE.VARIANT.N``) came out as ``envoy_cluster_ae_scoring_control_0_upstream_rq`` with
``envoy_cluster_name="cg"``. One tag rule for the ``cg.`` names (route and variant are DNS labels,
N a number) replaces it; other clusters are cut at the first dot as before.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cohortgate.deploy.envoy.addresses import TraceCollector
from cohortgate.deploy.envoy.typed import pack, pb, single_endpoint_cluster

OTLP_CLUSTER = "cohortgate_otlp"
SERVICE_NAME = "cohortgate-envoy"
EXPORT_TIMEOUT = dt.timedelta(seconds=2)
#: after ``cluster.``: the whole of ``cg.ROUTE.VARIANT.N``, else (Envoy's own rule) up to the first dot;
#: group 1 is cut from the stat name, group 2 is the tag's value
CLUSTER_NAME_TAG_REGEX = r"^cluster\.((cg\.[a-z0-9-]+\.[a-z0-9-]+\.[0-9]+|[^.]+)\.)"


def stats_config() -> Any:
    """Envoy's default tags, with ``envoy.cluster_name`` taking a policy cluster's whole dotted name."""
    m = pb()
    return m.metrics.StatsConfig(
        stats_tags=[m.metrics.TagSpecifier(tag_name="envoy.cluster_name", regex=CLUSTER_NAME_TAG_REGEX)],
        use_all_default_tags=True,
        # without this Envoy runs its own cluster_name rule first and cuts the name at the first dot
        allow_default_tag_overrides=True,
    )


def hcm_tracing(collector: TraceCollector) -> Any:
    """The connection manager's tracing block: the OpenTelemetry provider exporting OTLP/HTTP."""
    m = pb()
    t = m.trace
    provider = t.OpenTelemetryConfig(
        http_service=m.core.HttpService(
            http_uri=m.core.HttpUri(uri=collector.uri, cluster=OTLP_CLUSTER, timeout=EXPORT_TIMEOUT)
        ),
        service_name=SERVICE_NAME,
    )
    return m.hcm.HttpConnectionManagerTracing(
        provider=t.TracingHttp(name="envoy.tracers.opentelemetry", typed_config=pack(provider)),
        random_sampling=m.type_v3.Percent(value=collector.ratio * 100.0),
        # a span for the forwarded request too: the sidecar's span hangs off it, and its time is
        # the backend's as Envoy saw it
        spawn_upstream_span=True,
    )


def collector_cluster(collector: TraceCollector) -> Any:
    """Where the tracer posts spans: plain HTTP/1.1 to the collector."""
    return single_endpoint_cluster(OTLP_CLUSTER, host=collector.host, port=collector.port, http2=False)
