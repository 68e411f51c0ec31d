"""The onnxruntime adapter, the fault knob, the metrics histogram and the config, with real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import InferenceFailed
from sidecar.faults import FaultInjector
from sidecar.metrics import Histogram
from sidecar.model import CPU, CUDA, ModelLoadError, OnnxModel, choose_providers, default_intra_op_threads
from sidecar.server import SidecarConfig


def test_provider_choice() -> None:
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    assert choose_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ModelLoadError, match="no CUDAExecutionProvider"):
        choose_providers("cuda", [CPU])
    with pytest.raises(ModelLoadError, match="--device must be one of"):
        choose_providers("tpu", [CPU])


def test_threads_leave_a_core_for_the_event_loop() -> None:
    assert default_intra_op_threads(1) == 1
    assert default_intra_op_threads(2) == 1
    assert default_intra_op_threads(16) == 15
    assert default_intra_op_threads() >= 1


def test_loads_signature_and_runs(models: Path) -> None:
    model = OnnxModel(models / "tabular-control.onnx", intra_op_threads=1)
    assert model.name == "tabular-control"
    expected = CUDA if CUDA in ort.get_available_providers() else CPU
    assert model.provider == model.providers[0] == expected
    assert [s.describe() for s in model.signature.inputs] == ["input FP32 [-1,30]"]
    assert model.signature.batchable
    label, proba = model.run(model.example_inputs(4))
    assert label.shape == (4,) and proba.shape == (4, 2)
    model.warm_up(64)


def test_a_run_failure_is_translated(models: Path) -> None:
    model = OnnxModel(models / "tabular-control.onnx", intra_op_threads=1)
    with pytest.raises(InferenceFailed, match="onnxruntime failed"):
        model.run((np.zeros((1, 31), np.float32),))


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_requested_without_cuda_is_a_clear_load_error(models: Path) -> None:
    with pytest.raises(ModelLoadError, match="--device cuda"):
        OnnxModel(models / "tabular-control.onnx", device="cuda")


def test_load_errors(models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxModel(garbage)
    with pytest.raises(ModelLoadError, match="does not serve"):
        OnnxModel(models / "strings.onnx")


@pytest.mark.parametrize(("rate", "n", "failures"), [(0.0, 50, 0), (1.0, 7, 7), (0.1, 100, 10), (0.3, 10, 3)])
def test_fault_rate_is_exact(rate: float, n: int, failures: int) -> None:
    faults = FaultInjector(rate)
    assert sum(faults.fail_next() for _ in range(n)) == failures


@given(rate=st.floats(0, 1), n=st.integers(1, 500))
def test_fault_count_never_drifts(rate: float, n: int) -> None:
    faults = FaultInjector(rate)
    got = sum(faults.fail_next() for _ in range(n))
    assert abs(got - rate * n) <= 1


def test_fault_rate_is_bounded() -> None:
    with pytest.raises(ValueError):
        FaultInjector(1.5)


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 2, 4, 9):
        h.observe(v)
    assert h.counts == [2, 2, 1, 1]
    assert h.sum == 18
    family = h.family("x", "doc", "m")
    assert [s.value for s in family.samples if s.name == "x_bucket"] == [2, 4, 5, 6]


def test_config_lists_every_problem() -> None:
    with pytest.raises(ValueError) as caught:
        SidecarConfig("m.onnx", device="tpu", max_batch_size=0, fault_rate=2, report_to="redis://x")
    message = str(caught.value)
    for needle in ("device", "max_batch_size", "fault_rate", "report_to needs a variant"):
        assert needle in message
    assert SidecarConfig("models/tabular-control.onnx").model_name == "tabular-control"
    assert SidecarConfig("models/a.onnx", name="tabular").model_name == "tabular"


def test_the_mlp_is_valid_onnx_and_computes_what_its_weights_say() -> None:
    """``mlp_model_bytes`` writes protobuf by hand (numpy only): onnx must accept it, and onnxruntime
    must compute the same network as numpy does with the same seeded weights."""
    import onnx

    from sidecar.demo_models import mlp_model_bytes

    data = mlp_model_bytes(width=16, layers=3, seed=5)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    (only,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in only.type.tensor_type.shape.dim]
    assert (only.name, dims) == ("input", ["batch", 16])
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    got = ort.InferenceSession(data, providers=[CPU]).run(None, {"input": x})[0]
    rng = np.random.default_rng(5)
    want = x
    for layer in range(3):
        w = (rng.standard_normal((16, 16)) * np.sqrt(2.0 / 16)).astype(np.float32)
        b = (rng.standard_normal(16) * 0.01).astype(np.float32)
        want = want @ w + b
        if layer < 2:
            want = np.maximum(want, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_faults_start_after_the_onset_and_count_from_there() -> None:
    now = [100.0]
    faults = FaultInjector(1.0, after_s=20.0, clock=lambda: now[0])
    assert not any(faults.fail_next() for _ in range(50))  # healthy before the onset
    now[0] = 120.0
    assert all(faults.fail_next() for _ in range(5)) and faults.count == 5
