"""Block-style YAML policies read route by route (issue 29: a one-route edit of a 1 000-route policy).

`_chunked_model` splits the ``routes:`` list at its items and reads, validates and checks only the
items whose lines changed. It must mean exactly what the whole-document reader means (same policy,
same data), hand anything it is not sure of to that reader, and never change an error message.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cohortgate.core import policy as policy_module
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import parse_policy_data

ROOT = Path(__file__).resolve().parents[2]

HEAD = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
"""


def route(name: str, url: str = "http://127.0.0.1:1", indent: int = 2) -> str:
    text = f"""\
- name: {name}
  match: {{model: {name}}}
  variants:
    - {{name: control, weight: 90, backends: [{{url: "{url}", region: eu}}]}}
    - name: canary
      weight: 10
      backends:
        - {{url: "{url}", region: eu}}
"""
    return textwrap.indent(text, " " * indent)


def whole(text: str, base: Path = Path("/srv")) -> tuple:
    """What the whole-document reader (with positions) makes of ``text``."""
    saved = policy_module._chunked_model
    policy_module._chunked_model = lambda *_: None
    try:
        return parse_policy_data(text, "p.yaml", base)
    finally:
        policy_module._chunked_model = saved


def chunked(text: str):
    return policy_module._chunked_model(text, "p.yaml")


SHAPES = {
    "plain": HEAD + "routes:\n" + route("a") + route("b"),
    "items at column 0": HEAD + "routes:\n" + route("a", indent=0) + route("b", indent=0),
    "items at column 4": HEAD + "routes:   # the list\n" + route("a", indent=4) + route("b", indent=4),
    "comments and blank lines between items": HEAD
    + "routes:\n\n# first\n"
    + route("a")
    + "\n  # second, indented\n\n"
    + route("b")
    + "# trailing\n",
    "routes before another key": "routes:\n" + route("a") + route("b") + HEAD + "response_headers: false\n",
    "a block scalar with a dash line and a hash line inside": HEAD
    + "routes:\n"
    + route("a").replace(
        "    match:", "    cohorts:\n      salt: |\n        - not an item\n        # not a comment\n    match:", 1
    )
    + route("b"),
    "CRLF line ends": (HEAD + "routes:\n" + route("a") + route("b")).replace("\n", "\r\n"),
    "a dash alone starts an item": HEAD + "routes:\n  -\n" + route("a").replace("  - name", "    name", 1) + route("b"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_route_by_route_reader_means_what_the_whole_document_reader_means(shape: str) -> None:
    text = SHAPES[shape]
    found = chunked(text)
    assert found is not None, "this shape should take the fast path"
    policy, data = parse_policy_data(text, "p.yaml", Path("/srv"))
    assert (policy, data) == whole(text)


@pytest.mark.parametrize("name", ["example.yaml", "bandit.yaml", "quality.yaml"])
def test_the_projects_policies_read_the_same_both_ways(name: str) -> None:
    source = ROOT / "policies" / name
    text = source.read_text()
    assert chunked(text) is not None
    assert parse_policy_data(text, "p.yaml", source.parent) == whole(text, source.parent)


@pytest.mark.parametrize(
    "text",
    [
        HEAD + "routes:\n" + route("a").replace("region: eu", "region: &r eu", 1) + route("b"),  # an anchor
        HEAD + "routes: [" + "]\n",  # a flow list
        HEAD + "routes:\n" + route("a") + "routes:\n" + route("b"),  # the key twice
        "---\n" + HEAD + "routes:\n" + route("a"),  # a document marker
        HEAD + "routes:\n" + route("a", indent=4) + route("b", indent=2),  # items at two indents
        HEAD + "routes:\n  name: a\n",  # not a list
        HEAD + "routes:\n" + route("a").replace("region: eu}", "region: !!str eu}", 1),  # a tag
        HEAD + "routes:\n" + route("a") + "  - *first\n",  # an alias
        HEAD + "routes:\n" + route("a") + "...\n",  # a document end
    ],
    ids=["anchor", "flow", "twice", "marker", "two indents", "mapping", "tag", "alias", "document end"],
)
def test_what_the_reader_is_not_sure_of_goes_to_the_whole_document_reader(text: str) -> None:
    assert chunked(text) is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.replace("weight: 10", "weight: 20"),  # weights sum to 110: a cross-field check
        lambda r: r.replace("region: eu}", "region: eu, colour: red}", 1),  # an unknown field
        lambda r: r.replace('url: "http://127.0.0.1:1"', 'url: "ftp://x"', 1),  # a URL check
        lambda r: r.replace("name: b", "name: a", 1),  # two routes named a
    ],
    ids=["weights", "unknown field", "url", "duplicate name"],
)
def test_a_mistake_is_reported_exactly_as_before_even_after_the_route_was_cached(edit) -> None:
    good = HEAD + "routes:\n" + route("a") + route("b")
    parse_policy_data(good, "p.yaml", Path("/srv"))  # both routes now cached as clean
    bad = HEAD + "routes:\n" + route("a") + edit(route("b"))
    with pytest.raises(PolicyError) as fast:
        parse_policy_data(bad, "p.yaml", Path("/srv"))
    with pytest.raises(PolicyError) as slow:
        whole(bad)
    assert fast.value.problems == slow.value.problems and fast.value.problems


def test_an_unchanged_route_is_neither_read_nor_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = [route(f"r{i}") for i in range(50)]
    parse_policy_data(HEAD + "routes:\n" + "".join(routes), "p.yaml", Path("/srv"))
    validated: list[object] = []
    real = policy_module.RouteModel.model_validate
    monkeypatch.setattr(
        policy_module.RouteModel, "model_validate", lambda data, **kw: validated.append(data) or real(data, **kw)
    )
    routes[7] = route("r7", url="http://127.0.0.1:2")
    policy, _ = parse_policy_data(HEAD + "routes:\n" + "".join(routes), "p.yaml", Path("/srv"))
    assert [d["name"] for d in validated] == ["r7"]  # type: ignore[index]
    assert policy.routes[7].variants[0].backends[0].url == "http://127.0.0.1:2"
