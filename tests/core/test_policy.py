"""Policy loading: every mistake is reported at its FILE:LINE:COL, and a good file compiles."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import _overlap, _overlap_candidates, load_policy, parse_policy
from cohortgate.core.schema import Route as RouteModel

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"

GOOD = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
routes:
  - name: r
    match: {model: m}
    variants:
      - name: control
        weight: 100
        backends: [{url: "http://127.0.0.1:1", region: eu}]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), filename="p.yaml")
    return list(info.value.problems)


def test_example_policy_compiles():
    policy = load_policy(EXAMPLE)
    assert [r.name for r in policy.routes] == ["tabular", "ae-scoring", "shop", "outcomes"]
    shop = policy.by_name["shop"]  # the demo's outcome experiment: two challengers, a primary metric
    assert [v.name for v in shop.variants] == ["control", "big-images", "small-images"]
    assert [m.name for m in shop.metrics if m.role == "primary"] == ["conversion"]
    assert shop.rollout is not None and shop.rollout.promote_on_win
    assert policy.by_name["outcomes"].kind == "outcomes"
    tabular = policy.by_name["tabular"]
    assert [v.name for v in tabular.variants] == ["control", "canary"]
    assert [s.name for s in tabular.shadows] == ["challenger"]
    assert tabular.allowed_regions == {"eu", "ae"}
    assert policy.by_name["ae-scoring"].allowed_regions == {"ae"}
    assert policy.jwt.jwks.endswith("certs/jwks.json") and Path(policy.jwt.jwks).is_absolute()
    assert len({b.cluster for b in policy.backends}) == len(policy.backends) == 9


def test_every_listed_mistake_is_reported_with_its_line():
    bad = """\
    version: 1
    jwt: {issuer: iss, audience: aud, jwks: jwks.json}
    routes:
      - name: tabular
        match: {model: tabular}
        colour: blue
        cohorts:
          overrides: {qa-1: ghost}
        variants:
          - name: control
            weight: 80
            backends: [{url: "http://127.0.0.1:18101", region: eu}]
          - name: canary
            weight: 10
            backends: [{url: "ftp//nowhere", region: eu}]
        shadows:
          - name: mirror
            percent: 10
            backends: [{url: "http://127.0.0.1:18109", region: us}]
      - name: tabular
        match: {path_prefix: /v2/models/tabular}
        variants:
          - name: control
            weight: 100
            backends: [{url: "http://127.0.0.1:18102", region: eu}]
    """
    found = problems_of(bad)
    text = "\n".join(found)
    expected = {
        6: "unknown field `colour`",
        8: "unknown variant 'ghost'",
        9: "sum to 90, not 100",
        15: "must be http(s)://host",
        19: "outside every region",
        20: "duplicate route name 'tabular'",
        21: "overlaps route 'tabular'",
    }
    for line, fragment in expected.items():
        assert any(p.startswith(f"p.yaml:{line}:") and fragment in p for p in found), (line, fragment, text)
    assert all(re.match(r"^p\.yaml:\d+:\d+: ", p) for p in found)


@pytest.mark.parametrize(
    ("old", "new", "field", "value"),
    [
        ("weight: 100", "weight: 101", "routes.0.variants.0.weight", "101"),
        ("region: eu", "region: ''", "routes.0.variants.0.backends.0.region", "''"),
        ("model: m", "model: 'a/b'", "routes.0.match.model", "'a/b'"),
        ("jwks: jwks.json", "jwks: jwks.json, algorithms: [HS256]", "jwt.algorithms.0", "HS256"),
        ("jwks: jwks.json", "jwks: jwks.json, algorithms: [none]", "jwt.algorithms.0", "none"),
    ],
)
def test_schema_errors_point_at_the_field(old, new, field, value):
    """The one problem names the field and the LINE:COL (1-based) where its bad value starts."""
    text = GOOD.replace(old, new)
    lines = text.splitlines()
    line = next(i for i, t in enumerate(lines, 1) if new in t)
    col = lines[line - 1].index(value, lines[line - 1].index(new)) + 1
    found = problems_of(text)
    assert len(found) == 1 and found[0].startswith(f"p.yaml:{line}:{col}: {field}: "), (found, line, col)


def test_backend_url_that_does_not_parse():
    found = problems_of(GOOD.replace("http://127.0.0.1:1", "http://127.0.0.1:99999"))
    assert len(found) == 1 and "does not parse" in found[0] and found[0].startswith("p.yaml:9:"), found


def test_problems_are_listed_in_file_order():
    text = GOOD.replace("weight: 100", "weight: 50").replace("match: {model: m}", "match: {model: m, x: 1}")
    found = problems_of(text)
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines) and len(found) == 2, found


def test_missing_field_and_yaml_syntax_error():
    found = problems_of(GOOD.replace("        weight: 100\n", ""))
    assert any("missing required field `routes.0.variants.0.weight`" in p for p in found), found
    found = problems_of("routes: [\n  - {name: x\n")
    assert len(found) == 1 and "YAML syntax error" in found[0] and found[0].startswith("p.yaml:")


def test_duplicate_yaml_keys_are_refused():
    found = problems_of(GOOD.replace("    match: {model: m}\n", "    match: {model: m}\n    match: {model: n}\n"))
    assert any("duplicate key 'match'" in p and p.startswith("p.yaml:6:") for p in found), found


def test_residency_rules():
    text = GOOD.replace(
        "    variants:",
        "    residency: {allowed_regions: [eu, ae], default_region: us}\n    variants:",
    )
    found = problems_of(text)
    assert any("region 'ae' is allowed but no variant has a backend there" in p for p in found), found
    assert any("default_region 'us'" in p for p in found), found


def test_rollout_and_identity_rules():
    text = GOOD.replace(
        "    variants:",
        "    auth: {identities: ['spiffe://td/*/x', 'alice']}\n"
        "    rollout: {variant: control, steps: [50, 10]}\n    variants:",
    )
    found = "\n".join(problems_of(text))
    assert "must be a spiffe:// ID" in found and "'alice'" in found
    assert "control variant 'control' cannot be rolled out" in found
    assert "strictly increasing" in found


def test_segment_prefixes_do_not_overlap_siblings():
    text = GOOD + textwrap.indent(textwrap.dedent("""\
      - name: r2
        match: {model: m2}
        variants:
          - name: control
            weight: 100
            backends: [{url: "http://127.0.0.1:2", region: eu}]
    """), "  ")
    policy = parse_policy(text)
    assert policy.match("POST", "/v2/models/m/infer").name == "r"
    assert policy.match("POST", "/v2/models/m2/infer").name == "r2"
    assert policy.match("POST", "/v2/models/m3/infer") is None


def test_path_prefix_matching_is_whole_segment_and_method_aware():
    policy = load_policy(EXAMPLE)
    assert policy.match("POST", "/v2/models/ae-scoring/infer").name == "ae-scoring"
    assert policy.match("POST", "/v2/models/ae-scoring").name == "ae-scoring"
    assert policy.match("POST", "/v2/models/ae-scoring-old/infer") is None
    assert policy.match("DELETE", "/v2/models/tabular") is None
    assert policy.match("GET", "/v2/models/tabular/versions/3/ready").name == "tabular"


def test_the_root_prefix_matches_every_path():
    """`path_prefix: /` is one route for everything (validation treats it as overlapping every other
    prefix route); the lookup walked /a/b, /a and stopped before "/", so it matched only "/" itself."""
    text = GOOD.replace("match: {model: m}", "match: {path_prefix: /}")
    policy = parse_policy(text)
    for path in ("/", "/v2", "/v2/models/m/infer", "/inference.GRPCInferenceService/ModelInfer", "/a/b/"):
        assert policy.match("POST", path).name == "r", path
    assert policy.match("GET", "/v2/health/ready").name == "r"


def test_compiled_policy_is_immutable_and_reweightable():
    policy = load_policy(EXAMPLE)
    with pytest.raises(AttributeError):
        policy.routes[0].salt = "x"  # type: ignore[misc]
    moved = policy.with_weights({"tabular": {"control": 75, "canary": 25}})
    assert [v.weight for v in moved.by_name["tabular"].variants] == [75, 25]
    assert [v.weight for v in policy.by_name["tabular"].variants] == [90, 10]
    off = policy.with_weights({"tabular": {"control": 100, "canary": 0}}, disabled={"tabular": ["canary"]})
    assert not off.by_name["tabular"].variants[1].enabled
    assert off.by_name["ae-scoring"] is policy.by_name["ae-scoring"]


def test_unreadable_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert info.value.problems[0].startswith(f"{tmp_path / 'absent.yaml'}:1:1: cannot read the file")


_MATCHES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["a", "b", "a-b"]),
        "path_prefix": st.sampled_from(["/v2", "/v2/models/a", "/v2/models/b/infer", "/x"]),
        "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2, unique=True),
    },
).filter(lambda m: "model" in m or "path_prefix" in m)


@given(st.lists(_MATCHES, min_size=2, max_size=8))
def test_overlap_pruning_finds_every_pair_the_full_comparison_finds(matches):
    routes = [RouteModel.model_validate({
        "name": f"r{i}", "match": m,
        "variants": [{"name": "control", "weight": 100, "backends": [{"url": "http://127.0.0.1:1", "region": "eu"}]}],
    }) for i, m in enumerate(matches)]
    every = {(i, j) for i in range(len(routes)) for j in range(i) if _overlap(routes[i], routes[j])}
    pruned = {(i, j) for i, j in _overlap_candidates(routes) if _overlap(routes[i], routes[j])}
    assert pruned == every


def test_the_cyclic_collector_is_back_on_after_a_parse_good_or_bad():
    import gc

    assert gc.isenabled()
    load_policy(EXAMPLE)
    assert gc.isenabled()
    with pytest.raises(PolicyError):
        parse_policy("routes: [oops\n")
    assert gc.isenabled()
