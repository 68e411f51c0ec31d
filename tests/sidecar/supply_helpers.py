"""Helpers for the model supply-chain tests: tiny models that say which version answered, a store."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sidecar import repository, sealing, signing


def add_model(k: float, extra_floats: int = 0) -> bytes:
    """``y = x + k`` on FP32 [n, 2]: the answer tells which version served it. ``extra_floats`` adds an
    unused initializer to make the file larger."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    inits = [numpy_helper.from_array(np.full((1, 2), k, np.float32), "k")]
    if extra_floats:
        inits.append(numpy_helper.from_array(np.arange(extra_floats, dtype=np.float32), "ballast"))
    graph = helper.make_graph([helper.make_node("Add", ["x", "k"], ["y"])], f"add{k}", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def keypair(tmp_path, stem: str = "platform") -> tuple[str, signing.TrustedKey]:
    """(private key path, trusted public key)."""
    private_pem, public_pem = signing.generate()
    (tmp_path / f"{stem}.key").write_bytes(private_pem)
    (tmp_path / f"{stem}.pub").write_bytes(public_pem)
    return str(tmp_path / f"{stem}.key"), signing.load_trusted_key(str(tmp_path / f"{stem}.pub"))


def kek_file(tmp_path, stem: str = "kek") -> sealing.Kek:
    path = tmp_path / stem
    path.write_bytes(sealing.new_kek())
    return sealing.load_kek(f"file:{path}")


def push_versions(store: repository.Store, name: str, *ks: float) -> list[repository.VersionInfo]:
    """Versions 1, 2, … of ``add_model(k)``."""
    return [repository.push(store, name, str(i), add_model(k)) for i, k in enumerate(ks, start=1)]
