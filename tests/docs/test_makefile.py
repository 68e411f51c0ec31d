"""The Makefile's set-up promises, checked with make's own dry run in a copy of the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(workdir: Path, *targets: str) -> str:
    """What make would run, with the Makefile's own defaults: variables from an outer make's command
    line (``make test-stress STRESS_RUNS=1`` running this suite) reach us through MAKEFLAGS, or from
    the environment (``STRESS_RUNS=1 make test-stress``)."""
    outer = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "STRESS_RUNS", "STRESS_HOGS")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    out = subprocess.run(["make", "-n", *targets], cwd=workdir, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").touch()
    return tmp_path


def test_make_demo_reinstalls_only_when_pyproject_changed(checkout: Path):
    assert "pip install" in dry_run(checkout, "demo")  # never installed: install
    stamp = checkout / ".venv" / ".installed-cpu"
    stamp.touch()
    later = time.time() + 5
    os.utime(stamp, (later, later))
    plan = dry_run(checkout, "demo")
    assert "pip install" not in plan and "cohortgate up --demo" in plan  # nothing changed: straight to up
    newer = later + 5
    os.utime(checkout / "pyproject.toml", (newer, newer))  # a dependency edit
    assert "pip install" in dry_run(checkout, "demo")


def test_system_deps_waits_for_another_apt(checkout: Path):
    plan = dry_run(checkout, "system-deps")
    assert "DPkg::Lock::Timeout=600" in plan and "until " in plan and "apt is busy" in plan


def test_stress_runs_the_suite_three_times_beside_hogs(checkout: Path):
    plan = dry_run(checkout, "test-stress")
    assert "seq 3" in plan and "seq 2" in plan and "while True: pass" in plan and "-m tests.halves" in plan
    assert "trap 'kill $hogs" in plan  # the hogs die with the run, passed or failed
