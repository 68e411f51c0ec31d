"""A data contract in the policy (issue 20): ``contract:`` beside a backend's ``model:``, a file or the
contract inline; validated with line and column; `cohortgate up` hands it to the sidecar
(``--contract``), which enforces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import load_policy
from cohortgate.local.plan import sidecar_specs
from cohortgate.local.recipes import sidecar_recipe
from tests.local.test_recipes import layout
from tests.sidecar.test_contract_sidecar import body, clean, contract_doc

HEAD = """version: 1
jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}
routes:
  - name: scoring
    match: {model: tabular-control}
    variants:
      - name: control
        weight: 100
        backends:
          - url: http://127.0.0.1:18201
            region: eu
            model: models/tabular-control.onnx
"""


def write(tmp_path: Path, contract_yaml: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + contract_yaml)
    return path


def sidecar_argv(policy_path: Path) -> tuple[str, ...]:
    (spec,) = sidecar_specs(load_policy(policy_path))
    return sidecar_recipe(spec, 18201, layout()).argv


def test_a_contract_file_is_resolved_beside_the_policy_and_passed_to_the_sidecar(tmp_path: Path) -> None:
    argv = sidecar_argv(write(tmp_path, "            contract: contracts/control.json\n"))
    i = argv.index("--contract")
    assert argv[i + 1] == str(tmp_path / "contracts" / "control.json")


def test_an_inline_contract_is_passed_as_json(tmp_path: Path) -> None:
    inline = """            contract:
              mode: enforce
              inputs:
                - {name: radius, tensor: input, column: 0, type: int, min: 5, max: 30}
"""
    argv = sidecar_argv(write(tmp_path, inline))
    doc = json.loads(argv[argv.index("--contract") + 1])
    assert doc["mode"] == "enforce"
    assert doc["inputs"][0] == {
        "name": "radius",
        "tensor": "input",
        "column": 0,
        "type": "int",
        "min": 5.0,
        "max": 30.0,
        "nullable": False,
    }


def test_no_contract_no_flag(tmp_path: Path) -> None:
    assert "--contract" not in sidecar_argv(write(tmp_path, ""))


@pytest.mark.parametrize(
    ("contract_yaml", "where", "says"),
    [
        (  # the error points at the bad value inside the inline contract, not at `contract:`
            "            contract:\n              inputs:\n                - {name: x, tensor: input, type: floaty}\n",
            ":15:50:",  # the value `floaty`
            "contract.inputs.0.type: Input should be 'float', 'int', 'bool' or 'category'",
        ),
        (
            "            contract: {mode: strict}\n",
            ":13:30:",  # `strict`
            "contract.mode: Input should be 'observe' or 'enforce'",
        ),
        (
            "            contract: {inputs: [{name: x, type: category}]}\n",
            ":13:33:",  # the feature's mapping
            "a category needs its `allowed` values",
        ),
    ],
)
def test_a_bad_inline_contract_is_named_with_line_and_column(
    tmp_path: Path, contract_yaml: str, where: str, says: str
) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, contract_yaml))
    (problem,) = info.value.problems
    assert where in problem and says in problem, problem


def test_a_contract_needs_a_model(tmp_path: Path) -> None:
    text = HEAD.replace("            model: models/tabular-control.onnx\n", "") + "            contract: c.json\n"
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=r"policy.yaml:10:\d+: .*`contract` is checked by the sidecar"):
        load_policy(path)


async def test_the_sidecar_enforces_a_contract_passed_inline(make_client) -> None:
    """What `cohortgate up` passes for an inline contract: the JSON itself as --contract."""
    client = await make_client(contract=json.dumps(contract_doc("enforce")))
    assert (await client.post("/v2/models/tabular-control/infer", data=body(clean()))).status == 200
    bad = clean()
    bad[0, 4] = -7.0
    refused = await client.post("/v2/models/tabular-control/infer", data=body(bad))
    assert refused.status == 422 and (await refused.json())["feature"] == "f4"
