"""Prometheus plumbing every process shares: a registry-owning base, the latency buckets, ``/metrics``.

Each process owns its metrics in its own `CollectorRegistry` (tests and an embedded single process can
hold several without name clashes); `serve_metrics` exposes one on ``GET /metrics`` beside ``GET /healthz``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# Model-serving latencies: 1 ms .. 10 s, roughly 2x apart, with extra resolution around 50-500 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0)


def status_class(status: int) -> str:
    """``2xx`` … ``5xx``; ``none`` when there was no response (reset, timeout before headers)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


class MetricsBase:
    """A set of metrics in one registry."""

    registry: CollectorRegistry

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for a ``/metrics`` handler."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

async def serve_metrics(metrics: MetricsBase, host: str, port: int, health: Callable[[], Mapping[str, Any]]) -> Any:
    """``GET /metrics`` (Prometheus exposition) and ``GET /healthz`` (JSON) on ``host:port``.

    Returns the started aiohttp ``AppRunner`` (``await runner.cleanup()`` stops it). It shares the
    gateway's event loop: a scrape renders a few hundred lines, far less than one request's work.
    """
    import json

    from aiohttp import web

    async def _metrics(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dict(health())), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
