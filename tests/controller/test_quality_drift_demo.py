"""Planted input drift (issue 20): `cohortgate traffic --drift feature=N[,after=S][,by=F][,variant=V]`
shifts one feature of what it sends, and that drift, served by real sidecars that sketch it and
report to a real controller API, rolls the canary back."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cohortgate.cli.traffic import Drift, bodies, drifted_bodies, parse_drift
from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from sidecar.report import HttpSink
from tests.controller.quality_sim import quality_policy

TOKEN = "test-admin-token"
TIMEOUT_S = 60.0  # generous: a busy 2-core CI box


def rows_of(payloads: list[bytes]) -> np.ndarray:
    out = []
    for raw in payloads:
        tensor = json.loads(raw)["inputs"][0]
        out.append(np.asarray(tensor["data"], dtype=float).reshape(tensor["shape"]))
    return np.concatenate(out)


def test_parse_drift() -> None:
    assert parse_drift("feature=3") == Drift(3)
    assert parse_drift("feature=0,after=30s,by=2,variant=canary") == Drift(0, 30.0, 2.0, "canary")
    assert parse_drift("feature=0,after=2m") == Drift(0, 120.0)
    for bad, says in (
        ("after=5", "needs feature=N"),
        ("feature=x", "feature=x"),
        ("feature=1,speed=3", "speed=3"),
        ("feature=-1", "not negative"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_drift(bad)


def test_drift_applies_after_its_start_and_to_its_variant_only() -> None:
    d = Drift(0, after_s=10.0, variant="canary")
    assert not d.applies(9.9, "canary")
    assert d.applies(10.0, "canary")
    assert not d.applies(60.0, "control") and not d.applies(60.0, None)  # not yet answered: not its user
    assert Drift(0).applies(0.0, None)


def test_the_flag_shifts_one_feature_of_the_distribution() -> None:
    """Same rows, same jitter: feature N times F, every other feature untouched."""
    plain, moved = rows_of(bodies(7)), rows_of(drifted_bodies(7, Drift(2, by=1.5)))
    assert plain.shape == moved.shape and plain.shape[1] == 30
    np.testing.assert_allclose(moved[:, 2], plain[:, 2] * 1.5, rtol=1e-12)
    np.testing.assert_array_equal(np.delete(moved, 2, axis=1), np.delete(plain, 2, axis=1))
    assert moved[:, 2].mean() > plain[:, 2].max()  # the whole distribution moved past the old one
    with pytest.raises(ValueError, match="30 features"):
        drifted_bodies(7, Drift(30))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sidecar.demo_models import build_models

    out = tmp_path_factory.mktemp("models")
    build_models(out)
    return out


@pytest.fixture(scope="module")
def profiled_contract(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Path:
    """`cohortgate models profile` on the data the demo models were trained on (the documented way)."""
    from sklearn.datasets import load_breast_cancer

    out = tmp_path_factory.mktemp("contract")
    d = load_breast_cancer()
    csv = out / "reference.csv"
    np.savetxt(csv, d.data, delimiter=",", header=",".join(d.feature_names), comments="")
    contract = out / "tabular.contract.json"
    cli = [sys.executable, "-m", "cohortgate.cli", "models", "profile", str(models / "tabular-control.onnx")]
    subprocess.run([*cli, "--data", str(csv), "--out", str(contract)], check=True, timeout=120)
    return contract


async def test_a_planted_drift_through_real_sidecars_rolls_the_canary_back(
    aiohttp_server, aiohttp_client, profiled_contract: Path, tmp_path: Path, models: Path
) -> None:
    """Control's sidecar is sent the traffic command's rows, the canary's sidecar the same rows with
    `--drift feature=0,by=1.5`; both sketch what they serve and POST their windows to the controller's
    /reports/quality; the controller's next look rolls the canary back for input drift."""
    from sidecar.server import SIDECAR, SidecarConfig, build_app

    sink = InProcessSink()
    await sink.start()
    controller = Controller(quality_policy(quality="{min_samples: 200}"), InProcessState(), sink)
    await controller.start()
    api = await aiohttp_server(make_app(controller, TOKEN, sink))
    token = tmp_path / "token"
    token.write_text(TOKEN)

    async def sidecar(variant: str):
        config = SidecarConfig(
            model_path=str(models / "tabular-control.onnx"),
            intra_op_threads=1,
            contract=str(profiled_contract),
            variant=variant,
            route="tabular",
            quality_interval_s=0.2,
        )
        app = build_app(config, report_sink=HttpSink(f"http://127.0.0.1:{api.port}/reports", token_file=str(token)))
        client = await aiohttp_client(app)
        await app[SIDECAR].wait_ready()
        return client

    control, canary = await sidecar("control"), await sidecar("canary")
    plain, moved = bodies(1), drifted_bodies(1, parse_drift("feature=0,by=1.5,variant=canary"))
    monitor = controller.quality
    rq = monitor.routes["tabular"]

    async def send(client, payloads: list[bytes], n: int) -> None:
        for i in range(n):
            resp = await client.post("/v2/models/tabular-control/infer", data=payloads[i % len(payloads)])
            assert resp.status == 200

    async def until(predicate) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    await send(control, plain, 220)  # control's first windows: its reference
    await until(lambda: rq.baseline is not None)
    await send(control, plain, 260)
    await send(canary, moved, 260)

    def rows(variant: str) -> int:
        current = rq.windows[variant].current(time.time() - controller.config.window_s)
        return 0 if current is None else current.rows

    await until(lambda: rows("control") >= 250 and rows("canary") >= 250)
    await controller.tick()
    state = controller.states["tabular"].variants["canary"]
    assert state.phase.value == "rolled_back"
    (record,) = [r for r in await controller.store.audit("tabular") if r["action"] == "rollback"]
    assert "inputs drift against control" in record["reason"]
    assert "mean radius" in record["evidence"]["quality"]["drifted"]  # feature 0 of the breast-cancer rows
    assert monitor.rejected == 0
