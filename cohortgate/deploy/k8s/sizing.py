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

A pod is sized for ``target_rps`` requests per second. Each gateway worker is one Python process
(one core at most) planned at ``HEADROOM`` of its core; ``workers="auto"`` runs as many as the
gateway's CPU request needs at that headroom (``cohortgate gateway --workers N``), and Envoy runs
one worker thread per gateway worker (``--concurrency N``: one processor socket each, least-request
balanced), more only if its own request needs more cores. The HPA adds pods when a container passes
``HPA_TARGET_UTILIZATION`` of its request.

The model sidecar's onnxruntime intra-op threads follow its CPU: all its cores but one (the event
loop's), at least one; the cores are its CPU limit when it has one, else its request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cohortgate.core.contract import MAX_GATEWAY_WORKERS

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
    gateway_workers: int = 1  # `cohortgate gateway --workers`

    def pods_for(self, rps: float) -> int:
        """Pods needed for ``rps`` with the HPA's utilisation target as the margin."""
        per_pod = self.target_rps * HPA_TARGET_UTILIZATION / 100
        return max(1, math.ceil(rps / per_pod))


Workers = int | Literal["auto"]


def workers_for(gateway_cpu_milli: int) -> int:
    """The gateway workers a CPU request needs, each planned at ``HEADROOM`` of a core (at least one)."""
    return max(1, math.ceil(gateway_cpu_milli / (HEADROOM * 1000)))


def edge(transport: str, grpc_server: str, target_rps: int, workers: Workers = 1) -> EdgeSizing:
    """The sizing of one pod for ``target_rps``: ``workers`` gateway processes, or ``"auto"``: as many as
    the gateway's CPU request needs (`workers_for`). Refused when they cannot carry the rate."""
    gateway_us = GATEWAY_US[(transport, grpc_server)]
    envoy_us = ENVOY_PLAIN_US * ENVOY_EXT_PROC_FACTOR
    per_worker = int(HEADROOM * 1_000_000 / gateway_us)
    gateway_milli = max(MIN_CPU_MILLI, math.ceil(gateway_us * target_rps / 1000))
    envoy_milli = max(MIN_CPU_MILLI, math.ceil(envoy_us * target_rps / 1000))
    n = workers_for(gateway_milli) if workers == "auto" else workers
    if not 1 <= n <= MAX_GATEWAY_WORKERS:
        raise ValueError(
            f"{n} gateway workers: give 1 to {MAX_GATEWAY_WORKERS}"
            + (f" (--target-rps {target_rps} needs {n}; lower it or use more pods)" if workers == "auto" else "")
        )
    max_rps = n * per_worker
    if target_rps > max_rps:
        what = "one gateway process tops out" if n == 1 else f"{n} gateway workers top out"
        raise ValueError(
            f"{what} near {max_rps} req/s with transport {transport}/{grpc_server} "
            f"({gateway_us:.0f} µs each at {HEADROOM:.0%} of a core); lower --target-rps, "
            "raise --gateway-workers (or give auto) or use more pods"
        )
    # Each gateway worker and each Envoy worker thread gets at least the smallest request's share.
    gateway_milli = max(gateway_milli, n * MIN_CPU_MILLI)
    concurrency = max(n, math.ceil(envoy_milli / 1000))
    envoy_milli = max(envoy_milli, concurrency * MIN_CPU_MILLI)
    return EdgeSizing(
        gateway_us=gateway_us,
        envoy_us=envoy_us,
        target_rps=target_rps,
        max_rps=max_rps,
        gateway_cpu_milli=gateway_milli,
        envoy_cpu_milli=envoy_milli,
        envoy_concurrency=concurrency,
        gateway_workers=n,
    )


def cores(quantity: str) -> float:
    """A Kubernetes CPU quantity (``"2"``, ``"1.5"``, ``"500m"``) in cores."""
    text = quantity.strip()
    value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"CPU {quantity!r} is not a positive quantity")
    return value


def sidecar_threads(requests: str, limits: str | None = None) -> int:
    """onnxruntime intra-op threads for a sidecar with this CPU: the cores of its limit (else its request),
    rounded down, less the event loop's one; at least one (`sidecar.model.default_intra_op_threads`'s rule,
    from the container's CPU rather than the node's)."""
    return max(1, math.floor(cores(limits if limits is not None else requests)) - 1)
