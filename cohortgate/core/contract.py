"""Every name two processes must agree on, defined once.

Envoy's rendered configuration, the ext_proc processor, the controller's access-log receiver, the
sidecar and the Redis store all meet through these names; nothing else spells them, and a test
renders Envoy's configuration and checks it uses exactly these. Pure: no imports beyond the
standard library.
"""

from __future__ import annotations

import posixpath
from typing import Final
from urllib.parse import unquote

# -- headers ---------------------------------------------------------------------------------------
# Only the processor sets ``x-cohortgate-*`` request headers: it strips every client-sent one first.
HEADER_PREFIX: Final = "x-cohortgate-"
HEADER_CLUSTER: Final = "x-cohortgate-cluster"  # Envoy routes the primary request by it
HEADER_ROUTE: Final = "x-cohortgate-route"
HEADER_VARIANT: Final = "x-cohortgate-variant"
HEADER_UNIT: Final = "x-cohortgate-unit"  # keyed hash of the cohort unit, never the raw id
HEADER_REGION: Final = "x-cohortgate-region"
HEADER_SHADOW_OF: Final = "x-cohortgate-shadow-of"  # set on mirrored copies only: the primary's variant
HEADER_SERVED_BY: Final = "x-cohortgate-served-by"  # the sidecar's response header: which variant answered
HEADER_EXPOSURE: Final = "x-cohortgate-exposure"  # the signed exposure token (core.exposure): request, response, log
HEADER_ASSIGNMENT: Final = "x-cohortgate-assignment"  # bandit routes: the signed sticky arm (core.sticky), echoed
HEADER_OUTCOMES: Final = "x-cohortgate-outcomes"  # set on outcomes routes: Envoy rewrites the path to OUTCOMES_PATH
OUTCOMES_PATH: Final = "/outcomes"  # the controller API's outcome ingest (an outcomes route's backend)
# The controller API's ingest of the sidecars' quality reports (cohortgate.core.sketch.QualityReport JSON, a list
# or one object; the shadow reports' admin token). A sidecar posts there beside its --report-to URL's /reports.
QUALITY_REPORTS_PATH: Final = "/reports/quality"
HEADER_MODEL_VERSION: Final = "x-cohortgate-model-version"  # sidecar response: NAME/VERSION that answered
HEADER_MODEL_DIGEST: Final = "x-cohortgate-model-digest"  # sidecar response: sha256 of the model that answered
# the request's quality segments (policy `quality.segments`): ``name=value;name=value``, declared values
# only (anything else is ``other``); Envoy logs it for the controller, the sidecar may read it
HEADER_SEGMENT: Final = "x-cohortgate-segment"
# The feature-store entity id of a route with `features:` (issue 22). The raw id, since the sidecar looks it
# up in the online store: set by the processor only, never logged (not in ACCESS_LOG_HEADERS).
HEADER_ENTITY: Final = "x-cohortgate-entity"
HEADER_FEATURES: Final = "x-cohortgate-features"  # sidecar response: "joined" or "fallback:<reason>"
# Why a sidecar served a request without its joined features; its reports to the controller carry one.
FEATURE_FALLBACK_REASONS: Final = ("missing", "stale", "over_budget", "unavailable", "no_entity", "invalid")

# Envoy's listener has this many mirror slots; the policy allows at most this many shadows per route.
MIRROR_SLOTS: Final = 4
HEADER_SHADOWS: Final = tuple(f"{HEADER_PREFIX}shadow-{i}" for i in range(MIRROR_SLOTS))

# The headers Envoy logs to the access-log service for the controller (``additional_request_headers_to_log``).
ACCESS_LOG_HEADERS: Final = (
    HEADER_ROUTE,
    HEADER_VARIANT,
    HEADER_UNIT,
    HEADER_REGION,
    HEADER_SHADOW_OF,
    *HEADER_SHADOWS,
    HEADER_SEGMENT,
    # the processor's exposure token: the controller counts the unit exposed on a route with metrics, so a
    # unit that never reports an outcome is a zero in the denominator (kept only on entries a backend answered)
    HEADER_EXPOSURE,
)
# A gRPC caller's request ``content-type`` starts with this (``application/grpc+proto`` too): Envoy's own error
# answers to it are gRPC statuses with a sentence, not JSON bodies (deploy/envoy/replies.py).
GRPC_CONTENT_TYPE: Final = "application/grpc"
# A gRPC answer's status: a trailer after the body, or a response header of a trailers-only answer (an error
# without a body). Envoy logs it from both (``additional_response_{trailers,headers}_to_log``): a gRPC failure
# arrives inside HTTP 200, and the controller's error rate reads it (controller/als.py).
HEADER_GRPC_STATUS: Final = "grpc-status"
# The sidecar's response headers Envoy logs too (``additional_response_headers_to_log``): which artifact
# answered, so the controller can compare it with the one the processor routed to (trusted only on an
# entry with an upstream cluster: then a backend, never the client, set it), and a
# trailers-only gRPC answer's status.
ACCESS_LOG_RESPONSE_HEADERS: Final = (HEADER_MODEL_DIGEST, HEADER_GRPC_STATUS)
ACCESS_LOG_RESPONSE_TRAILERS: Final = (HEADER_GRPC_STATUS,)
ACCESS_LOG_NAME: Final = "cohortgate"  # Envoy's ``log_name`` for our access-log stream
# The first bytes of a sealed model artifact (sidecar/sealing.py): its file digest is not the model's.
SEALED_ARTIFACT_MAGIC: Final = b"CGSEAL1\n"

# -- limits both Envoy and the processor enforce -----------------------------------------------------
# The default largest request body: Envoy refuses longer bodies of any framing (413) and the processor
# refuses a longer content-length; both must refuse the same bodies.
MAX_REQUEST_BYTES: Final = 16 << 20

# -- the processor's worker sockets ----------------------------------------------------------------
MAX_GATEWAY_WORKERS: Final = 64


def worker_socket(base: str, index: int, workers: int) -> str:
    """Where processor worker ``index`` of ``workers`` listens when the gateway is told ``uds:BASE``:
    ``BASE`` itself for one worker, else ``BASE.wINDEX`` (Envoy's processor cluster has one endpoint each)."""
    return base if workers == 1 else f"{base}.w{index}"


# -- Envoy cluster names ---------------------------------------------------------------------------
CLUSTER_PREFIX: Final = "cg"
# Envoy's static cluster for the gateway's delta CDS server (gateway/xds.py), which hands Envoy the policy's
# clusters over gRPC; the bootstrap names it, the gateway serves it.
XDS_CLUSTER: Final = "cohortgate_xds"


def xds_socket(processor_socket: str) -> str:
    """Where the gateway serves delta CDS when its processor listens on ``uds:PROCESSOR_SOCKET`` (`up`'s
    layout): beside the processor's socket, so Envoy and the gateway find it from one path."""
    return f"{processor_socket}.xds"


def cluster_name(route: str, owner: str, index: int) -> str:
    """Envoy's cluster for a backend: ``cg.ROUTE.VARIANT.N`` (route and variant are DNS labels: no dots)."""
    return f"{CLUSTER_PREFIX}.{route}.{owner}.{index}"


def cluster_parts(cluster: str) -> tuple[str, str] | None:
    """The inverse of `cluster_name`: (route, variant or shadow), or None for any other name."""
    parts = cluster.split(".")
    return (parts[1], parts[2]) if len(parts) == 4 and parts[0] == CLUSTER_PREFIX else None


def cluster_index(cluster: str) -> int | None:
    """The backend's index N in ``cg.ROUTE.VARIANT.N`` (its place in the variant's backends), or None."""
    parts = cluster.split(".")
    ok = len(parts) == 4 and parts[0] == CLUSTER_PREFIX and parts[3].isdigit() and parts[3].isascii()
    return int(parts[3]) if ok else None


# -- Redis keys and channels -----------------------------------------------------------------------
# The ``{cohortgate}`` hash tag keeps every key in one Redis Cluster slot (multi-key scripts work).
STATE_KEY: Final = "{cohortgate}:state"  # hash: route -> RouteState JSON
STATE_CHANNEL: Final = "{cohortgate}:state:changed"  # pub/sub: a route's state changed
AUDIT_KEY: Final = "{cohortgate}:audit"  # stream: the controller's audit trail
STATUS_KEY: Final = "{cohortgate}:status"  # the leader's status snapshot
LEADER_KEY: Final = "{cohortgate}:controller:leader"  # the controller's leader lock
EVENTS_STREAM: Final = "{cohortgate}:events"  # access-log events for the controller
REPORTS_STREAM: Final = "{cohortgate}:shadow"  # the sidecars' shadow reports
QUALITY_STREAM: Final = "{cohortgate}:quality"  # the sidecars' quality reports (field "report": the JSON)
CONSUMER_GROUP: Final = "cohortgate-controller"
# stream: the outcome journal (controller/outcomes.py): the controller appends the outcomes its API
# accepted, server-side producers XADD {"record": JSON} here; replayed on start, tailed every interval
OUTCOMES_STREAM: Final = "{cohortgate}:outcomes"

# -- environment variables -------------------------------------------------------------------------
UNIT_SALT_ENV: Final = "COHORTGATE_UNIT_SALT"  # HMAC key of x-cohortgate-unit; same on every gateway
REDIS_ENV: Final = "COHORTGATE_REDIS"
API_ENV: Final = "COHORTGATE_API"
TOKEN_FILE_ENV: Final = "COHORTGATE_TOKEN_FILE"
ENVOY_BIN_ENV: Final = "COHORTGATE_ENVOY_BIN"
EXPOSURE_KEY_ENV: Final = "COHORTGATE_EXPOSURE_KEY"  # MAC keys of exposure tokens (gateways + controller)
POLL_FILES_ENV: Final = "COHORTGATE_POLL_FILES"  # set (non-empty): follow files by polling, never OS events


# -- paths only a sidecar's own host may call --------------------------------------------------------
# The shared-memory extensions (sidecar/shm.py) make a sidecar read and write shared-memory objects on
# its host, by name. The processor refuses these paths on every route (core/decide.py), whatever the
# policy matches; a sidecar also refuses them on a request that carries HEADER_CLUSTER (came through Envoy).
SHM_REST_PREFIX: Final = "/v2/systemsharedmemory"
SIDECAR_LOCAL_PREFIXES: Final = (
    SHM_REST_PREFIX,
    "/v2/cudasharedmemory",
    "/inference.grpcinferenceservice/systemsharedmemory",  # gRPC: /inference.GRPCInferenceService/SystemShared...
    "/inference.grpcinferenceservice/cudasharedmemory",
)


def sidecar_local_only(path: str) -> bool:
    """Whether ``path`` (a request's ``:path``) is one only the sidecar's own host may call. Compared after
    percent-decoding, lower-casing and resolving ``//``, ``.`` and ``..``, so no spelling a server would
    route to the same handler slips past; the usual path costs a ``lower`` and two ``in`` tests."""
    path = path.lower()
    if "sharedmemory" not in path and "%" not in path:
        return False
    path = unquote(path.split("?", 1)[0]).lower()
    path = "/" + posixpath.normpath(path).lstrip("/")
    return path.startswith(SIDECAR_LOCAL_PREFIXES)
