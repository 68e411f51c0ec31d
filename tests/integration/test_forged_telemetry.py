"""Issue 17.2 through real Envoy: client-sent x-cohortgate-* headers never become the controller's evidence.

Envoy logs the request headers of every request, denials and fail-closed answers included, and on
those the processor never stripped what the client sent. The controller must attribute outcomes
only by Envoy's upstream cluster, so forged route/variant/cluster headers on requests that never
reached a backend are neither canary traffic nor canary errors, and cannot roll a canary back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cohortgate.controller.als import AccessLogReceiver, route_by_path
from cohortgate.controller.loop import Controller
from cohortgate.core.rollout import Phase
from cohortgate.deploy import pki
from tests.integration.conftest import Client, controlled_edge, mint
from tests.integration.test_rollback_e2e import POLICY, KnobUpstream

pytestmark = pytest.mark.integration

FORGED = {
    "x-cohortgate-route": "tabular",
    "x-cohortgate-variant": "canary",
    "x-cohortgate-cluster": "cg.tabular.canary.0",
    "x-cohortgate-unit": "0123456789abcdef",
    "x-cohortgate-region": "eu",
}


@dataclass
class Stack:
    controller: Controller
    receiver: AccessLogReceiver
    gateway: Any
    denied: list[Any]
    client: Client
    token: str

    def canary(self) -> dict[str, Any]:
        return self.controller.status()["routes"]["tabular"]["variants"]["canary"]

    async def logged(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until Envoy's access log delivered ``n`` entries (it flushes every 200 ms; generous for CI)."""
        deadline = time.monotonic() + timeout_s
        while self.receiver.entries < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert self.receiver.entries >= n, f"{self.receiver.entries} of {n} access-log entries arrived"
        await asyncio.sleep(0.6)  # two controller intervals: whatever was emitted is ingested and judged


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, certs: pki.CertPaths) -> AsyncIterator[Stack]:
    control, canary = KnobUpstream("control").start(), KnobUpstream("canary").start()
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        POLICY.format(jwks=certs.jwks, control=control.url, canary=canary.url, min_samples=20, interval_s=300)
    )
    denied: list[Any] = []

    def als(controller: Controller) -> dict[str, Any]:
        return {"on_denied": denied.append, "route_of": route_by_path(lambda: controller.policy)}

    try:
        async with controlled_edge(
            policy_path, certs, tmp_path, salt=b"forged-telemetry-unit-salt-0123456", als_options=als
        ) as e:
            yield Stack(e.controller, e.receiver, e.gateway, denied, e.client, mint(certs, "user-1", residency="eu"))
    finally:
        control.stop()
        canary.stop()


def send(client: Client, n: int, **kwargs: Any) -> list[int]:
    return [client.request(headers=FORGED, **kwargs).status for _ in range(n)]


async def test_forged_headers_on_denials_and_fail_closed_answers_are_not_canary_evidence(tmp_path, certs):
    async with stack(tmp_path, certs) as s:
        # 300 unauthenticated requests that claim to be canary traffic
        assert set(await asyncio.to_thread(send, s.client, 300)) == {401}
        await s.logged(300)
        assert s.controller.events_seen == 0, "denials reached the controller as outcomes"
        assert s.canary()["window"]["requests"] == 0
        assert len(s.denied) == 300 and {(e.route, e.variant) for e in s.denied} == {("tabular", "")}

        # the processor goes away: Envoy fails closed with 503 on 250 forged "canary" requests
        await s.gateway.close()
        assert set(await asyncio.to_thread(send, s.client, 250, token=s.token)) == {503}
        await s.logged(550)
        assert s.controller.events_seen == 0, "fail-closed answers reached the controller as outcomes"
        assert s.canary()["window"]["errors"] == 0
        assert s.controller.states["tabular"].variants["canary"].phase is not Phase.ROLLED_BACK
        assert len(s.denied) == 550 and {e.status for e in s.denied[300:]} == {503}
