"""A bandit route end to end through real Envoy: the sticky note, its echo, forgeries, outcomes moving the weights.

Real parts: Envoy (mTLS, the test PKI's client certificate and JWTs), the gateway process
(``$COHORTGATE_EXPOSURE_KEY`` set: it mints exposure tokens and assignment notes) following the
controller's state file, and a real `Controller` whose API (the backend of the policy's ``kind:
outcomes`` route) takes the client's outcomes. The controller's updates are driven by the test
(`Controller.tick` on the API's loop, its clock moved past ``update_s``) so every step is a condition
to wait for, never a sleep. One transport (grpc): the processor's header logic is transport-free and
``tests/gateway/test_sticky_header.py`` covers it message by message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cohortgate.core import sticky
from cohortgate.core.exposure import parse_keys
from cohortgate.deploy import pki
from tests.integration.conftest import Client, ControllerThread, Upstream, edge, free_port, mint

SECRET = "integration-bandit-key-0123456789"
ADMIN = "bandit-e2e-admin-token"
ASSIGNMENT = "x-cohortgate-assignment"
INFER = "/v2/models/ranker/infer"
WAIT_S = 30.0  # generous: a loaded 2-core CI machine; every wait ends as soon as its condition holds

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
  leeway_s: 5
routes:
  - name: ranker
    match: {{model: ranker, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: bandit-e2e
    residency:
      source: {{claim: residency}}
      on_missing_region: fallback_control
    variants:
      - name: control
        weight: 50
        backends:
          - {{url: "{control_eu}", region: eu}}
          - {{url: "{control_ae}", region: ae}}
      - name: challenger
        weight: 50
        backends:
          - {{url: "{challenger_eu}", region: eu}}
          - {{url: "{challenger_ae}", region: ae}}
    metrics:
      - {{name: conversion, kind: binary, role: secondary}}
    allocation:
      strategy: thompson
      reward: conversion
      update_s: 1
      min_share: 0.05
      segments: [region]
  - name: outcomes
    kind: outcomes
    match: {{path_prefix: /v1/outcomes, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [outcomes]
    residency:
      default_region: eu
    variants:
      - {{name: controller, weight: 100, backends: [{{url: "http://127.0.0.1:{api_port}", region: eu}}]}}
"""


def update(api: ControllerThread) -> dict[str, dict[str, int]]:
    """One allocation update now (the clock steps past update_s); the published segment weights."""

    async def step() -> dict[str, dict[str, int]]:
        api.skew += 5.0
        await api.controller.tick()
        return {s: dict(w) for s, w in api.controller.states["ranker"].segment_weights.items()}

    return api.call(step())


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, upstreams: dict[str, Upstream]
) -> Iterator[tuple[Client, ControllerThread, pki.CertPaths]]:
    from cohortgate.core.policy import load_policy

    work = tmp_path_factory.mktemp("bandit-e2e")
    api_port = free_port()
    policy_file = work / "policy.yaml"
    policy_file.write_text(
        POLICY.format(
            jwks=certs.jwks,
            control_eu=upstreams["control-eu"].url,
            control_ae=upstreams["control-ae"].url,
            challenger_eu=upstreams["challenger-eu"].url,
            challenger_ae=upstreams["challenger-ae"].url,
            api_port=api_port,
        )
    )
    policy = load_policy(policy_file)
    state_file = work / "state" / "states.json"
    state_file.parent.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)  # the gateway child and the controller both read it
    from cohortgate.controller.gating import OutcomeGate

    gate = OutcomeGate(policy, parse_keys(SECRET))
    api = ControllerThread(policy, api_port, ADMIN, state_file=state_file, outcomes=gate).start()
    try:
        # the gateway follows the controller's weights
        with edge(policy_file, certs, work, gateway_args=["--state-file", str(state_file)]) as e:
            yield e.client, api, certs
    finally:
        api.stop()
        mp.undo()


def infer(client: Client, certs: pki.CertPaths, sub: str, note: str | None = None, region: str = "eu"):
    """One request; returns (the arm that answered, the note sent back, the exposure token)."""
    headers = {ASSIGNMENT: note} if note is not None else {}
    reply = client.request(INFER, token=mint(certs, sub, residency=region), headers=headers)
    assert reply.status == 200, reply.body  # a note, good or bad, never makes a request fail
    arm = reply.json()["upstream"].rsplit("-", 1)[0]
    return arm, reply.headers[ASSIGNMENT], reply.headers["x-cohortgate-exposure"]


def post_outcomes(client: Client, certs: pki.CertPaths, items: list[dict[str, Any]]) -> list[str]:
    token = mint(certs, "reporter", scopes=["outcomes"])
    reply = client.request("/v1/outcomes", token=token, body=json.dumps(items).encode())
    assert reply.status == 202, reply.body
    return reply.json()["statuses"]


def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        time.sleep(0.05)


KEY = sticky.sticky_key(parse_keys(SECRET)[0])


def test_notes_keep_arms_while_outcomes_move_the_weights_and_forgeries_count_for_nothing(plane):
    client, api, certs = plane
    # 1. new units get a note for the arm that served them, and their exposure token names the segment
    served: dict[str, tuple[str, str, str]] = {}
    for i in range(80):
        arm, note, token = infer(client, certs, f"user-{i}")
        assert note.startswith(f"1.{arm}.") and sticky.verify(note, (KEY,), "ranker", "bandit-e2e", f"user-{i}") == arm
        assert token.startswith(f"2.ranker.{arm}.") and token.rsplit(".", 2)[1] == "eu"
        served[f"user-{i}"] = (arm, note, token)
    on = {a: [u for u, s in served.items() if s[0] == a] for a in ("control", "challenger")}
    assert len(on["control"]) >= 10 and len(on["challenger"]) >= 10  # 50/50 at the start

    # 2. the client reports: challenger's units converted, control's did not
    items = [
        {"exposure": token, "metric": "conversion", "value": 1 if arm == "challenger" else 0}
        for arm, _, token in served.values()
    ]
    assert set(post_outcomes(client, certs, items)) == {"accepted"}

    # 3. the controller's update moves eu toward challenger; the gateway follows the state file
    weights = update(api)
    assert weights["eu"]["challenger"] >= 90 and weights["eu"]["control"] >= 5

    def new_units_follow() -> bool:
        arms = [infer(client, certs, f"probe-{time.monotonic_ns()}-{j}")[0] for j in range(10)]
        return arms.count("challenger") >= 8

    wait_until("new eu units go mostly to challenger", new_units_follow)

    # 4. every returning unit that echoes its note keeps its arm, control's units included
    for unit, (arm, note, _) in served.items():
        again, note_back, _ = infer(client, certs, unit, note)
        assert again == arm and note_back == note

    # 5. forged or altered notes count for nothing: a fresh assignment by the layout, never an error
    forged_arms = []
    for j in range(20):
        unit = f"forger-{j}"
        fake = f"1.control.{'A' * 22}"  # a made-up tag for the shrunken arm
        stolen = served[on["control"][0]][1]  # another unit's genuine note
        for bad in (fake, stolen, stolen.replace("1.control.", "1.challenger."), "garbage"):
            arm, note, _ = infer(client, certs, unit, bad)
            assert note != bad and sticky.verify(note, (KEY,), "ranker", "bandit-e2e", unit) == arm
            forged_arms.append(arm)
    assert forged_arms.count("control") <= len(forged_arms) // 3  # honoured, 60 of 80 would say control

    # 6. every segment has weights of its own (ae has no units yet: it starts from the route's tallies)
    assert set(weights) == {"eu", "ae", "other"}
    ae = [infer(client, certs, f"ae-user-{j}", region="ae")[2].rsplit(".", 2)[1] for j in range(3)]
    assert ae == ["ae"] * 3  # the ae requests' exposures are attributed to ae
