"""One name, one home: the names processes share are spelled only in `cohortgate.core.contract`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cohortgate.core import contract

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cohortgate", "gateway", "sidecar")
# Literals that would be a second spelling of a contract name (docstrings and comments excluded).
SPELLINGS = re.compile(r"""["'](x-cohortgate-|\{cohortgate\}:|COHORTGATE_[A-Z_]+["'])""")


def _code_lines(path: Path):
    in_doc = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_doc or stripped.startswith('"""'):
            in_doc = (in_doc ^ (quotes % 2 == 1)) if quotes else in_doc
            continue
        yield number, line.split("#", 1)[0]


def test_no_module_but_the_contract_spells_a_shared_name() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "cohortgate" / "core" / "contract.py":
                continue
            for number, code in _code_lines(path):
                if SPELLINGS.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {code.strip()}")
    assert offenders == []


def test_the_contract_names_are_the_documented_ones() -> None:
    # Pinned here independently: changing one is a breaking change for running deployments.
    assert contract.HEADER_CLUSTER == "x-cohortgate-cluster"
    assert tuple(f"x-cohortgate-shadow-{i}" for i in range(4)) == contract.HEADER_SHADOWS
    assert contract.MIRROR_SLOTS == 4
    assert contract.STATE_KEY == "{cohortgate}:state"
    assert contract.EVENTS_STREAM == "{cohortgate}:events"
    assert contract.UNIT_SALT_ENV == "COHORTGATE_UNIT_SALT"
    assert contract.ACCESS_LOG_HEADERS[:2] == ("x-cohortgate-route", "x-cohortgate-variant")


@pytest.mark.parametrize(
    ("route", "owner", "index", "name"),
    [("tabular", "control", 0, "cg.tabular.control.0"), ("ae-scoring", "shadow-a", 12, "cg.ae-scoring.shadow-a.12")],
)
def test_cluster_names_round_trip(route: str, owner: str, index: int, name: str) -> None:
    assert contract.cluster_name(route, owner, index) == name
    assert contract.cluster_parts(name) == (route, owner)


@pytest.mark.parametrize("other", ["cohortgate_processor", "cg.only.three", "xx.a.b.0", "", "cg.a.b.c.d"])
def test_other_cluster_names_have_no_parts(other: str) -> None:
    assert contract.cluster_parts(other) is None
