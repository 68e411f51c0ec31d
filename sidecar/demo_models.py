"""Demo models, built offline: three tabular classifiers and one synthetic network for benchmarks.

The tabular models are trained on scikit-learn's bundled breast-cancer data (no download) and
exported with skl2onnx so that each takes one input ``input`` FP32 [-1, 30] and returns plain
tensors (``label`` INT64 [-1], ``probabilities`` FP32 [-1, 2]; ``zipmap`` off), which OIP can carry.
``mlp-4x512`` is four 512-wide dense layers with fixed random weights: heavy enough per row that
batching matters, built directly with ``onnx.helper``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
TABULAR_FEATURES = 30
MLP_WIDTH = 512
MLP_LAYERS = 4
ONNX_OPSET = 17
ONNX_ML_OPSET = 3


@dataclass(frozen=True, slots=True)
class BuiltModel:
    """One model file and what building it found (``accuracy`` is None for the synthetic one)."""

    path: Path
    description: str
    accuracy: float | None
    skipped: bool


def _tabular_estimators() -> dict[str, tuple[str, object]]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "tabular-control": (
            "logistic regression",
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        ),
        "tabular-canary": (
            "gradient boosting",
            GradientBoostingClassifier(n_estimators=100, random_state=SEED),
        ),
        "tabular-challenger": (
            "random forest",
            RandomForestClassifier(n_estimators=50, random_state=SEED),
        ),
    }


def breast_cancer_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled data set as FP32, split 75/25 with a fixed seed (train X, test X, train y, test y)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.25, random_state=SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def _export_tabular(estimator, path: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    onx = convert_sklearn(
        estimator,
        initial_types=[("input", FloatTensorType([None, TABULAR_FEATURES]))],
        options={id(final): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
    )
    _write(path, onx.SerializeToString())


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label = session.run(["label"], {"input": x})[0]
    return float((label == y).mean())


def mlp_model_bytes(width: int = MLP_WIDTH, layers: int = MLP_LAYERS, seed: int = SEED) -> bytes:
    """A dense ReLU network, ``layers`` x (``width`` x ``width``), input/output FP32 [-1, width]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current = "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.01).astype(np.float32)
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == layers - 1
        gemm_out = "output" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm_out], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"a{i}"], name=f"relu{i}"))
            current = f"a{i}"
    graph = helper.make_graph(
        nodes,
        f"mlp-{layers}x{width}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="cohortgate")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _write(path: Path, data: bytes) -> None:
    """Write atomically, so a concurrent reader never sees half a model."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_models(out: str | Path = "models", *, force: bool = False, include_mlp: bool = True) -> list[BuiltModel]:
    """Build every demo model into ``out``; existing files are kept unless ``force``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built: list[BuiltModel] = []
    x_train = x_test = y_train = y_test = None
    for stem, (description, estimator) in _tabular_estimators().items():
        path = out / f"{stem}.onnx"
        if x_train is None:
            x_train, x_test, y_train, y_test = breast_cancer_split()
        skipped = path.exists() and not force
        if not skipped:
            estimator.fit(x_train, y_train)  # type: ignore[attr-defined]
            _export_tabular(estimator, path)
        built.append(BuiltModel(path, description, _onnx_accuracy(path, x_test, y_test), skipped))
    if include_mlp:
        path = out / f"mlp-{MLP_LAYERS}x{MLP_WIDTH}.onnx"
        skipped = path.exists() and not force
        if not skipped:
            _write(path, mlp_model_bytes())
        built.append(BuiltModel(path, f"synthetic {MLP_LAYERS}x{MLP_WIDTH} ReLU MLP", None, skipped))
    return built


if __name__ == "__main__":  # python -m sidecar.demo_models [OUT]
    import sys

    started = time.perf_counter()
    for model in build_models(sys.argv[1] if len(sys.argv) > 1 else "models"):
        print(model)
    print(f"{time.perf_counter() - started:.1f}s")
