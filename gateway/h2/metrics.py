"""Prometheus export of the fast server's ``H2Counters``, read at scrape time.

The connections only increment plain ints on the hot path; a custom collector turns them into
metric families when Prometheus scrapes, so serving a request never touches prometheus-client.

    cohortgate_extproc_h2_<counter>_total        one per H2Counters field (floods excepted)
    cohortgate_extproc_h2_floods_total{kind}     flood limits hit: reset, ping, settings, empty_frame
    cohortgate_extproc_h2_open_connections       gauge, now
    cohortgate_extproc_h2_open_streams           gauge, now
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.h2.connection import H2Counters
from gateway.h2.server import FastServer

PREFIX = "cohortgate_extproc_h2_"

#: Every H2Counters field and its help text; a field missing here fails at import, not silently.
COUNTER_HELP = {
    "connections": "HTTP/2 connections accepted.",
    "streams": "ext_proc gRPC streams opened.",
    "messages": "ext_proc messages received and handed to a processor.",
    "processor_errors": "Processor exceptions, answered with grpc-status INTERNAL.",
    "connection_errors": "Connections ended with a GOAWAY carrying an error code.",
    "internal_errors": "Bugs caught at the connection boundary (GOAWAY INTERNAL_ERROR).",
    "stream_errors": "Streams reset by the server with an error code.",
    "refused_streams": "Streams refused (concurrency limit or draining).",
    "peer_resets": "Open streams reset by the peer (Envoy ends every ext_proc stream this way).",
    "deadline_exceeded": "Streams answered DEADLINE_EXCEEDED: their grpc-timeout ran out.",
    "settings_timeouts": "Connections ended because our SETTINGS were not acknowledged in time.",
    "idle_timeouts": "Connections closed gracefully after having no stream for the idle timeout.",
}
FLOOD_KINDS = {
    "flood_resets": "reset",
    "flood_pings": "ping",
    "flood_settings": "settings",
    "flood_empty_frames": "empty_frame",
}
_missing = {f.name for f in dataclasses.fields(H2Counters)} ^ (COUNTER_HELP.keys() | FLOOD_KINDS.keys())
if _missing:
    raise RuntimeError(f"H2Counters fields without a metric: {sorted(_missing)}")


class H2Collector(Collector):
    """Reads one server's counters and open connections/streams at each scrape."""

    def __init__(self, server: FastServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        counters = self._server.counters
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(PREFIX + name, help_text, value=getattr(counters, name))
        floods = CounterMetricFamily(
            PREFIX + "floods", "Connections ended with GOAWAY ENHANCE_YOUR_CALM by a flood limit.", labels=["kind"]
        )
        for field, kind in FLOOD_KINDS.items():
            floods.add_metric([kind], getattr(counters, field))
        yield floods
        yield GaugeMetricFamily(PREFIX + "open_connections", "HTTP/2 connections open now.", self._server.connections)
        yield GaugeMetricFamily(PREFIX + "open_streams", "ext_proc streams open now.", self._server.open_streams)


def register_h2_metrics(server: FastServer, registry: CollectorRegistry | None = None) -> H2Collector:
    """Expose ``server``'s counters in ``registry`` (the global one by default); returns the collector,
    for ``registry.unregister`` when the server goes."""
    collector = H2Collector(server)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
