"""Benchmark: what verification and decryption add to loading a 100 MB model.

Generates, in a temporary directory, an initializer-heavy ONNX model (``y = x @ W``, W float32
[5120, 5120] = 100 MiB), pushes it to a directory store, signs and seals it, then loads it the way the
sidecar does (``sidecar.serving.load_model``: fetch, verify, decrypt in memory, onnxruntime session,
one warm-up row) in four ways:

- ``old``: ``OnnxModel(path)`` as before this change (onnxruntime reads the file; nothing is checked);
- ``path``: a plain path through the loader (read into memory, hashed for the digest header);
- ``pinned``: ``file://…/model.onnx@sha256:…`` (digest checked);
- ``signed``: a signed store version (Ed25519 over the manifest + the digest);
- ``sealed``: the same version sealed (AES-256-GCM decryption in memory + signature + digest).

Prints, per way, the median over ``--repeat`` loads of each stage and the total, and the one-off
``seal`` time; ``--json PATH`` writes them too.

    python bench/bench_artifacts.py                  # 100 MiB, 3 repeats
    python bench/bench_artifacts.py --mib 400 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar import repository, sealing, serving, signing
from sidecar.model import OnnxModel


@dataclass
class Settings:
    device: str = "cpu"
    intra_op_threads: int | None = 1
    max_batch_size: int = 1
    trusted_keys: tuple[str, ...] = ()
    kek: str | None = None
    model_cache_dir: str | None = None
    model_max_bytes: int = 8 * 1024**3


def big_model(mib: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    side = int((mib * 1024 * 1024 / 4) ** 0.5)
    weights = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "big", [x], [y], [numpy_helper.from_array(weights, "W")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        data = big_model(args.mib)
        print(f"model: {len(data) / 2**20:.1f} MiB, generated in {time.perf_counter() - started:.1f}s")
        (root / "big.onnx").write_bytes(data)
        private_pem, public_pem = signing.generate()
        (root / "k.key").write_bytes(private_pem)
        (root / "k.pub").write_bytes(public_pem)
        (root / "kek").write_bytes(sealing.new_kek())
        kek = sealing.load_kek(f"file:{root / 'kek'}")

        plain = repository.DirectoryStore(root / "plain")
        info = repository.push(plain, "big", "1", data)
        repository.sign(plain, "big", "1", root / "k.key")
        sealed_store = repository.DirectoryStore(root / "sealed")
        repository.push(sealed_store, "big", "1", data)
        repository.sign(sealed_store, "big", "1", root / "k.key")
        started = time.perf_counter()
        repository.seal(sealed_store, "big", "1", kek)  # includes a verification round trip
        seal_s = time.perf_counter() - started
        print(f"seal (once, at publish; includes its round-trip check): {seal_s * 1000:.0f} ms")

        keys = (str(root / "k.pub"),)
        ways = {
            "path": (str(root / "big.onnx"), Settings()),
            "pinned": (f"{plain.url('big/1/model.onnx')}@{info.digest}", Settings()),
            "signed": (plain.url("big/1"), Settings(trusted_keys=keys)),
            "sealed": (sealed_store.url("big/1"), Settings(trusted_keys=keys, kek=f"file:{root / 'kek'}")),
        }
        results: dict[str, dict[str, float]] = {}
        stages = ("fetch", "verify", "decrypt", "session", "warm_up")
        header = f"{'way':8} " + " ".join(f"{s:>9}" for s in (*stages, "total")) + "   (ms, median)"
        print(header)
        runs_old = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            old = OnnxModel(root / "big.onnx", "big", device="cpu", intra_op_threads=1)
            session_s = time.perf_counter() - started
            old.warm_up(1)
            runs_old.append({"session": session_s, "warm_up": time.perf_counter() - started - session_s})
            del old
        results["old"] = {k: statistics.median(r.get(k, 0.0) for r in runs_old) for k in stages}
        results["old"]["total"] = statistics.median(r["session"] + r["warm_up"] for r in runs_old)
        print(f"{'old':8} " + " ".join(f"{results['old'][k] * 1000:9.0f}" for k in (*stages, "total")))
        for way, (reference, settings) in ways.items():
            runs: list[dict[str, float]] = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                model, artifact = serving.load_model(settings, reference, "big")
                total = time.perf_counter() - started
                runs.append({**artifact.timings, "total": total})
                del model
            med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in (*stages, "total")}
            results[way] = med
            print(f"{way:8} " + " ".join(f"{med[k] * 1000:9.0f}" for k in (*stages, "total")))
        base = results["old"]["total"]
        for way in ("path", "pinned", "signed", "sealed"):
            extra = results[way]["total"] - base
            print(f"{way}: {extra * 1000:+.0f} ms over the old load ({results[way]['total'] / base:.2f}x)")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"mib": args.mib, "repeat": args.repeat, "seal_s": seal_s, "loads_s": results}, indent=2)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
