"""Shared memory is never reachable through the gateway. Envoy forwards a request only to the cluster the
processor names (deploy/envoy/routing.py: one catch-all route by ``x-cohortgate-cluster``), so the processor
is the gate: it refuses the sidecar-local paths on every route, even on policy routes that take every REST
and every gRPC path (``path_prefix: /v2``, ``/inference.GRPCInferenceService``), in every spelling a server
would route to the same handler. Behind it, a sidecar with ``--shared-memory`` refuses any request carrying
the processor's cluster header (tests/sidecar/test_shm.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cohortgate.core.contract import HEADER_CLUSTER, sidecar_local_only
from cohortgate.core.policy import parse_policy
from gateway.extproc import Processor, ProcessorSettings
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import (  # noqa: F401  (certs, verifier: fixtures)
    APP,
    answer,
    certs,
    denial,
    infer,
    request,
    set_headers,
    token,
)

CATCH_ALL = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
routes:
  - name: rest
    match: {{path_prefix: /v2}}
    cohorts:
      unit: {{claim: sub}}
    residency:
      source: {{claim: residency}}
      default_region: eu
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "http://127.0.0.1:18101", region: eu}}
  - name: grpc
    match: {{path_prefix: /inference.GRPCInferenceService}}
    cohorts:
      unit: {{claim: sub}}
    residency:
      source: {{claim: residency}}
      default_region: eu
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "http://127.0.0.1:18102", region: eu}}
"""

LOCAL_PATHS = [
    "/v2/systemsharedmemory/status",
    "/v2/systemsharedmemory/region/in/register",
    "/v2/systemsharedmemory/region/in/unregister",
    "/v2/systemsharedmemory/unregister",
    "/v2/cudasharedmemory/status",
    "/v2//systemsharedmemory/status",
    "//v2/systemsharedmemory/status",
    "/v2/./systemsharedmemory/status",
    "/v2/models/../systemsharedmemory/status",
    "/v2/%73ystemsharedmemory/status",
    "/v2%2Fsystemsharedmemory/status",
    "/V2/SystemSharedMemory/status",
    "/v2/systemsharedmemory/status?x=1",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
    "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
]


@pytest.fixture(scope="module")
def engine(certs: Any) -> Processor:  # noqa: F811
    policy = parse_policy(CATCH_ALL.format(jwks=certs.jwks), filename="catch-all.yaml")
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(unit_salt=b"salt"))


def test_the_catch_all_route_forwards_other_paths(engine: Processor, certs: Any) -> None:  # noqa: F811
    for path, route in [
        ("/v2/models/tabular/infer", "rest"),
        ("/v2/health/ready", "rest"),
        ("/inference.GRPCInferenceService/ModelInfer", "grpc"),
    ]:
        got = set_headers(answer(engine, request(infer("Bearer " + token(certs), path=path))))
        assert got[HEADER_CLUSTER] == f"cg.{route}.control.0", path


@pytest.mark.parametrize("path", LOCAL_PATHS)
def test_shared_memory_paths_are_refused_on_every_route(engine: Processor, certs: Any, path: str) -> None:  # noqa: F811
    status, _, body = denial(answer(engine, request(infer("Bearer " + token(certs), path=path), uri=APP)))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert "never through the gateway" in body["error"]["message"]


@pytest.mark.parametrize("path", LOCAL_PATHS)
def test_sidecar_local_only_spellings(path: str) -> None:
    assert sidecar_local_only(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/sharedmemory/infer",  # a model may be called that
        "/v2/models/tabular/infer?q=systemsharedmemory",
        "/v2/systemsharedmemor",
        "/v2/health/ready",
        "/inference.GRPCInferenceService/ModelInfer",
        "/",
        "",
    ],
)
def test_other_paths_are_not_local_only(path: str) -> None:
    assert not sidecar_local_only(path)
