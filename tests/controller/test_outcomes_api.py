"""POST/GET /outcomes on the controller API (aiohttp_client), and the policy's metric declarations behind it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cohortgate.controller.api import make_app
from cohortgate.controller.gating import metric_specs
from cohortgate.controller.loop import Controller
from cohortgate.controller.outcomes_api import PASS_MAX_AGE_S, SERVICE_KEY
from cohortgate.core.errors import PolicyError
from cohortgate.core.exposure import mac_key, mint
from cohortgate.core.policy import parse_policy
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = mac_key(b"outcomes-test-key-0123456789")
OTHER = mac_key(b"somebody-elses-key-0123456789")

POLICY = """
version: 1
jwt: {issuer: https://auth.test, audience: test, jwks: jwks.json}
routes:
  - name: shop
    match: {path_prefix: /v2/models/shop}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
      - {name: canary, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
    metrics:
      - {name: conversion, kind: binary, role: primary, planned_units: 400}
      - {name: revenue, kind: mean, role: guardrail, margin: 0.05, attribution_window_s: 3600}
  - name: outcomes
    kind: outcomes
    match: {path_prefix: /v1/outcomes, methods: [POST]}
    variants:
      - {name: controller, weight: 100, backends: [{url: "http://127.0.0.1:9480", region: eu}]}
"""


def policy(text: str = POLICY):
    return parse_policy(text, filename="outcomes-test.yaml", base_dir=Path("/tmp"))


@pytest.fixture
async def api(aiohttp_client, monkeypatch):
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", "outcomes-test-key-0123456789")
    sink = InProcessSink()
    await sink.start()
    controller = Controller(policy(), InProcessState(), sink)
    await controller.start()
    return await aiohttp_client(make_app(controller, TOKEN, sink))


def token(variant: str, unit: str, t: float | None = None, key: bytes = KEY, route: str = "shop") -> str:
    return mint(key, route, variant, unit, time.time() if t is None else t)


def altered_mac(tok: str) -> str:
    """The token with its tag's first character changed: always a different tag (a fixed suffix
    such as "AA" equals the real one once in 256 draws, which made this test flaky)."""
    head, tag = tok.rsplit(".", 1)
    return f"{head}.{'B' if tag[0] == 'A' else 'A'}{tag[1:]}"


# ---------------------------------------------------------------------- the policy's declarations


def test_metrics_compile_into_the_policy_and_read_as_the_ledgers_specs():
    p = policy()
    shop = p.by_name["shop"]
    assert [m.name for m in shop.metrics] == ["conversion", "revenue"]
    assert shop.metrics[1].attribution_window_s == 3600 and shop.metrics[1].margin == 0.05
    assert p.by_name["outcomes"].kind == "outcomes" and shop.kind == "model"
    specs = metric_specs(p)
    assert list(specs) == ["shop"]
    assert [(s.name, s.kind, s.role, s.planned_units) for s in specs["shop"]] == [
        ("conversion", "binary", "primary", 400),
        ("revenue", "mean", "guardrail", 10_000),
    ]


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("kind: binary, role: primary", "kind: median, role: primary", "Input should be 'binary', 'mean' or 'ratio'"),
        ("role: guardrail, margin: 0.05", "role: guardrail", "a guardrail metric needs a non-inferiority `margin`"),
        (
            "kind: binary, role: primary",
            "kind: binary, role: primary, direction: up",
            "Input should be 'increase' or 'decrease'",
        ),
        (
            "name: revenue, kind: mean, role: guardrail",
            "name: revenue, kind: mean, role: primary",
            "more than one primary",
        ),
        ("name: revenue,", "name: conversion,", "duplicate metric name 'conversion'"),
        ("attribution_window_s: 3600", "attribution_window_s: 0", "greater than 0"),
        (
            "      - {name: controller, weight: 100",
            '      - {name: a, weight: 0, backends: [{url: "http://127.0.0.1:9", region: eu}]}\n'
            "      - {name: controller, weight: 100",
            "an outcomes route has one variant",
        ),
    ],
)
def test_bad_declarations_are_refused_with_their_position(old, new, problem):
    assert old in POLICY
    text = POLICY.replace(old, new, 1)
    with pytest.raises(PolicyError) as err:
        policy(text)
    assert problem in str(err.value)
    assert "outcomes-test.yaml:" in str(err.value)


# ---------------------------------------------------------------------- POST /outcomes


async def test_an_outcome_is_accepted_attributed_to_its_variant_and_counted_once(api):
    t = token("canary", "u1")
    resp = await api.post("/outcomes", json={"exposure": t, "metric": "conversion", "value": 1}, headers=AUTH)
    assert resp.status == 202 and await resp.json() == {"status": "accepted"}
    resp = await api.post("/outcomes", json={"exposure": t, "metric": "conversion", "value": 1}, headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"status": "duplicate"}
    await api.post(
        "/outcomes", json={"exposure": token("control", "u2"), "metric": "conversion", "value": 0}, headers=AUTH
    )
    doc = await (await api.get("/outcomes?route=shop", headers=AUTH)).json()
    conv = next(r for r in doc["results"] if r["metric"] == "conversion")
    assert conv["challenger"] == "canary" and conv["control"] == "control"
    assert conv["units"] == {"challenger": 1, "control": 1}
    assert conv["value"] == {"challenger": 1.0, "control": 0.0}
    assert doc["counts"] == {"accepted": 2, "duplicate": 1}
    assert doc["window_s"] == 7 * 24 * 3600  # the longest declared window


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: token("canary", "u1", key=OTHER), 403, "forged"),
        (lambda: altered_mac(token("canary", "u1")), 403, "forged"),
        (lambda: token("canary", "u1").replace(".canary.", ".control."), 403, "forged"),  # altered variant
        (lambda: token("canary", "u1", t=1_000_000.0), 403, "expired"),
        (lambda: token("canary", "u1", t=4_000_000_000.0), 403, "not_yet_valid"),
        (lambda: "not-a-token", 400, "malformed"),
    ],
)
async def test_refused_tokens_get_a_json_error_and_are_counted(api, make, status, code):
    resp = await api.post("/outcomes", json={"exposure": make(), "metric": "conversion", "value": 1}, headers=AUTH)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    doc = await (await api.get("/outcomes", headers=AUTH)).json()
    assert doc["counts"] == {code: 1} and doc["results"] == []


async def test_a_client_cannot_move_a_stale_token_back_into_its_window(api):
    old = token("canary", "u1", t=1_000_000.0)
    body = {"exposure": old, "metric": "conversion", "value": 1, "t": 1_000_001.0}
    resp = await api.post("/outcomes", json=body, headers=AUTH)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "expired"


async def test_unknown_metrics_and_bad_items_are_refused(api):
    resp = await api.post(
        "/outcomes", json={"exposure": token("canary", "u"), "metric": "nope", "value": 1}, headers=AUTH
    )
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "unknown_metric"
    for body in ({"exposure": token("canary", "u"), "metric": "conversion", "value": True}, {"exposure": 5}, 7):
        resp = await api.post("/outcomes", json=body, headers=AUTH)
        assert resp.status == 400, body
        assert "code" in (await resp.json())["error"]
    resp = await api.post("/outcomes", data=b"{", headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"


async def test_a_batch_answers_each_item(api):
    good = token("canary", "u1")
    batch = [
        {"exposure": good, "metric": "conversion", "value": 1},
        {"exposure": good, "metric": "conversion", "value": 1},
        {"exposure": token("canary", "u1", key=OTHER), "metric": "conversion", "value": 1},
        {"exposure": token("control", "u2"), "metric": "revenue", "value": 12.5},
        "junk",
    ]
    for body in (batch, {"outcomes": batch}):
        resp = await api.post("/outcomes", json=body, headers=AUTH)
        assert resp.status == 202
        doc = await resp.json()
        if body is batch:
            assert doc["statuses"] == ["accepted", "duplicate", "forged", "accepted", "bad_record"]
            assert doc["accepted"] == 2
        else:  # the same items again: the two accepted ones are duplicates now
            assert doc["statuses"] == ["duplicate", "duplicate", "forged", "duplicate", "bad_record"]
    resp = await api.post("/outcomes", json=[{}] * 10_001, headers=AUTH)
    assert resp.status == 413


# ---------------------------------------------------------------------- who may post


async def test_the_gateways_mark_replaces_the_admin_token_on_post_only(api):
    body = {"exposure": token("canary", "u1"), "metric": "conversion", "value": 1}
    fresh = token("controller", "gateway", route="outcomes")
    resp = await api.post("/outcomes", json=body, headers={"x-cohortgate-outcomes": fresh})
    assert resp.status == 202, await resp.text()
    # the mark opens nothing else, and only a fresh mark, for an outcomes route, under our key opens it
    assert (await api.get("/outcomes", headers={"x-cohortgate-outcomes": fresh})).status == 401
    assert (await api.get("/status", headers={"x-cohortgate-outcomes": fresh})).status == 401
    refused = [
        token("controller", "gateway", route="outcomes", t=time.time() - PASS_MAX_AGE_S - 5),
        token("controller", "gateway", route="outcomes", key=OTHER),
        token("canary", "u1"),  # an exposure token a client holds is not a mark: shop is not an outcomes route
        "1",
        "",
    ]
    for mark in refused:
        resp = await api.post("/outcomes", json=body, headers={"x-cohortgate-outcomes": mark})
        assert resp.status == 401, mark
        assert (await resp.json())["error"]["code"] == "unauthenticated"
    assert api.app[SERVICE_KEY].ledger.counts["accepted"] == 1


async def test_without_a_key_no_mark_opens_the_path(aiohttp_client, monkeypatch):
    monkeypatch.delenv("COHORTGATE_EXPOSURE_KEY", raising=False)
    sink = InProcessSink()
    await sink.start()
    client = await aiohttp_client(make_app(Controller(policy(), InProcessState(), sink), TOKEN, sink))
    mark = token("controller", "gateway", route="outcomes")
    body = {"exposure": token("canary", "u1"), "metric": "conversion", "value": 1}
    assert (await client.post("/outcomes", json=body, headers={"x-cohortgate-outcomes": mark})).status == 401
    resp = await client.post("/outcomes", json=body, headers=AUTH)  # admin: reaches the handler, no key verifies
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forged"


async def test_a_policy_reload_brings_new_metrics(api):
    service = api.app[SERVICE_KEY]
    text = POLICY.replace(
        "      - {name: conversion, kind: binary, role: primary, planned_units: 400}",
        "      - {name: conversion, kind: binary, role: primary, planned_units: 400}\n"
        "      - {name: clicks, kind: ratio, role: secondary}",
    )
    body = {"exposure": token("canary", "u1"), "metric": "clicks", "value": 3}
    assert (await api.post("/outcomes", json=body, headers=AUTH)).status == 422
    service.controller.policy = policy(text)  # what the controller's reload swaps
    assert (await api.post("/outcomes", json=body, headers=AUTH)).status == 202
