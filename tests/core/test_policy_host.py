"""Routes matched by the request authority (`match.host`), the way KServe routes gRPC: a gRPC client's
model name is in the protobuf body, so the path (/inference.GRPCInferenceService/ModelInfer) cannot
tell two models apart; the authority can."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.core.decide import Facts, decide
from cohortgate.core.errors import Denial, PolicyError
from cohortgate.core.policy import _route_accepts, parse_policy

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def policy_with(*routes: str):
    head = "version: 1\njwt: {issuer: iss, audience: aud, jwks: jwks.json, required: false}\nroutes:\n"
    body = "".join(textwrap.indent(textwrap.dedent(r), "  ") for r in routes)
    return parse_policy(head + body, filename="p.yaml")


def route(name: str, match: str, port: int = 1, protocol: str = "http") -> str:
    return f"""\
    - name: {name}
      match: {match}
      cohorts: {{unit: {{header: x-user}}}}
      residency: {{source: {{header: x-region}}, default_region: eu}}
      variants:
        - name: control
          weight: 100
          backends: [{{url: "http://127.0.0.1:{port}", region: eu, protocol: {protocol}}}]
    """


def problems(*routes: str) -> str:
    with pytest.raises(PolicyError) as info:
        policy_with(*routes)
    return "\n".join(info.value.problems)


def test_host_routes_tell_grpc_models_apart() -> None:
    policy = policy_with(
        route("tabular-grpc", "{host: tabular.models.example.com}", 1, "grpc"),
        route("images-grpc", "{host: images.models.example.com}", 2, "grpc"),
    )
    assert policy.match("POST", GRPC_INFER, "tabular.models.example.com").name == "tabular-grpc"
    assert policy.match("POST", GRPC_INFER, "images.models.example.com:8443").name == "images-grpc"  # any port
    assert policy.match("POST", GRPC_INFER, "Tabular.Models.Example.com").name == "tabular-grpc"  # case-blind
    assert policy.match("POST", GRPC_INFER, "other.models.example.com") is None
    assert policy.match("POST", GRPC_INFER, "tabular.models.example.com.evil") is None
    assert policy.match("POST", GRPC_INFER, "tabular.models.example.comx:1") is None
    assert policy.match("POST", GRPC_INFER, None) is None  # no authority: a host route never matches
    assert policy.by_name["tabular-grpc"].variants[0].backends[0].protocol == "grpc"


def test_a_host_with_a_port_matches_that_port_only() -> None:
    policy = policy_with(route("r", "{host: 'm.example.com:8443'}"))
    assert policy.match("POST", GRPC_INFER, "m.example.com:8443").name == "r"
    assert policy.match("POST", GRPC_INFER, "m.example.com") is None
    assert policy.match("POST", GRPC_INFER, "m.example.com:9443") is None


def test_host_and_path_together_let_grpc_and_rest_share_a_model() -> None:
    policy = policy_with(
        route("tabular", "{model: tabular}"),
        route("tabular-grpc", "{host: tabular.models.example.com, path_prefix: /inference.GRPCInferenceService}", 2),
    )
    host = "tabular.models.example.com"
    assert policy.match("POST", "/v2/models/tabular/infer", host).name == "tabular"
    assert policy.match("POST", GRPC_INFER, host).name == "tabular-grpc"
    assert policy.match("POST", GRPC_INFER, "elsewhere") is None


def test_overlapping_host_routes_are_refused() -> None:
    same = problems(route("a", "{host: m.example.com}"), route("b", "{host: 'm.example.com:443'}", 2))
    assert "overlap" in same
    # a host-only route takes every path of its host, so a route without a host overlaps it
    assert "overlap" in problems(route("a", "{host: m.example.com}"), route("b", "{model: m}", 2))
    # different hosts never overlap, whatever the paths
    policy_with(route("a", "{host: a.example.com, model: m}"), route("b", "{host: b.example.com, model: m}", 2))


@pytest.mark.parametrize("bad", ["M.example.com", "m.example.com/x", "-m.example.com", "m example", "m.example.com:"])
def test_host_must_be_a_lower_case_name(bad: str) -> None:
    assert "host" in problems(route("r", f"{{host: '{bad}'}}"))


def test_decide_reads_the_authority_only_when_a_route_names_a_host() -> None:
    policy = policy_with(route("g", "{host: g.example.com}"))
    allowed = decide(policy, Facts("POST", GRPC_INFER, {":authority": "g.example.com", "x-user": "u"}))
    assert allowed.denial is None and allowed.route == "g"
    denied = decide(policy, Facts("POST", GRPC_INFER, {":authority": "h.example.com", "x-user": "u"}))
    assert denied.denial is Denial.NO_ROUTE
    plain = policy_with(route("m", "{model: m}"))
    assert not plain.by_host
    assert decide(plain, Facts("POST", "/v2/models/m/infer", {":authority": "any", "x-user": "u"})).route == "m"


HOSTS = ["a.example.com", "b.example.com", "a.example.com:443"]
MATCHES = st.fixed_dictionaries(
    {"host": st.sampled_from(HOSTS)},
    optional={
        "model": st.sampled_from(["m", "n"]),
        "path_prefix": st.sampled_from(["/inference.GRPCInferenceService", "/v2/models/m", "/v2"]),
    },
)


@given(
    st.lists(MATCHES, min_size=1, max_size=5),
    st.sampled_from(
        [GRPC_INFER, "/v2/models/m/infer", "/v2/models/n/infer", "/v2", "/other", "/inference.GRPCInferenceService"]
    ),
    st.sampled_from([None, "a.example.com", "A.example.com:443", "a.example.com:80", "b.example.com:1", "c"]),
)
def test_match_is_the_one_route_that_accepts(matches, path: str, authority: str | None) -> None:
    """Whatever the index finds is the route (of an accepted policy) whose own rule accepts the
    request, and nothing is found when no route accepts it."""
    routes = [
        route(f"r{i}", "{" + ", ".join(f"{k}: '{v}'" for k, v in m.items()) + "}", i + 1) for i, m in enumerate(matches)
    ]
    try:
        policy = policy_with(*routes)
    except PolicyError:
        return  # overlapping routes are refused; nothing to route
    host = authority.lower() if authority else None
    accepting = [r.name for r in policy.routes if _route_accepts(r, "POST", path, host)]
    found = policy.match("POST", path, authority)
    assert len(accepting) <= 1
    assert (found.name if found is not None else None) == (accepting[0] if accepting else None)
