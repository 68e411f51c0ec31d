"""Per-backend windows within a variant (issue 17.8): a slow backend is told from a slow model.

A variant served by two backends, one of them slow: the audit record's evidence and ``status``
give each backend's window (keyed by N of ``cg.ROUTE.VARIANT.N``, named by its address), and the
rollback's reason names the slow one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller.als import event_from_entry
from cohortgate.controller.loop import Controller
from cohortgate.controller.simulate import Behaviour, Traffic
from cohortgate.controller.windows import VariantWindow
from cohortgate.core.contract import cluster_index
from cohortgate.core.policy import parse_policy
from cohortgate.core.rollout import Phase
from cohortgate.store.events import Event, InProcessSink
from cohortgate.store.state import InProcessState, effective_policy
from tests.controller.policies import policy_text
from tests.controller.test_als import entry

CANARY_ONE = "backends: [{url: 'http://127.0.0.1:18102', region: eu}]"
CANARY_TWO = "backends: [{url: 'http://127.0.0.1:18102', region: eu}, {url: 'http://127.0.0.1:18112', region: eu}]"


def two_backend_policy():
    text = policy_text(max_p99_ms=None, steps=None)
    assert text.count(CANARY_ONE) == 1
    return parse_policy(text.replace(CANARY_ONE, CANARY_TWO), filename="backends.yaml", base_dir=Path("/tmp"))


def test_the_backend_index_is_the_clusters_last_part():
    assert cluster_index("cg.tabular.canary.1") == 1
    assert cluster_index("cg.tabular.canary.12") == 12
    for other in ("cg.tabular.canary", "cg.tabular.canary.x", "cg.tabular.canary.-1", "xx.tabular.canary.1", ""):
        assert cluster_index(other) is None
    assert cluster_index("cg.tabular.canary.\u00b2") is None  # a unicode digit is not an index


def test_access_log_entries_carry_the_backend_index_and_it_survives_the_redis_stream_fields():
    ev = event_from_entry(entry(cluster="cg.tabular.canary.1"))
    assert (ev.variant, ev.backend) == ("canary", 1)
    assert Event.from_fields(ev.to_fields()).backend == 1
    denied = event_from_entry(entry(variant="", route="", cluster=""))
    assert denied.backend == -1 and "backend" not in denied.to_fields()
    assert Event.from_fields({**ev.to_fields(), "backend": "nope"}).backend == -1


def test_variant_window_keeps_a_sliding_window_per_backend():
    w = VariantWindow(span_s=10)
    status = np.array([200, 200, 503, 200])
    latency = np.array([10.0, 12.0, 100.0, 110.0])
    w.add_many(status, latency, ["a", "b", "c", "d"], 100.0, np.ones(4, bool), backend=np.array([0, 0, 1, -1]))
    by = w.backend_summaries(100.5)
    assert sorted(by) == [0, 1]  # -1 (unknown backend) counts for the variant only
    assert (by[0].n, by[0].errors, by[1].n, by[1].errors) == (2, 0, 1, 1)
    assert by[1].p50_ms > by[0].p99_ms
    assert w.sliding(100.5).n == 4
    # one backend for the whole block (the usual case) and expiry with the window
    w.add_many(np.array([200]), np.array([5.0]), ["e"], 105.0, np.ones(1, bool), backend=np.array([1]))
    assert w.backend_summaries(105.5)[1].n == 2
    assert sorted(w.backend_summaries(115.5)) == [1] and w.backend_summaries(116.5) == {}
    w.forget()
    assert w.backends == {}


class TwoBackends:
    """A stand-in for Envoy + two canary backends: backend #1 answers ``slow`` times slower."""

    def __init__(self, policy, store, slow: float, seed: int = 3):
        self.policy = policy
        self.store = store
        self.traffic = Traffic(
            policy, "tabular", {"control": Behaviour(0.0, median_ms=20), "canary": Behaviour(0.0, median_ms=20)}
        )
        store.watch(lambda states: self.traffic.set_policy(effective_policy(policy, states)))
        self.rng = np.random.default_rng(seed)
        self.slow = slow

    def events(self, n: int, t0: float) -> list[Event]:
        out = []
        for e in self.traffic.events(n, t0, t0 + 1):
            backend = int(self.rng.integers(2)) if e.variant == "canary" else 0
            latency = e.latency_ms * (self.slow if backend == 1 else 1.0)
            out.append(dataclasses.replace(e, backend=backend, latency_ms=latency))
        return out


async def test_a_variant_with_one_slow_backend_the_evidence_names_which():
    policy = two_backend_policy()
    store = InProcessState()
    now = 1_000.0
    controller = Controller(policy, store, InProcessSink(), clock=lambda: now)
    await controller.start()
    upstream = TwoBackends(policy, store, slow=4.0)
    for _ in range(120):
        controller.ingest(upstream.events(300, now), now)
        now += 1
        await controller.tick()
        if controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK:
            break
    assert controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK
    record = (await store.audit("tabular"))[0]
    assert record["action"] == "rollback" and "slow requests" in record["reason"]
    assert "slowest backend #1 127.0.0.1:18112" in record["reason"]
    canary = record["evidence"]["backends"]
    assert set(canary) == {"0", "1"}
    assert canary["1"]["address"] == "127.0.0.1:18112" and canary["0"]["address"] == "127.0.0.1:18102"
    assert canary["1"]["p50_ms"] > 2 * canary["0"]["p50_ms"]  # 4x slower by construction
    # backend #0 is as fast as control: the model is fine, one backend is not
    assert canary["0"]["p50_ms"] == pytest.approx(record["evidence"]["control"]["p50_ms"], rel=0.25)
    assert set(record["evidence"]["control_backends"]) == {"0"}
    assert canary["0"]["requests"] + canary["1"]["requests"] == record["evidence"]["window"]["requests"]

    status = controller.status(now)["routes"]["tabular"]["variants"]
    assert set(status["canary"]["backends"]) == {"0", "1"}
    assert status["control"]["backends"]["0"]["address"] == "127.0.0.1:18101"


async def test_backends_alike_are_shown_but_no_backend_is_blamed_without_a_verdict():
    policy = two_backend_policy()
    store = InProcessState()
    now = 1_000.0
    controller = Controller(policy, store, InProcessSink(), clock=lambda: now)
    await controller.start()
    upstream = TwoBackends(policy, store, slow=1.0)
    for _ in range(30):
        controller.ingest(upstream.events(300, now), now)
        now += 1
        await controller.tick()
    canary = controller.status(now)["routes"]["tabular"]["variants"]["canary"]
    assert canary["phase"] != "rolled_back" and set(canary["backends"]) == {"0", "1"}
    assert await store.audit("tabular") == []
