"""Issue 19 through real Envoy: a unit served and never reporting an outcome is in the metric's denominator.

Real parts: Envoy (its gRPC access log to the controller's receiver on a Unix socket), the gateway's
processor (``$COHORTGATE_EXPOSURE_KEY`` set, so every allowed request carries an exposure token), the
controller's loop and its API (aiohttp on 127.0.0.1), TLS with client certificates and JWTs from the
test PKI, and the session's upstreams. Only some units post a conversion; ``GET /outcomes`` must count
every unit Envoy served, so the conversion rate is conversions over units exposed, not over reporters.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from cohortgate.controller.als import route_by_path, routes_with_metrics
from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller
from cohortgate.deploy import pki
from tests.integration.conftest import Upstream, controlled_edge, free_port, mint

pytestmark = pytest.mark.integration

SECRET = "exposure-e2e-key-0123456789abcdef"
ADMIN = "exposure-e2e-admin-token"
USERS = 60  # distinct units, about half on each arm
CONVERTERS = 3  # per arm: the only units that post anything

POLICY = """
version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, algorithms: [ES256], jwks: {jwks}}}
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth: {{identities: ["spiffe://cohortgate.local/app-*"], scopes: [predict]}}
    cohorts: {{unit: {{claim: sub}}, salt: exposure-e2e}}
    residency: {{default_region: eu}}
    variants:
      - {{name: control, weight: 50, backends: [{{url: "{control}", region: eu}}]}}
      - {{name: canary, weight: 50, backends: [{{url: "{canary}", region: eu}}]}}
    metrics:
      - {{name: conversion, kind: binary, role: primary}}
"""


def http(port: int, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def until(check, what: str, timeout_s: float = 60.0) -> None:
    """Poll ``check()`` (generous: Envoy flushes its access log every 200 ms; CI is a loaded 2-core box)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s"
        await asyncio.sleep(0.1)


async def test_units_served_without_any_outcome_count_in_the_denominator(
    tmp_path, certs: pki.CertPaths, upstreams: dict[str, Upstream], monkeypatch
):
    from aiohttp import web

    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)  # the processor mints, the controller verifies
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        POLICY.format(jwks=certs.jwks, control=upstreams["control-eu"].url, canary=upstreams["canary-eu"].url)
    )

    def als(controller: Controller) -> dict[str, Any]:
        return {
            "route_of": route_by_path(lambda: controller.policy),
            "measured": routes_with_metrics(lambda: controller.policy),
        }

    async with controlled_edge(
        policy_path, certs, tmp_path, salt=b"exposure-e2e-unit-salt-0123456789", als_options=als
    ) as e:
        controller, client = e.controller, e.client
        api = web.AppRunner(make_app(controller, ADMIN, e.sink))
        await api.setup()
        api_port = free_port()
        await web.TCPSite(api, "127.0.0.1", api_port).start()
        try:

            def serve_everyone() -> dict[str, list[str]]:
                tokens: dict[str, list[str]] = {"control": [], "canary": []}
                for i in range(USERS):
                    reply = client.request(token=mint(certs, f"user-{i}"))
                    assert reply.status == 200, reply.body
                    tokens[reply.headers["x-cohortgate-variant"]].append(reply.headers["x-cohortgate-exposure"])
                return tokens

            tokens = await asyncio.to_thread(serve_everyone)
            assert min(len(t) for t in tokens.values()) > CONVERTERS, {v: len(t) for v, t in tokens.items()}
            ledger = controller.outcomes.ledger
            await until(lambda: ledger.exposure_counts["accepted"] >= USERS, f"{USERS} exposures from the access log")

            batch = [
                {"exposure": tok, "metric": "conversion", "value": 1} for t in tokens.values() for tok in t[:CONVERTERS]
            ]
            reply = await asyncio.to_thread(http, api_port, "POST", "/outcomes", batch)
            assert reply["accepted"] == len(batch), reply

            got = await asyncio.to_thread(http, api_port, "GET", "/outcomes?route=tabular")
            (conv,) = got["results"]
            n_control, n_canary = len(tokens["control"]), len(tokens["canary"])
            assert conv["units"] == {"challenger": n_canary, "control": n_control}  # every unit served, not 3 + 3
            assert conv["value"]["control"] == pytest.approx(CONVERTERS / n_control)  # was 1.0: reporters only
            assert conv["value"]["challenger"] == pytest.approx(CONVERTERS / n_canary)
            assert got["exposures"] == {"accepted": USERS}  # every token verified, none dropped
            assert got["counts"] == {"accepted": len(batch)}  # the outcomes' counts are the clients' own
        finally:
            await api.cleanup()
