"""Encryption at rest: sealed with AES-256-GCM under a wrapped data key (file, env or a KMS command),
decrypted into memory only; a wrong key is a clear refusal, never a crash."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import repository, sealing
from sidecar.artifacts import load_artifact, sha256
from sidecar.errors import ArtifactRefused
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.supply_helpers import add_model, kek_file, keypair, push_versions

# A stand-in KMS: it holds its own key (in its environment) and only ever wraps and unwraps.
KMS = """
import base64, os, sys
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
key = base64.b64decode(os.environ["FAKE_KMS_KEY"])
data = base64.b64decode(sys.stdin.read())
out = aes_key_wrap(key, data) if sys.argv[1] == "wrap" else aes_key_unwrap(key, data)
sys.stdout.write(base64.b64encode(out).decode())
"""


def test_seal_and_unseal_round_trip_and_the_header_says_what_it_is(tmp_path: Path) -> None:
    kek = kek_file(tmp_path)
    plain = add_model(1.0)
    sealed = sealing.seal(plain, kek)
    assert sealing.is_sealed(sealed) and not sealing.is_sealed(plain)
    assert plain not in sealed
    assert sealing.unseal(sealed, kek) == plain
    assert sealing.seal(plain, kek) != sealed  # a fresh data key and nonce each time


def test_a_wrong_key_encryption_key_is_named_not_a_crash(tmp_path: Path) -> None:
    sealed = sealing.seal(add_model(1.0), kek_file(tmp_path, "right"))
    wrong = kek_file(tmp_path, "wrong")
    with pytest.raises(
        ArtifactRefused, match=f"was sealed under key-encryption key .* but file:.*wrong is {wrong.key_id}"
    ):
        sealing.unseal(sealed, wrong)
    with pytest.raises(ArtifactRefused, match="is sealed: give the key-encryption key"):
        sealing.unseal(sealed, None)


def test_a_tampered_sealed_file_does_not_decrypt(tmp_path: Path) -> None:
    kek = kek_file(tmp_path)
    sealed = bytearray(sealing.seal(add_model(1.0), kek))
    sealed[-40] ^= 1
    with pytest.raises(ArtifactRefused, match="does not decrypt") as info:
        sealing.unseal(bytes(sealed), kek)
    assert info.value.reason == "decrypt"
    header_edit = bytes(sealing.seal(add_model(1.0), kek)).replace(b'"kek":"file"', b'"kek":"fil3"')
    with pytest.raises(ArtifactRefused, match="does not decrypt"):
        sealing.unseal(header_edit, kek)  # the header is the GCM associated data


def test_env_and_kms_command_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_KEK", base64.b64encode(os.urandom(32)).decode())
    env_kek = sealing.load_kek("env:MODEL_KEK")
    assert sealing.unseal(sealing.seal(b"model", env_kek), env_kek) == b"model"
    monkeypatch.delenv("MODEL_KEK")
    with pytest.raises(ArtifactRefused, match=r"MODEL_KEK \(the key-encryption key\) is not set"):
        sealing.load_kek("env:MODEL_KEK")
    (tmp_path / "kms.py").write_text(KMS)
    monkeypatch.setenv("FAKE_KMS_KEY", base64.b64encode(os.urandom(32)).decode())
    kms = sealing.load_kek(f"cmd:{sys.executable} {tmp_path / 'kms.py'}")
    sealed = sealing.seal(b"model", kms)
    assert sealing.unseal(sealed, kms) == b"model"
    monkeypatch.setenv("FAKE_KMS_KEY", base64.b64encode(os.urandom(32)).decode())  # the KMS key rotated away
    with pytest.raises(ArtifactRefused, match=r"KMS command \S+ unwrap exited 1"):
        sealing.unseal(sealed, kms)


def no_file_holds(root: Path, plain: bytes) -> bool:
    return all(p.read_bytes() != plain for p in root.rglob("*") if p.is_file())


async def test_push_sign_seal_then_the_sidecar_serves_from_memory_only(aiohttp_client, tmp_path: Path) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    private, _ = keypair(tmp_path)
    kek = kek_file(tmp_path)
    (v1,) = push_versions(store, "adder", 5.0)
    repository.sign(store, "adder", "1", private)
    repository.seal(store, "adder", "1", kek)
    plain = add_model(5.0)
    assert no_file_holds(tmp_path, plain)
    assert [(v.signed, v.sealed) for v in repository.list_versions(store)] == [(True, True)]
    config = SidecarConfig(
        model_path=store.url("adder/1"),
        trusted_keys=(str(tmp_path / "platform.pub"),),
        kek=f"file:{tmp_path / 'kek'}",
        intra_op_threads=1,
        model_cache_dir=str(tmp_path / "cache"),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}
    response = await client.post("/v2/models/adder/infer", json=body)
    assert (await response.json())["outputs"][0]["data"] == [5.0, 6.0]
    metrics = await (await client.get("/metrics")).text()
    assert 'sealed="true"' in metrics and 'stage="decrypt"' in metrics
    assert no_file_holds(tmp_path, plain)  # not in the store, the cache, or anywhere else under the test dir
    assert app[SIDECAR].artifact.digest == v1.digest and app[SIDECAR].artifact.model == b""


async def test_the_sidecar_with_a_wrong_key_stays_not_ready_and_says_why(aiohttp_client, tmp_path: Path) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    (v1,) = push_versions(store, "adder", 5.0)
    repository.seal(store, "adder", "1", kek_file(tmp_path, "right"))
    kek_file(tmp_path, "wrong")
    app = build_app(
        SidecarConfig(
            model_path=v1.reference,
            kek=f"file:{tmp_path / 'wrong'}",
            intra_op_threads=1,
            model_cache_dir=str(tmp_path / "cache"),
        )
    )
    client = await aiohttp_client(app)
    with pytest.raises(ArtifactRefused):
        await app[SIDECAR].wait_ready()
    ready = await client.get("/v2/health/ready")
    assert ready.status == 503 and "sealed under key-encryption key" in (await ready.json())["error"]
    assert 'reason="decrypt"} 1.0' in await (await client.get("/metrics")).text()


def test_cli_seal_and_pull(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "cohortgate.cli", "models", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    store = str(tmp_path / "store")
    assert cli("keygen", "--kek", "--out", str(tmp_path / "kek")).returncode == 0
    assert cli("push", "--store", store, "adder", "1", "--model", str(tmp_path / "m.onnx")).returncode == 0
    sealed = cli("seal", "--store", store, "adder", "1", "--kek", f"file:{tmp_path / 'kek'}")
    assert sealed.returncode == 0, sealed.stderr
    assert sealing.is_sealed((tmp_path / "store/adder/1/model.onnx").read_bytes())
    again = cli("seal", "--store", store, "adder", "1", "--kek", f"file:{tmp_path / 'kek'}")
    assert again.returncode == 2 and "sealed already" in again.stderr
    pulled = cli(
        "pull", "--store", store, "adder", "1", "--out", str(tmp_path / "p"), "--kek", f"file:{tmp_path / 'kek'}"
    )
    assert pulled.returncode == 0, pulled.stderr
    assert sha256((tmp_path / "p").read_bytes()) == sha256(add_model(1.0))
    kept_sealed = cli("pull", "--store", store, "adder", "1", "--out", str(tmp_path / "s"))
    assert kept_sealed.returncode == 0 and sealing.is_sealed((tmp_path / "s").read_bytes())
    assert load_artifact  # the loader the CLI's verify uses is the sidecar's
