"""The pure part of delta CDS (`gateway.xds.DeltaStream`): what to send, remove and resend, and the
nonces Envoy answers; then `XdsClusters.confirm` fed by hand (no gRPC, no Envoy).

The real Envoy path is tests/integration/test_delta_xds.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.reload import ClustersNotConfirmed
from gateway.xds import UNKNOWN, DeltaStream, XdsClusters


def test_first_response_sends_everything_then_nothing() -> None:
    s = DeltaStream()
    d = s.next({"a": "1", "b": "1"})
    assert d is not None and sorted(d.send) == ["a", "b"] and d.remove == ()
    assert s.next({"a": "1", "b": "1"}) is None  # sent, not yet acked: never sent twice


def test_one_changed_cluster_is_all_that_travels() -> None:
    s = DeltaStream()
    first = s.next({f"c{i}": "1" for i in range(1000)})
    assert first is not None
    s.answer(first.nonce, None)
    d = s.next({**{f"c{i}": "1" for i in range(1000)}, "c7": "2", "new": "1"})
    assert d is not None and sorted(d.send) == ["c7", "new"] and d.remove == ()


def test_removed_names_are_sent_as_removals() -> None:
    s = DeltaStream()
    first = s.next({"a": "1", "b": "1"})
    assert first is not None
    s.answer(first.nonce, None)
    d = s.next({"a": "1"})
    assert d is not None and d.send == () and d.remove == ("b",)
    s.answer(d.nonce, None)
    assert s.acked == {"a": "1"}


def test_ack_confirms_only_the_versions_it_carried() -> None:
    s = DeltaStream()
    d1 = s.next({"a": "1"})
    d2 = s.next({"a": "2"})
    assert d1 is not None and d2 is not None and d1.nonce != d2.nonce
    s.answer(d1.nonce, None)
    assert s.confirmed({"a": "1"}) and not s.confirmed({"a": "2"})
    s.answer(d2.nonce, None)
    assert s.confirmed({"a": "2"})


def test_unknown_or_repeated_nonces_are_ignored() -> None:
    s = DeltaStream()
    d = s.next({"a": "1"})
    assert d is not None
    assert s.answer("999", None) is None
    assert s.answer(d.nonce, None) is not None
    assert s.answer(d.nonce, "late NACK") is None  # answered already
    assert s.confirmed({"a": "1"})


def test_nack_is_refused_not_retried_and_the_state_becomes_unknown() -> None:
    s = DeltaStream.resumed({"keep": "1"})
    d = s.next({"keep": "1", "bad": "1", "good": "1"})
    assert d is not None and sorted(d.send) == ["bad", "good"]
    answer = s.answer(d.nonce, "cluster bad: no")
    assert answer is not None and answer.error == "cluster bad: no"
    assert s.refused({"bad": "1", "good": "1"}) == ["bad", "good"]
    assert s.known["bad"] == UNKNOWN and not s.confirmed({"bad": "1"})
    assert s.next({"keep": "1", "bad": "1", "good": "1"}) is None  # no retry loop
    # the reload is refused: the serving set again; Envoy may hold part of the refused update
    d = s.next({"keep": "1"})
    assert d is not None and d.send == () and sorted(d.remove) == ["bad", "good"]


def test_a_new_desired_set_may_try_a_refused_version_again() -> None:
    s = DeltaStream()
    d = s.next({"a": "1"})
    assert d is not None
    s.answer(d.nonce, "no")
    s.rejected.clear()  # what XdsClusters.write does
    d = s.next({"a": "1"})
    assert d is not None and d.send == ("a",)
    s.answer(d.nonce, None)
    assert s.confirmed({"a": "1"}) and s.refused({"a": "1"}) == []


def test_a_reconnecting_envoy_gets_only_what_differs() -> None:
    s = DeltaStream.resumed({"same": "1", "old": "1", "stale": "1"})
    d = s.next({"same": "1", "stale": "2", "new": "1"})
    assert d is not None and sorted(d.send) == ["new", "stale"] and d.remove == ("old",)


versions = st.dictionaries(st.sampled_from("abcdefgh"), st.sampled_from("123"), max_size=8)


@given(st.lists(st.tuples(versions, st.sampled_from(["ack", "nack", "none"])), min_size=1, max_size=8))
def test_after_acks_envoy_holds_exactly_the_desired_set(steps: list[tuple[Mapping[str, str], str]]) -> None:
    """Any sequence of desired sets and answers: once the last set is sent and ACKed, Envoy (modelled
    as applying what it ACKs or has not answered yet, and nothing of what it NACKs) holds exactly that set."""
    s = DeltaStream()
    envoy: dict[str, str] = {}
    for desired, what in steps:
        d = s.next(desired)
        if d is None:
            continue
        if what != "nack":  # sent: Envoy applies it, answered or not yet (a NACKed one: none of it)
            envoy.update({n: desired[n] for n in d.send})
            for n in d.remove:
                envoy.pop(n, None)
        if what != "none":
            s.answer(d.nonce, None if what == "ack" else "refused")
    final = steps[-1][0]
    s.rejected.clear()
    for _ in range(3):
        d = s.next(final)
        if d is None:
            break
        envoy.update({n: final[n] for n in d.send})
        for n in d.remove:
            envoy.pop(n, None)
        s.answer(d.nonce, None)
    assert envoy == dict(final)
    assert s.next(final) is None


# ------------------------------------------------------------------------------ confirm, fed by hand


def _clusters(names: dict[str, str]) -> XdsClusters:
    xds = XdsClusters("/nonexistent/xds.sock")
    xds._desired = dict(names)
    xds._seeded = True
    return xds


async def test_confirm_waits_for_the_ack_of_every_connected_envoy() -> None:
    xds = _clusters({"a": "1"})
    stream = DeltaStream()
    xds._streams[1] = (stream, asyncio.Event())
    d = stream.next(xds._desired)
    assert d is not None
    waiter = asyncio.ensure_future(xds.confirm(["a"], 30.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    stream.answer(d.nonce, None)
    xds._changed.set()
    await asyncio.wait_for(waiter, 30.0)


async def test_confirm_raises_envoys_reason_on_a_nack() -> None:
    xds = _clusters({"bad": "1"})
    stream = DeltaStream()
    xds._streams[1] = (stream, asyncio.Event())
    d = stream.next(xds._desired)
    assert d is not None
    waiter = asyncio.ensure_future(xds.confirm(["bad"], 30.0))
    await asyncio.sleep(0.01)
    stream.answer(d.nonce, "Failed to load trusted CA certificates")
    xds._changed.set()
    with pytest.raises(ClustersNotConfirmed, match=r"rejected.*Failed to load trusted CA"):
        await asyncio.wait_for(waiter, 30.0)


async def test_confirm_without_envoy_is_refused_after_the_limit() -> None:
    xds = _clusters({"a": "1"})
    with pytest.raises(ClustersNotConfirmed, match="no Envoy connected"):
        await xds.confirm(["a"], 0.05)


async def test_only_dns_clusters_are_waited_for_after_the_ack() -> None:
    """A literal IP's cluster is active when Envoy acknowledges it; a DNS one may still be warming."""
    from cohortgate.deploy.envoy.resources import ClusterResource

    xds = _clusters({"ip": "1", "dns": "1"})
    xds._resources = {
        "ip": ClusterResource("ip", "1", b""),
        "dns": ClusterResource("dns", "1", b"", resolves=True),
    }
    asked: list[set[str]] = []

    class Admin:
        async def wait_warm(self, names: set[str], deadline: float, poll_s: float) -> None:
            asked.append(names)

    xds.admin = Admin()  # type: ignore[assignment]
    stream = DeltaStream()
    xds._streams[1] = (stream, asyncio.Event())
    d = stream.next(xds._desired)
    assert d is not None
    stream.answer(d.nonce, None)
    await xds.confirm(["ip"], 30.0)
    assert asked == []
    await xds.confirm(["ip", "dns"], 30.0)
    assert asked == [{"dns"}]
