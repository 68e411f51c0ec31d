"""One ONNX model in an onnxruntime session: provider choice, threads, signature, warm-up.

This is the only module that imports onnxruntime, so its exceptions are translated here, once:
load failures become ``ModelLoadError``, run failures ``InferenceFailed``.

The provider in use is read back from ``session.get_providers()`` rather than assumed, because
onnxruntime-gpu silently falls back to CPU when the CUDA libraries are missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sidecar.batching import Tensors
from sidecar.errors import InferenceFailed, ModelLoadError
from sidecar.protocol import DATATYPES, Signature, TensorSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

# onnxruntime's type strings -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """The providers to ask onnxruntime for; CUDA first when it is wanted and offered."""
    if device not in DEVICES:
        raise ModelLoadError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise ModelLoadError(
            "--device cuda, but this onnxruntime has no CUDAExecutionProvider "
            "(install cohortgate[gpu], which brings onnxruntime-gpu instead of onnxruntime)"
        )
    return [CPU]


def default_intra_op_threads(cpu_count: int | None = None) -> int:
    """All cores but one, which the event loop keeps; at least one."""
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpu_count - 1)


def _spec(arg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which this sidecar does not serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel:
    """An onnxruntime session with its OIP signature; ``run`` is called from one executor thread."""

    def __init__(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        model_bytes: bytes | None = None,
    ) -> None:
        """``model_bytes``, when given, are what runs (verified and decrypted in memory by
        ``sidecar.artifacts``); ``path`` then only names the model in messages."""
        try:
            import onnxruntime as ort
        except ImportError:  # the package ships it as an extra: cpu or gpu, never both
            raise ModelLoadError(
                "onnxruntime is not installed: pip install 'cohortgate[cpu]' (or 'cohortgate[gpu]' for CUDA)"
            ) from None

        path = Path(path)
        self.path = path
        self.name = name or path.stem
        if model_bytes is None and not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        providers = choose_providers(device, ort.get_available_providers())
        if CUDA in providers:
            _preload_cuda_libraries(ort)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads must not spin on the core the event loop needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            source = model_bytes if model_bytes is not None else str(path)
            self._session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime's load errors, translated once
            raise ModelLoadError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc
        self.providers = tuple(self._session.get_providers())
        self.provider = self.providers[0]
        if device == "cuda" and self.provider != CUDA:
            raise ModelLoadError(
                f"--device cuda, but onnxruntime runs {path} on {self.provider} "
                "(are the CUDA and cuDNN libraries installed?)"
            )
        self.signature = Signature(
            self.name,
            tuple(_spec(a) for a in self._session.get_inputs()),
            tuple(_spec(a) for a in self._session.get_outputs()),
        )
        self.intra_op_threads = options.intra_op_num_threads
        self._input_names = [s.name for s in self.signature.inputs]
        self._output_names = [s.name for s in self.signature.outputs]

    def run(self, inputs: Tensors) -> Tensors:
        """One ``session.run``; every onnxruntime failure becomes ``InferenceFailed``."""
        try:
            return tuple(self._session.run(self._output_names, dict(zip(self._input_names, inputs, strict=True))))
        except Exception as exc:  # onnxruntime's run errors, translated once
            raise InferenceFailed(f"onnxruntime failed: {_first_line(exc)}") from exc

    def example_inputs(self, rows: int) -> Tensors:
        """Zeros that fit the signature, with ``rows`` on a free first axis (1 on other free axes)."""
        arrays = []
        for spec in self.signature.inputs:
            shape = [d if d >= 0 else 1 for d in spec.shape]
            if spec.shape and spec.shape[0] == -1:
                shape[0] = rows
            arrays.append(np.zeros(shape, DATATYPES[spec.datatype]))
        return tuple(arrays)

    def warm_up(self, max_rows: int = 1) -> None:
        """Run once at one row and once at the largest batch, so the first request is not slow."""
        for rows in sorted({1, max_rows}):
            self.run(self.example_inputs(rows))


_preloaded = False


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels when they are installed but not on the library path
    (onnxruntime-gpu >= 1.21 offers this); best effort, once: a failure shows up as a CPU fallback."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # an odd layout must not stop the CPU fallback
        log.warning("onnxruntime.preload_dlls failed: %s", _first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]
