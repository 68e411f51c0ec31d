"""`up`'s effective policy is JSON under a comment header (issue 29): the gateway and the controller
read it with the json module on every edit, and it must mean what the source means, URLs and paths
rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cohortgate.core.policy import parse_policy, parse_policy_data
from cohortgate.local.livepolicy import effective_text
from cohortgate.local.plan import StackError, effective_policy_data

SOURCE = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: keys/jwks.json}
routes:
  - name: r
    match: {model: m}
    variants:
      - name: control
        weight: 90
        backends: [{url: "http://localhost:8101", region: eu}]
      - name: canary
        weight: 10
        backends: [{url: "https://models.example.com", region: eu}]
"""


def test_the_effective_policy_is_json_with_the_rewrites_and_parses_like_the_source(tmp_path: Path) -> None:
    source = tmp_path / "policy.yaml"
    source.write_text(SOURCE)
    source_policy, data = parse_policy_data(source.read_bytes(), str(source), tmp_path)
    urls = {"http://localhost:8101": "http://127.0.0.1:43123"}
    text = effective_text(data, source, urls)
    head, _, body = text.partition("\n{")
    assert all(line.startswith("# ") for line in head.splitlines())  # a header, then one JSON document
    assert json.loads("{" + body) == effective_policy_data(yaml.safe_load(SOURCE), tmp_path, urls)
    effective = parse_policy(text.encode(), "state/policy.yaml", tmp_path / "state")
    assert effective.jwt.jwks == str(tmp_path / "keys" / "jwks.json")
    ports = [b.port for r in effective.routes for v in r.variants for b in v.backends]
    assert ports == [43123, 443]
    assert [r.name for r in effective.routes] == [r.name for r in source_policy.routes]
    assert data == yaml.safe_load(SOURCE)  # the source's data were not modified


def test_a_source_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="is not a mapping"):
        effective_text(["not", "a", "mapping"], tmp_path / "policy.yaml", {})
