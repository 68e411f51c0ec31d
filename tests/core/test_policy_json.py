"""Policies written as JSON (`cohortgate up`'s effective file) and routes compiled once (issue 29).

A JSON policy is read by the json module (a 1 000-route file ~25x faster than YAML with positions);
it must mean exactly what the same file means as YAML, and any mistake in it must still be reported
at its FILE:LINE:COL. A reload recompiles only the routes it changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cohortgate.core import policy as policy_module
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import parse_policy, parse_policy_data
from cohortgate.core.schema import PolicyModel

ROOT = Path(__file__).resolve().parents[2]
HEADER = "# written by a tool\n# over two lines\n"


def _route(name: str, url: str = "http://127.0.0.1:1") -> dict:
    return {
        "name": name,
        "match": {"model": name},
        "variants": [
            {"name": "control", "weight": 90, "backends": [{"url": url, "region": "eu"}]},
            {"name": "canary", "weight": 10, "backends": [{"url": url, "region": "eu"}]},
        ],
    }


def _doc(*routes: dict) -> dict:
    return {"version": 1, "jwt": {"issuer": "iss", "audience": "aud", "jwks": "jwks.json"}, "routes": list(routes)}


@pytest.mark.parametrize("name", ["example.yaml", "bandit.yaml"])
def test_a_policy_as_json_compiles_to_what_it_compiles_to_as_yaml(name: str) -> None:
    source = ROOT / "policies" / name
    data = yaml.safe_load(source.read_text())
    as_yaml = parse_policy(source.read_bytes(), "p.yaml", source.parent)
    text = HEADER + json.dumps(data, indent=1)
    as_json, read = parse_policy_data(text.encode(), "p.json", source.parent)
    assert read == data
    assert as_json.routes == as_yaml.routes and as_json.jwt == as_yaml.jwt
    assert as_json.response_headers == as_yaml.response_headers
    assert as_json.digest != as_yaml.digest  # the digest names the bytes, as before


def test_parse_policy_data_gives_the_yaml_data_too() -> None:
    text = yaml.safe_dump(_doc(_route("a")))
    policy, data = parse_policy_data(text, "p.yaml")
    assert data == yaml.safe_load(text) and [r.name for r in policy.routes] == ["a"]


def test_a_mistake_in_a_json_policy_is_reported_at_its_position() -> None:
    bad = _doc(_route("a"))
    bad["routes"][0]["variants"][1]["weight"] = 20  # weights sum to 110
    text = HEADER + json.dumps(bad, indent=1)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "eff.yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if '"variants"' in t)
    assert list(info.value.problems) == [f"eff.yaml:{line}:4: variant weights of route 'a' sum to 110, not 100"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"version": 1, "version": 1, "jwt": {}, "routes": []}', "duplicate key"),
        ('{"version": NaN}', ""),
    ],
)
def test_json_that_yaml_would_refuse_is_refused(text: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.json")
    assert all(p.startswith("p.json:") for p in info.value.problems)
    assert words in " ".join(info.value.problems)


def test_a_reload_reuses_the_routes_it_did_not_change(tmp_path: Path) -> None:
    routes = [_route(f"r{i}") for i in range(5)]
    first = parse_policy(json.dumps(_doc(*routes)), "p.json", tmp_path)
    routes[2] = _route("r2", url="http://127.0.0.1:2")
    second = parse_policy(json.dumps(_doc(*routes)), "p.json", tmp_path)
    same = [a is b for a, b in zip(first.routes, second.routes, strict=True)]
    assert same == [True, True, False, True, True]
    assert second.by_name["r2"].variants[0].backends[0].port == 2
    elsewhere = parse_policy(json.dumps(_doc(*routes)), "p.json", tmp_path / "other")
    assert not any(a is b for a, b in zip(second.routes, elsewhere.routes, strict=True))  # paths resolve elsewhere


def test_the_compiled_route_cache_is_bounded(tmp_path: Path) -> None:
    cache = policy_module._CompiledRoutes(size=3)
    model = PolicyModel.model_validate(_doc(*(_route(f"r{i}") for i in range(5))))
    compiled = [cache.route(r, tmp_path) for r in model.routes]
    assert len(cache) == 3
    assert cache.route(model.routes[4], tmp_path) is compiled[4]  # recent: kept
    assert cache.route(model.routes[0], tmp_path) is not compiled[0]  # oldest: compiled again


def _lines(doc: dict) -> str:
    return HEADER + policy_module.route_lines_json(doc).decode() + "\n"


def test_up_s_layout_is_one_route_a_line_and_reads_as_the_whole_document(tmp_path: Path) -> None:
    doc = _doc(*(_route(f"r{i}") for i in range(4)))
    text = _lines(doc)
    body = text[len(HEADER) :]
    assert json.loads(body) == doc
    assert len(body.strip().splitlines()) == 4 + 2  # the head line, a line per route, the closing line
    policy, data = parse_policy_data(text, "eff.json", tmp_path)
    assert data == doc
    assert policy.routes == parse_policy(json.dumps(doc, indent=1), "p.json", tmp_path).routes


def test_a_one_route_edit_in_up_s_layout_reads_only_that_line(tmp_path: Path, monkeypatch) -> None:
    routes = [_route(f"line{i}") for i in range(50)]
    first = parse_policy(_lines(_doc(*routes)), "eff.json", tmp_path)
    read: list[str] = []
    real = policy_module._json_loads
    monkeypatch.setattr(policy_module, "_json_loads", lambda text: read.append(text) or real(text))
    routes[7] = _route("line7", url="http://127.0.0.1:7")
    second = parse_policy(_lines(_doc(*routes)), "eff.json", tmp_path)
    assert len(read) == 2 and '"line7"' in read[1]  # the head, and the edited route; not 50 routes
    assert [a is b for a, b in zip(first.routes, second.routes, strict=True)].count(False) == 1
    assert second.by_name["line7"].variants[0].backends[0].port == 7


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace("},\n{", "}, {", 1),  # two routes on one line
        lambda t: t.replace("},\n{", "}\n{", 1),  # a comma missing between routes
        lambda t: t.replace("}\n]}", "},\n]}"),  # a trailing comma after the last route
        lambda t: t.replace('"routes":[', '"routes":[1,', 1),  # something else on the head line
    ],
)
def test_a_file_not_quite_in_up_s_layout_means_what_the_json_says(tmp_path: Path, mangle) -> None:
    """The line reader takes only its exact layout; anything else is read whole, as JSON or else as
    the YAML every policy file is (YAML's flow lists allow a trailing comma), so a hand-edited
    effective file is never read differently from what it says."""
    text = mangle(_lines(_doc(_route("a"), _route("b"), _route("c"))))
    try:
        expected = json.loads(text[len(HEADER) :])
    except ValueError:
        try:
            expected = yaml.safe_load(text)
        except yaml.YAMLError:
            with pytest.raises(PolicyError):
                parse_policy(text, "eff.json", tmp_path)
            return
    try:
        got = parse_policy_data(text, "eff.json", tmp_path)[1]
    except PolicyError:
        return  # valid JSON that is not a valid policy (a number among the routes): refused
    assert got == expected
