"""The served model digest: Envoy logs the sidecar's x-cohortgate-model-digest, the ALS parser reads it (only
from an entry a backend answered), and the controller counts requests served by another digest than the
routed one per route and variant (/metrics, GET /status) and audits each change of a backend's digest once."""

from __future__ import annotations

from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import generate_latest

from cohortgate.controller.als import event_from_entry
from cohortgate.controller.loop import Controller
from cohortgate.core.contract import HEADER_MODEL_DIGEST
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.store.events import Event, InProcessSink
from cohortgate.store.state import InProcessState

V1, V2, V3 = ("sha256:" + c * 64 for c in "123")

POLICY = """
version: 1
jwt: {{issuer: iss, audience: aud, jwks: jwks.json}}
routes:
  - name: tabular
    match: {{model: tabular}}
    residency: {{default_region: eu}}
    variants:
      - {{name: control, weight: 90, backends: [{{url: "http://127.0.0.1:1", region: eu, model: "m.onnx@{control}"}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "http://127.0.0.1:2", region: eu, model: "https://h/x/7"}}]}}
"""


def policy(control: str = V1) -> Policy:
    return parse_policy(POLICY.format(control=control), filename="p.yaml")


def entry(served: str | None, cluster: str = "cg.tabular.control.0", rid: str = "r") -> Any:
    """An access-log entry as Envoy sends it, with the sidecar's response header when ``served``."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.start_time.FromSeconds(1_700_000_000)
    c.duration.FromMilliseconds(5)
    if cluster:
        c.upstream_cluster = cluster
    e.request.request_id = rid
    e.request.path = "/v2/models/tabular/infer"
    e.request.request_headers.update({"x-cohortgate-unit": "0123456789abcdef", "x-cohortgate-region": "eu"})
    e.response.response_code.value = 200
    if served is not None:
        e.response.response_headers[HEADER_MODEL_DIGEST] = served
    return e


def event(served: str | None, cluster: str = "cg.tabular.control.0") -> Event:
    """Parsed, then through the Redis stream's fields (what a controller reading the stream gets)."""
    parsed = event_from_entry(entry(served, cluster))
    assert Event.from_fields(parsed.to_fields()) == parsed
    return parsed


def test_the_parser_reads_the_served_digest_only_from_an_answered_entry() -> None:
    assert event(V1).model_digest == V1
    assert event(None).model_digest == ""
    assert event("sha256:nothex; DROP").model_digest == ""  # not a digest a sidecar sends: not kept
    assert event(V1, cluster="").model_digest == ""  # no upstream: the headers are not a backend's


def test_the_policy_knows_the_routed_digest_per_backend() -> None:
    p = policy()
    assert p.model_digests == {"cg.tabular.control.0": V1}  # the canary's unpinned remote version: unknown


async def test_mismatches_are_counted_and_each_change_audited_once() -> None:
    now = 1_000.0
    store = InProcessState()
    controller = Controller(policy(), store, InProcessSink(), clock=lambda: now)
    await controller.start()
    # a live swap in progress: the sidecar still answers with V1 while the policy routes to V2
    await controller.set_policy(policy(V2))
    controller.ingest([event(V1) for _ in range(5)], now)
    now += 1
    # the swap completes, one straggler from the old model, then the new one only
    controller.ingest([event(V2), event(V2), event(V1), event(V2)], now)
    controller.ingest([event(V3, cluster="cg.tabular.canary.0") for _ in range(3)], now)  # unknown routed digest
    await controller.tick()

    models = controller.status(now)["routes"]["tabular"]["models"]
    control = models["control"]
    assert (control["requests"], control["mismatched"]) == (9, 6)
    assert control["backends"][0] == {"routed": V2, "served": V2, "since": 1_001.0, "requests": 9, "mismatched": 6}
    assert (models["canary"]["requests"], models["canary"]["mismatched"]) == (3, 0)
    assert models["canary"]["backends"][0]["served"] == V3 and models["canary"]["backends"][0]["routed"] is None

    metrics = generate_latest(controller.metrics.registry).decode()
    assert 'cohortgate_controller_model_digest_mismatches_total{route="tabular",variant="control"} 6.0' in metrics
    assert 'cohortgate_controller_model_served_requests_total{route="tabular",variant="canary"} 3.0' in metrics

    served = [r for r in reversed(await store.audit("tabular")) if r["action"] == "model_served"]
    # one record per change, not per request: V1 first seen, then V2; V1's straggler was seen seconds ago
    assert [(r["variant"], r["served_before"], r["served"], r["routed"]) for r in served] == [
        ("control", None, V1, V2),
        ("control", V1, V2, V2),
        ("canary", None, V3, None),
    ]
    assert all(r["actor"] == "controller:controller" and r["backend"] == 0 for r in served)
    assert "not the routed" in served[0]["reason"]


async def test_a_digest_back_after_the_window_is_audited_again() -> None:
    """A rollback to an old artifact is a change worth a record; the same digest within the window is not."""
    now = 1_000.0
    store = InProcessState()
    controller = Controller(policy(), store, InProcessSink(), clock=lambda: now)
    await controller.start()
    window = controller.config.window_s
    for served, at in ((V1, 0), (V2, 1), (V2, 2), (V1, 2 + window + 1)):
        controller.ingest([event(served)], now + at)
    await controller.tick()
    served = [r["served"] for r in reversed(await store.audit("tabular")) if r["action"] == "model_served"]
    assert served == [V1, V2, V1]
