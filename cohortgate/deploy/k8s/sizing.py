"""Resource requests for the edge pod, derived from measured CPU per request (see docs/scaling.md).

The figures are CPU time per request on the 2-core benchmark machine (bench/, issue notes):

==========================  =============  ==================================================
component                   µs CPU / req   source
==========================  =============  ==================================================
gateway, gRPC (grpcio)      200            grpcio's per-stream machinery (~180–250 measured)
gateway, ``http`` transport 50             asyncio server + orjson, full decision + audit (42–47 measured)
gateway, gRPC (``fast``)    50             own HTTP/2 server, full decision + audit (39–52 measured)
Envoy with ext_proc         3 × 25 = 75    ext_proc triples Envoy's ~25 µs of a plain proxy hop
==========================  =============  ==================================================

A pod is sized for ``target_rps`` requests per second at ``HEADROOM`` below a full core's worth
of the gateway (the Python process uses one core at most), and the HPA adds pods when the gateway
container passes ``HPA_TARGET_UTILIZATION`` of its request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GATEWAY_US = {("grpc", "grpcio"): 200.0, ("grpc", "fast"): 50.0, ("http", "grpcio"): 50.0, ("http", "fast"): 50.0}
ENVOY_PLAIN_US = 25.0
ENVOY_EXT_PROC_FACTOR = 3.0
HEADROOM = 0.6  # never plan a pod above 60 % of the gateway's single core
HPA_TARGET_UTILIZATION = 70
MIN_CPU_MILLI = 50

GATEWAY_MEMORY = ("256Mi", "512Mi")  # request, limit: policy + token cache (100 000 entries) + buffers
ENVOY_MEMORY = ("128Mi", "256Mi")
SIDECAR_CPU = "1"
SIDECAR_MEMORY = ("1Gi", "2Gi")
CONTROLLER = ("100m", "256Mi", "512Mi")
REDIS = ("100m", "256Mi", "512Mi")


@dataclass(frozen=True, slots=True)
class EdgeSizing:
    gateway_us: float
    envoy_us: float
    target_rps: int  # what one pod is sized for
    max_rps: int  # the gateway's single-core ceiling at HEADROOM
    gateway_cpu_milli: int
    envoy_cpu_milli: int
    envoy_concurrency: int

    def pods_for(self, rps: float) -> int:
        """Pods needed for ``rps`` with the HPA's utilisation target as the margin."""
        per_pod = self.target_rps * HPA_TARGET_UTILIZATION / 100
        return max(1, math.ceil(rps / per_pod))


def edge(transport: str, grpc_server: str, target_rps: int) -> EdgeSizing:
    gateway_us = GATEWAY_US[(transport, grpc_server)]
    envoy_us = ENVOY_PLAIN_US * ENVOY_EXT_PROC_FACTOR
    max_rps = int(HEADROOM * 1_000_000 / gateway_us)
    if target_rps > max_rps:
        raise ValueError(
            f"one gateway process tops out near {max_rps} req/s with transport {transport}/{grpc_server} "
            f"({gateway_us:.0f} µs each at {HEADROOM:.0%} of a core); lower --target-rps or use more pods"
        )
    gateway_milli = max(MIN_CPU_MILLI, math.ceil(gateway_us * target_rps / 1000))
    envoy_milli = max(MIN_CPU_MILLI, math.ceil(envoy_us * target_rps / 1000))
    return EdgeSizing(
        gateway_us=gateway_us,
        envoy_us=envoy_us,
        target_rps=target_rps,
        max_rps=max_rps,
        gateway_cpu_milli=gateway_milli,
        envoy_cpu_milli=envoy_milli,
        envoy_concurrency=max(1, math.ceil(envoy_milli / 1000)),
    )
