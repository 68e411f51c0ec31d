"""`cohortgate up`'s plan, without processes: which sidecars, on which ports, and the effective policy."""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.core.policy import load_policy, parse_policy
from cohortgate.local.plan import (
    StackError,
    canary_variants,
    choose_port,
    effective_policy_data,
    oip_model_name,
    sidecar_specs,
    url_key,
)
from tests.strategies import residency_policies

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "example.yaml"


def policy_of(text: str, base: Path = Path("/srv/policies")):
    return parse_policy(textwrap.dedent(text), filename="p.yaml", base_dir=base)


# ------------------------------------------------------------------------------ sidecar specs


def test_example_policy_needs_eight_sidecars_named_after_route_variant_and_region():
    specs = sidecar_specs(load_policy(EXAMPLE))
    got = {(s.name, s.port, s.model_name, s.variant, s.shadow, Path(s.model_path).name) for s in specs}
    assert got == {
        ("sidecar-tabular-control-eu", 18101, "tabular", "control", False, "tabular-control.onnx"),
        ("sidecar-tabular-control-ae", 18102, "tabular", "control", False, "tabular-control.onnx"),
        ("sidecar-tabular-canary-eu", 18103, "tabular", "canary", False, "tabular-canary.onnx"),
        ("sidecar-tabular-challenger-eu", 18104, "tabular", "challenger", True, "tabular-challenger.onnx"),
        # the OIP name comes from the route's /v2/models/NAME path_prefix
        ("sidecar-ae-scoring-control-ae", 18105, "ae-scoring", "control", False, "tabular-control.onnx"),
        # the outcome experiment; the outcomes route's backend is the controller, not a sidecar
        ("sidecar-shop-control-eu", 18106, "shop", "control", False, "tabular-control.onnx"),
        ("sidecar-shop-big-images-eu", 18107, "shop", "big-images", False, "tabular-canary.onnx"),
        ("sidecar-shop-small-images-eu", 18108, "shop", "small-images", False, "tabular-challenger.onnx"),
    }
    assert all(Path(s.model_path).is_absolute() and s.model_path.startswith(str(ROOT)) for s in specs)
    assert all(s.fault_rate == 0 for s in specs)


def test_the_canary_knob_reaches_only_the_rollout_variant():
    policy = load_policy(EXAMPLE)
    assert canary_variants(policy) == {("tabular", "canary")}  # not shop's: it is judged on conversion
    rates = dict.fromkeys(canary_variants(policy), 0.3)
    faulty = {s.name: s.fault_rate for s in sidecar_specs(policy, fault_rates=rates) if s.fault_rate}
    assert faulty == {"sidecar-tabular-canary-eu": 0.3}


TWO_ROUTES = """\
version: 1
jwt: {issuer: i, audience: a, jwks: jwks.json}
routes:
  - name: a
    match: {model: a}
    variants:
      - name: control
        weight: 50
        backends:
          - {url: "http://127.0.0.1:9001", region: eu, model: m.onnx}
          - {url: "http://10.0.0.7:9002", region: ae}
      - name: v1
        weight: 50
        backends: [{url: "http://127.0.0.1:9001/", region: eu, model: m.onnx}]
"""


def test_backends_without_a_model_are_external_and_one_url_is_one_sidecar():
    text = TWO_ROUTES.replace("http://127.0.0.1:9001/", "http://127.0.0.1:9003")
    specs = sidecar_specs(policy_of(text))
    assert [(s.port, s.variant) for s in specs] == [(9001, "control"), (9003, "v1")]
    assert specs[0].model_path == "/srv/policies/m.onnx"


def test_one_url_asked_to_serve_two_variants_is_refused():
    with pytest.raises(StackError, match=r"already serves 'a' \(control"):
        sidecar_specs(policy_of(TWO_ROUTES))


def test_one_url_shared_by_two_backends_of_one_variant_is_one_sidecar():
    text = (
        TWO_ROUTES.replace("weight: 50", "weight: 100", 1)
        .replace(
            """      - name: v1
        weight: 50
        backends: [{url: "http://127.0.0.1:9001/", region: eu, model: m.onnx}]
""",
            "",
        )
        .replace(
            '{url: "http://10.0.0.7:9002", region: ae}', '{url: "http://127.0.0.1:9001/", region: ae, model: m.onnx}'
        )
    )
    specs = sidecar_specs(policy_of(text))
    assert [(s.port, s.region) for s in specs] == [(9001, "eu")]


@pytest.mark.parametrize("url", ["http://10.1.2.3:9001", "https://127.0.0.1:9001"])
def test_a_local_model_must_sit_on_a_loopback_http_url(url: str):
    text = TWO_ROUTES.replace('"http://127.0.0.1:9001"', f'"{url}"')
    text = text.replace("http://127.0.0.1:9001/", "http://127.0.0.1:9009")
    with pytest.raises(StackError, match=re.escape(f"served on http://127.0.0.1:PORT, not {url}")):
        sidecar_specs(policy_of(text))


def test_a_route_without_an_oip_model_name_cannot_get_a_sidecar():
    text = TWO_ROUTES.replace("match: {model: a}", "match: {path_prefix: /score}")
    text = text.replace("http://127.0.0.1:9001/", "http://127.0.0.1:9009")
    with pytest.raises(StackError, match=re.escape("needs `match.model` or a `/v2/models/NAME` path_prefix")):
        sidecar_specs(policy_of(text))


def test_oip_model_name_prefers_match_model_then_the_path_prefix():
    policy = load_policy(EXAMPLE)
    assert oip_model_name(policy.by_name["tabular"]) == "tabular"
    assert oip_model_name(policy.by_name["ae-scoring"]) == "ae-scoring"


# ------------------------------------------------------------------------------ the effective policy


def test_effective_policy_rewrites_urls_and_makes_paths_absolute_without_touching_the_input():
    data = yaml.safe_load(EXAMPLE.read_text())
    before = copy.deepcopy(data)
    out = effective_policy_data(data, EXAMPLE.parent, {"http://127.0.0.1:18103": "http://127.0.0.1:40003"})
    assert data == before
    assert out["jwt"]["jwks"] == str(ROOT / "certs" / "jwks.json")
    canary = out["routes"][0]["variants"][1]["backends"][0]
    assert canary == {
        "url": "http://127.0.0.1:40003",
        "region": "eu",
        "model": str(ROOT / "models/tabular-canary.onnx"),
    }
    assert out["routes"][0]["variants"][0]["backends"][0]["url"] == "http://127.0.0.1:18101"  # not in the map
    # The result is a valid policy anywhere, since nothing in it is relative any more.
    moved = parse_policy(yaml.safe_dump(out), filename="eff.yaml", base_dir=Path("/elsewhere"))
    original = load_policy(EXAMPLE)
    assert [b.model for b in moved.backends] == [b.model for b in original.backends]
    assert moved.jwt == original.jwt


def test_an_outcomes_routes_backend_becomes_the_controller_up_started():
    data = yaml.safe_load(EXAMPLE.read_text())
    out = effective_policy_data(data, EXAMPLE.parent, {}, outcomes_url="http://127.0.0.1:40480")
    outcomes = next(r for r in out["routes"] if r["name"] == "outcomes")
    assert outcomes["variants"][0]["backends"][0]["url"] == "http://127.0.0.1:40480"  # the policy wrote :9480
    shop = next(r for r in out["routes"] if r["name"] == "shop")  # a model route keeps its sidecar URLs
    assert shop["variants"][0]["backends"][0]["url"] == "http://127.0.0.1:18106"


def test_https_jwks_urls_and_absolute_paths_are_kept():
    data = {
        "jwt": {"jwks": "https://idp.example/jwks.json"},
        "routes": [{"variants": [{"backends": [{"url": "http://127.0.0.1:1", "model": "/abs/m.onnx"}]}]}],
    }
    out = effective_policy_data(data, Path("/base"), {})
    assert out["jwt"]["jwks"] == "https://idp.example/jwks.json"
    assert out["routes"][0]["variants"][0]["backends"][0]["model"] == "/abs/m.onnx"


@settings(max_examples=60, deadline=None)
@given(text=residency_policies(), data=st.data())
def test_any_port_map_gives_the_same_policy_on_the_new_ports(text: str, data: st.DataObject):
    policy = parse_policy(text, filename="p.yaml", base_dir=Path("/p"))
    urls = sorted({b.url for b in policy.backends})
    ports = data.draw(st.lists(st.integers(1024, 65535), min_size=len(urls), max_size=len(urls), unique=True))
    mapping = {u: f"http://127.0.0.1:{p}" for u, p in zip(urls, ports, strict=True)}
    out = effective_policy_data(yaml.safe_load(text), Path("/p"), mapping)
    moved = parse_policy(yaml.safe_dump(out), filename="eff.yaml", base_dir=Path("/p"))
    assert [(b.cluster, b.region, b.port) for b in moved.backends] == [
        (b.cluster, b.region, url_key(mapping[b.url])[2]) for b in policy.backends
    ]
    assert [[(v.name, v.weight) for v in r.variants] for r in moved.routes] == [
        [(v.name, v.weight) for v in r.variants] for r in policy.routes
    ]


# ------------------------------------------------------------------------------ ports


def test_the_usual_port_when_free_else_a_free_one_never_twice():
    free = iter([50001, 50002, 50002, 50003])
    taken: set[int] = set()

    def pick(preferred: int | None, busy: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        return choose_port(preferred, taken=taken, is_free=lambda p: p not in busy, any_free=lambda: next(free))

    assert pick(8443) == 8443
    assert pick(8443) == 50001  # already handed out
    assert pick(9901, busy={9901}) == 50002  # in use by someone else
    assert pick(None) == 50003  # 50002 is taken: asked again
    assert taken == {8443, 50001, 50002, 50003}


def test_url_key_ignores_a_trailing_slash_and_fills_default_ports():
    assert url_key("http://127.0.0.1:1/") == url_key("http://127.0.0.1:1") == ("http", "127.0.0.1", 1)
    assert url_key("https://Model.example") == ("https", "model.example", 443)
