"""The exposure token: what is minted verifies, anything altered, forged or stale is refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.core import contract
from cohortgate.core.exposure import (
    Exposure,
    ExposureRefused,
    Refusal,
    exposure_id,
    mac_key,
    mint,
    parse_keys,
    verify,
)

KEY = mac_key(b"exposure-secret-for-tests-0001")
OTHER = mac_key(b"another-secret-nobody-shares-02")
NOW = 1_800_000_000.0
UNIT = "0123456789abcdef"
labels = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


def _refusal(token: object, keys=(KEY,), now: float = NOW, max_age_s: float = 3600.0) -> Refusal:
    with pytest.raises(ExposureRefused) as info:
        verify(token, keys, now, max_age_s)  # type: ignore[arg-type]
    return info.value.reason


@given(route=labels, variant=labels, unit=st.from_regex(r"\A[0-9a-f]{16}\Z"), rid=st.text(max_size=60))
def test_a_minted_token_verifies_to_what_was_minted(route: str, variant: str, unit: str, rid: str) -> None:
    token = mint(KEY, route, variant, unit, NOW, exposure_id(rid))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", token)  # URL-safe: no escaping in a query or JSON
    assert verify(token, [KEY], NOW + 10, 3600) == Exposure(route, variant, unit, int(NOW), exposure_id(rid))


def test_the_token_is_compact_and_names_the_request() -> None:
    token = mint(KEY, "tabular", "challenger", UNIT, NOW, exposure_id("f81d4fae-7dec-11d0-a765-00a0c91e6bf6"))
    assert len(token) < 90
    assert verify(token, [KEY], NOW, 60).eid == exposure_id("f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    # Without a request id, each response gets its own exposure (two tokens, two identities).
    a, b = (verify(mint(KEY, "tabular", "control", UNIT, NOW), [KEY], NOW, 60) for _ in range(2))
    assert a.key != b.key


def test_every_single_character_alteration_is_refused() -> None:
    # Exhaustive over positions and the URL-safe alphabet: includes the MAC's last character, whose
    # low 4 bits base64 leaves unused (a decoder would accept 16 spellings of one tag).
    token = mint(KEY, "tabular", "challenger", UNIT, NOW, exposure_id("req-1"))
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_."
    for i, original in enumerate(token):
        for c in alphabet.replace(original, ""):
            assert _refusal(token[:i] + c + token[i + 1 :]) in (Refusal.FORGED, Refusal.MALFORMED), (i, c)


def test_a_variant_swapped_by_the_client_is_forged() -> None:
    token = mint(KEY, "tabular", "control", UNIT, NOW, exposure_id("req-1"))
    assert _refusal(token.replace(".control.", ".challenger.")) is Refusal.FORGED


def test_a_token_under_another_key_is_forged_and_rotation_keeps_old_tokens() -> None:
    old = mint(OTHER, "tabular", "control", UNIT, NOW)
    assert _refusal(old) is Refusal.FORGED
    assert verify(old, [KEY, OTHER], NOW, 60).variant == "control"  # rotation: the old key still verifies


def test_expiry_is_the_attribution_window_and_the_future_is_refused() -> None:
    token = mint(KEY, "tabular", "control", UNIT, NOW)
    assert verify(token, [KEY], NOW + 3600, 3600).issued_at == int(NOW)
    assert _refusal(token, now=NOW + 3601) is Refusal.EXPIRED
    assert verify(token, [KEY], NOW - 59, 3600)  # a gateway's clock a little ahead is tolerated
    assert _refusal(token, now=NOW - 61) is Refusal.NOT_YET_VALID


def test_a_forged_token_is_refused_before_its_time_is_read() -> None:
    stale = mint(OTHER, "tabular", "control", UNIT, NOW - 10**6)
    assert _refusal(stale) is Refusal.FORGED  # not "expired": a forgery learns nothing more


@given(st.one_of(st.text(max_size=200), st.binary(max_size=50), st.none(), st.integers()))
def test_anything_else_is_refused_never_crashes(junk: object) -> None:
    assert _refusal(junk) in (Refusal.MALFORMED, Refusal.FORGED)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "1.a.b.c.d.e",
        "2.tabular.control.0123456789abcdef.6b49d200.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "1.Tabular.control.0123456789abcdef.6b49d200.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "1.tabular.control.0123456789abcdef.-6b49d20.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "1.tabular.control.0123456789abcdef.6b49d200.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAA$",
        "x" * 600,
    ],
)
def test_malformed_tokens_say_so(token: str) -> None:
    refusal = _refusal(token)
    assert refusal is Refusal.MALFORMED
    assert (refusal.code, refusal.status) == ("malformed", 400)


def test_refusal_codes_are_stable() -> None:
    assert {r.code: r.status for r in Refusal} == {
        "malformed": 400,
        "forged": 403,
        "expired": 403,
        "not_yet_valid": 403,
    }


def test_keys_come_from_one_variable_and_short_ones_are_refused() -> None:
    assert contract.EXPOSURE_KEY_ENV == "COHORTGATE_EXPOSURE_KEY"
    assert contract.HEADER_EXPOSURE == "x-cohortgate-exposure"
    keys = parse_keys(" exposure-secret-for-tests-0001 , another-secret-nobody-shares-02")
    assert keys == (KEY, OTHER)
    token = mint(keys[0], "tabular", "control", UNIT, NOW)
    assert verify(token, keys[::-1], NOW, 60).route == "tabular"
    with pytest.raises(ValueError, match="at least 16 bytes"):
        parse_keys("short")
    with pytest.raises(ValueError, match="no exposure key"):
        parse_keys(" , ")
