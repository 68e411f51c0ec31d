"""Missing test dependencies fail under CI instead of skipping (the skips that could hide a broken install)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import needs
from tests.controller import conftest as redis_conftest


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_dependency_fails_only_under_ci(monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        needs.missing("no such thing")
    with pytest.raises(outcome):
        needs.import_or_missing("no_such_module_cohortgate_test")
    assert needs.import_or_missing("json").dumps([]) == "[]"


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("false", pytest.skip.Exception)])
def test_redis_fixture_without_redis_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str, outcome: type
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(redis_conftest, "REDIS_SERVER", None)
    with pytest.raises(outcome, match="redis-server is not installed"):
        redis_conftest.RedisServer(tmp_path)
