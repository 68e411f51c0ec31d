"""Fixtures for the sidecar tests: the demo models built once per session, tiny graphs, clients."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from sidecar.demo_models import build_models
from sidecar.report import ReportSink
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar import sidecar_helpers as helpers


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (three tabular classifiers and mlp-4x512) plus the tiny test graphs."""
    out = tmp_path_factory.mktemp("models")
    build_models(out)
    helpers.dtypes_model(out / "dtypes.onnx")
    helpers.fixed_batch_model(out / "fixed.onnx")
    helpers.lying_batch_model(out / "lying.onnx")
    helpers.string_model(out / "strings.onnx")
    return out


@pytest.fixture
def control_model(models: Path) -> str:
    return str(models / "tabular-control.onnx")


SidecarClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client, models: Path) -> SidecarClient:
    """``await make_client(model="tabular-control", **config)``: a started sidecar, model ready."""

    async def make(model: str = "tabular-control", report_sink: ReportSink | None = None, **overrides) -> TestClient:
        overrides.setdefault("intra_op_threads", 1)
        config = SidecarConfig(model_path=str(models / f"{model}.onnx"), **overrides)
        app = build_app(config, report_sink=report_sink)
        client = await aiohttp_client(app)
        await app[SIDECAR].wait_ready()
        return client

    return make
