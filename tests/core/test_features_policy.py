"""A route's `features:` block (issue 22): compiled for the gateway and the sidecar, refused with positions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cohortgate.core.contract import ACCESS_LOG_HEADERS, HEADER_ENTITY
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import parse_policy

BASE = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
routes:
  - name: shop
    match: {model: shop}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:1", region: eu}]}
      - {name: personal, weight: 50, backends: [{url: "http://127.0.0.1:2", region: eu}]}
    shadows:
      - {name: next, percent: 10, backends: [{url: "http://127.0.0.1:3", region: eu}]}
"""


def with_features(block: str) -> str:
    return BASE + textwrap.indent("features:\n" + textwrap.indent(textwrap.dedent(block), "  "), "    ")


GOOD = """\
store: redis://127.0.0.1:6379/0
project: cgdemo
join_key: user_id
entity: {claim: sub}
entity_type: int64
views: [user_stats:clicks_7d, user_profile:embedding]
budget_ms: 4
max_age_s: 600
fallback: {model: global.onnx}
variants: [personal, next]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, filename="p.yaml")
    return list(info.value.problems)


def test_a_block_compiles_for_the_gateway_and_the_sidecar(tmp_path: Path) -> None:
    route = parse_policy(with_features(GOOD), base_dir=tmp_path).by_name["shop"]
    f = route.features
    assert f is not None
    assert (f.entity_source, f.entity_key, f.entity_type, f.join_key, f.project) == (
        "claim", "sub", "int64", "user_id", "cgdemo"
    )  # fmt: skip
    assert f.views == ("user_stats:clicks_7d", "user_profile:embedding")
    assert (f.budget_ms, f.max_age_s, f.defaults) == (4.0, 600.0, None)
    assert f.fallback_model == str(tmp_path / "global.onnx")  # resolved like a backend's model
    assert f.joins("personal") and f.joins("next") and not f.joins("control")
    assert "redis://" not in repr(f)  # the store URL may carry a password


def test_defaults_are_flattened_in_view_order_and_a_header_is_lower_cased() -> None:
    block = GOOD.replace("entity: {claim: sub}", "entity: {header: X-User-Id}").replace(
        "fallback: {model: global.onnx}",
        "fallback: {defaults: {user_profile:embedding: [0, 0.5], user_stats:clicks_7d: 3}}",
    )
    f = parse_policy(with_features(block)).by_name["shop"].features
    assert f is not None
    assert (f.entity_source, f.entity_key) == ("header", "x-user-id")
    assert f.defaults == ((3.0,), (0.0, 0.5)) and f.fallback_model is None


def test_a_route_without_the_block_joins_nothing() -> None:
    assert parse_policy(BASE).by_name["shop"].features is None


def test_the_entity_header_is_never_logged() -> None:
    assert HEADER_ENTITY not in ACCESS_LOG_HEADERS  # a raw user id: the access log carries only the hashed unit


@pytest.mark.parametrize(
    ("change", "line", "says"),
    [
        (("store: redis://127.0.0.1:6379/0", "store: http://127.0.0.1:6379"), 12, "must be a redis://"),
        (("user_profile:embedding]", "user_profile]"), 17, "'user_profile' is not a `view:feature` entry"),
        (("user_profile:embedding]", "user_stats:clicks_7d]"), 17, "named twice"),
        (("entity: {claim: sub}", "entity: {header: x-cohortgate-unit}"), 15, "strips every x-cohortgate-*"),
        (("variants: [personal, next]", "variants: [personal, nobody]"), 21, "'nobody' is not a variant or shadow"),
        (
            ("fallback: {model: global.onnx}", "fallback: {defaults: {user_stats:clicks_7d: 0}}"),
            20,
            "no default for 'user_profile:embedding'",
        ),
        (("fallback: {model: global.onnx}", "fallback: {}"), 20, "exactly one of `model` or `defaults`"),
        (("budget_ms: 4", "budget_ms: 0"), 18, "greater than 0"),
        (("entity_type: int64", "entity_type: uuid"), 16, "'string' or 'int64'"),
    ],
)
def test_mistakes_are_refused_at_their_position(change: tuple[str, str], line: int, says: str) -> None:
    assert change[0] in GOOD
    problems = problems_of(with_features(GOOD.replace(*change)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"p.yaml:{line}:"), problems
    assert says in problems[0]


def test_an_unknown_key_in_the_block_is_refused() -> None:
    problems = problems_of(with_features(GOOD + "timeout_ms: 3\n"))
    assert len(problems) == 1 and "timeout_ms" in problems[0]
