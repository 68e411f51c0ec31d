"""Demo models, built offline: three tabular classifiers and one synthetic network for benchmarks.

The tabular models are trained on scikit-learn's bundled breast-cancer data (no download) and
exported with skl2onnx so that each takes one input ``input`` FP32 [-1, 30] and returns plain
tensors (``label`` INT64 [-1], ``probabilities`` FP32 [-1, 2]; ``zipmap`` off), which OIP can carry.
``mlp-4x512`` is four 512-wide dense layers with fixed random weights: heavy enough per row that
batching matters, written as ONNX protobuf directly (numpy only, see ``mlp_model_bytes``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidecar.errors import ModelLoadError

SEED = 0
TABULAR_FEATURES = 30
MLP_WIDTH = 512
MLP_LAYERS = 4
ONNX_OPSET = 17
ONNX_ML_OPSET = 3
# The tabular models' data contract, profiled (`cohortgate models profile`) from the training rows they
# were fitted on: policies/quality.yaml hands it to its sidecars, so `make demo-quality` can see drift.
# Not named M.contract.json: a sidecar would then pick it up beside every tabular model, demo or not.
DEMO_CONTRACT = "tabular.contract.json"


@dataclass(frozen=True, slots=True)
class BuiltModel:
    """One model file and what building it found (``accuracy`` is None for the synthetic one)."""

    path: Path
    description: str
    accuracy: float | None
    skipped: bool


def _require_demo_extra() -> None:
    try:
        import onnx  # noqa: F401
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"the demo models are trained with scikit-learn and skl2onnx ({exc.name} is not installed): "
            "pip install 'cohortgate[demo]'"
        ) from None


def _tabular_estimators() -> dict[str, tuple[str, object]]:
    _require_demo_extra()
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


def _write_contract(path: Path, model: Path, x_train: np.ndarray) -> None:
    """The documented way (`cohortgate models profile M.onnx --data reference`), with the training rows."""
    from sklearn.datasets import load_breast_cancer

    from sidecar.model import OnnxModel
    from sidecar.profile import Table, encode, profile

    names = [str(n) for n in load_breast_cancer().feature_names]
    columns = {n: x_train[:, j].astype(np.float64) for j, n in enumerate(names)}
    onnx_model = OnnxModel(str(model), device="cpu")
    doc = profile(onnx_model.signature, onnx_model.run, Table(columns, dict.fromkeys(names, "float")))
    _write(path, encode(doc))


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label = session.run(["label"], {"input": x})[0]
    return float((label == y).mean())


def mlp_model_bytes(width: int = MLP_WIDTH, layers: int = MLP_LAYERS, seed: int = SEED) -> bytes:
    """A dense ReLU network, ``layers`` x (``width`` x ``width``), input/output FP32 [batch, width].

    Written as ONNX protobuf by hand (a dozen message fields), so that building it needs numpy only:
    the GPU check runs where neither the ``onnx`` package nor scikit-learn is installed.
    """
    rng = np.random.default_rng(seed)
    nodes = []
    initializers = []
    current = "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.01).astype(np.float32)
        initializers += [_pb_tensor(f"w{i}", w), _pb_tensor(f"b{i}", b)]
        last = i == layers - 1
        gemm_out = "output" if last else f"h{i}"
        nodes.append(_pb_node("Gemm", [current, f"w{i}", f"b{i}"], gemm_out, f"dense{i}"))
        if not last:
            nodes.append(_pb_node("Relu", [gemm_out], f"a{i}", f"relu{i}"))
            current = f"a{i}"
    graph = b"".join(
        [
            *(_pb_field(1, n) for n in nodes),
            _pb_field(2, f"mlp-{layers}x{width}"),
            *(_pb_field(5, t) for t in initializers),
            _pb_field(11, _pb_value_info("input", width)),
            _pb_field(12, _pb_value_info("output", width)),
        ]
    )
    opset = _pb_varint_field(2, ONNX_OPSET)  # OperatorSetIdProto: default domain, version
    return b"".join(
        [
            _pb_varint_field(1, 8),  # ModelProto.ir_version
            _pb_field(2, "cohortgate"),  # producer_name
            _pb_field(7, graph),
            _pb_field(8, opset),
        ]
    )


# Protobuf wire format, just what ``mlp_model_bytes`` needs (field numbers from onnx.proto).
_FLOAT = 1  # TensorProto.DataType.FLOAT


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_varint_field(number: int, value: int) -> bytes:
    return _pb_varint(number << 3) + _pb_varint(value)


def _pb_field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data


def _pb_tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    dims = b"".join(_pb_varint_field(1, d) for d in array.shape)
    raw = np.ascontiguousarray(array, "<f4").tobytes()
    return dims + _pb_varint_field(2, _FLOAT) + _pb_field(8, name) + _pb_field(9, raw)


def _pb_node(op: str, inputs: list[str], output: str, name: str) -> bytes:
    """NodeProto: input (1), output (2), name (3), op_type (4)."""
    return b"".join([*(_pb_field(1, i) for i in inputs), _pb_field(2, output), _pb_field(3, name), _pb_field(4, op)])


def _pb_value_info(name: str, width: int) -> bytes:
    """ValueInfoProto of a FP32 [batch, width] tensor: TypeProto.tensor_type {elem_type, shape}."""
    dims = _pb_field(1, _pb_field(2, "batch")) + _pb_field(1, _pb_varint_field(1, width))
    tensor_type = _pb_varint_field(1, _FLOAT) + _pb_field(2, dims)
    return _pb_field(1, name) + _pb_field(2, _pb_field(1, tensor_type))


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
    contract = out / DEMO_CONTRACT
    if force or not contract.exists():
        assert x_train is not None
        _write_contract(contract, out / "tabular-control.onnx", x_train)
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
