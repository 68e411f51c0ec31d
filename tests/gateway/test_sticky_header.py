"""The processor on a bandit route: it sets x-cohortgate-assignment, honours the client's echo, and never
forwards a note it did not honour -- no Envoy (tests/core/test_bandit.py has the properties)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohortgate.core import sticky
from cohortgate.core.exposure import mac_key
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from gateway.extproc import Processor, ProcessorSettings
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import SALT, infer, request, set_headers, token

ROOT = Path(__file__).resolve().parents[2]
NOTE = "x-cohortgate-assignment"
KEYS = (sticky.sticky_key(mac_key(b"sticky-test-key-0123456789")),)
RANKER = "/v2/models/ranker/infer"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("sticky") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    text = (ROOT / "policies" / "bandit.yaml").read_text().replace("../certs/jwks.json", str(certs.jwks))
    return parse_policy(text, filename="bandit.yaml", base_dir=ROOT / "policies")


def engine(policy: Policy, keys: tuple[bytes, ...] = KEYS) -> Processor:
    settings = ProcessorSettings(unit_salt=SALT, max_body_bytes=1000, exposure_key=None, sticky_keys=keys)
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), settings)


def test_the_note_is_set_and_an_echo_keeps_the_arm_after_the_weights_move(policy, certs):
    auth = f"Bearer {token(certs, 'user-42')}"
    first = set_headers(engine(policy).handle_proto(request(infer(auth, RANKER))))
    arm = first["x-cohortgate-variant"]
    assert sticky.verify(first[NOTE], KEYS, "ranker", "ranker-bandit-2026-11", "user-42") == arm
    for weights in ({"control": 90, "canary": 5, "challenger": 5}, {"control": 5, "canary": 5, "challenger": 90}):
        moved = engine(policy.with_weights({"ranker": weights}))
        again = set_headers(moved.handle_proto(request(infer(auth, RANKER, **{NOTE: first[NOTE]}))))
        assert again["x-cohortgate-variant"] == arm and again[NOTE] == first[NOTE]


def test_a_note_not_honoured_is_replaced_or_removed(policy, certs):
    forged = "1.canary." + "A" * 22
    auth = f"Bearer {token(certs, 'user-43')}"
    resp = engine(policy).handle_proto(request(infer(auth, RANKER, **{NOTE: forged})))
    assert set_headers(resp)[NOTE] != forged  # overwritten by the unit's own note
    unkeyed = engine(policy, keys=()).handle_proto(request(infer(auth, RANKER, **{NOTE: forged})))
    assert NOTE not in set_headers(unkeyed)
    assert NOTE in list(unkeyed.request_headers.response.header_mutation.remove_headers)
