"""A test dependency that is missing: a skip on a laptop, a failure in CI.

A skip turns a broken CI install green (no redis-server, no Chromium: every test that needed it
"passes"). Under ``CI=true`` (what GitHub Actions, GitLab and most runners set) the same gap fails.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str) -> NoReturn:
    """Skip, or fail when ``CI`` is set."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so a missing test dependency fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def import_or_missing(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"cannot import {name!r}: {exc}")
