"""The demo models need the `demo` extra; without it the answer says which package to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sidecar.demo_models import build_models
from sidecar.errors import ModelLoadError


def test_without_scikit_learn_the_demo_build_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError, as if not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'cohortgate\[demo\]'"):
        build_models(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built
