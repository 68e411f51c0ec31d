"""tests/mutants.py: each mutant still finds its code exactly as often as it expects (else the
mutation check would silently test nothing), and a moved pattern is reported, not skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutants import MUTANTS, ROOT, Mutant, PatternGone


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_to_the_current_code(mutant: Mutant) -> None:
    original = (ROOT / mutant.path).read_text()
    mutated = mutant.apply(original)
    assert mutated != original
    for arg in mutant.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).is_file(), arg


def test_a_pattern_that_moved_fails_loudly(tmp_path: Path) -> None:
    m = Mutant("m", "f.py", r"x = 1$", "x = 2", ("tests/x.py",), "why", count=2)
    assert m.apply("x = 1\nx = 1\n") == "x = 2\nx = 2\n"
    with pytest.raises(PatternGone, match="matches 1 time"):
        m.apply("x = 1\ny = 1\n")
