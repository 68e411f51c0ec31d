"""Signatures: a version signed by a trusted key serves; unsigned, wrongly signed, replayed or bare
artifacts never do, and the sidecar stays not-ready and says why. The policy names keys per route."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cohortgate.core.policy import parse_policy
from sidecar import repository, signing
from sidecar.artifacts import load_artifact
from sidecar.errors import ArtifactRefused
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.supply_helpers import add_model, keypair, push_versions


@pytest.fixture
def store(tmp_path: Path) -> repository.DirectoryStore:
    return repository.DirectoryStore(tmp_path / "store")


def version_url(store: repository.DirectoryStore, name: str, version: str) -> str:
    return store.url(f"{name}/{version}")


def test_a_signed_version_verifies_with_its_key_and_inline_keys_work(tmp_path: Path, store) -> None:
    private, trusted = keypair(tmp_path)
    push_versions(store, "adder", 1.0)
    key_id = repository.sign(store, "adder", "1", private)
    assert key_id == trusted.key_id
    artifact = load_artifact(version_url(store, "adder", "1"), trusted_keys=[trusted])
    assert artifact.signed_by == trusted.key_id and artifact.version == "adder/1"
    inline = signing.load_trusted_key(signing.inline(trusted.key))
    assert load_artifact(version_url(store, "adder", "1"), trusted_keys=[inline]).model == add_model(1.0)


def test_a_signature_by_another_key_is_refused(tmp_path: Path, store) -> None:
    _, trusted = keypair(tmp_path, "platform")
    rogue, _ = keypair(tmp_path, "rogue")
    push_versions(store, "adder", 1.0)
    repository.sign(store, "adder", "1", rogue)
    with pytest.raises(ArtifactRefused, match="does not verify with any trusted key") as info:
        load_artifact(version_url(store, "adder", "1"), trusted_keys=[trusted])
    assert info.value.reason == "signature"


def test_an_unsigned_version_and_a_bare_artifact_are_refused_when_keys_are_set(tmp_path: Path, store) -> None:
    _, trusted = keypair(tmp_path)
    (v1,) = push_versions(store, "adder", 1.0)
    with pytest.raises(ArtifactRefused, match="not signed") as info:
        load_artifact(version_url(store, "adder", "1"), trusted_keys=[trusted])
    assert info.value.reason == "unsigned"
    bare = store.url("adder/1/model.onnx") + "@" + v1.digest
    with pytest.raises(ArtifactRefused, match="bare artifact"):
        load_artifact(bare, trusted_keys=[trusted])


def test_an_edited_manifest_breaks_the_signature(tmp_path: Path, store) -> None:
    private, trusted = keypair(tmp_path)
    push_versions(store, "adder", 1.0)
    repository.sign(store, "adder", "1", private)
    manifest = tmp_path / "store/adder/1/manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"size"', b'"size" ', 1))
    with pytest.raises(ArtifactRefused, match="does not verify"):
        load_artifact(version_url(store, "adder", "1"), trusted_keys=[trusted])


def test_a_signed_old_version_replayed_under_a_new_name_is_refused(tmp_path: Path, store) -> None:
    private, trusted = keypair(tmp_path)
    push_versions(store, "adder", 1.0, 2.0)
    repository.sign(store, "adder", "1", private)
    for leaf in ("manifest.json", "manifest.json.sig", "model.onnx"):
        (tmp_path / f"store/adder/2/{leaf}").write_bytes((tmp_path / f"store/adder/1/{leaf}").read_bytes())
    with pytest.raises(ArtifactRefused, match="describes adder/1, not adder/2"):
        load_artifact(version_url(store, "adder", "2"), trusted_keys=[trusted])


def test_a_model_swapped_under_a_signed_manifest_is_refused(tmp_path: Path, store) -> None:
    private, trusted = keypair(tmp_path)
    push_versions(store, "adder", 1.0)
    repository.sign(store, "adder", "1", private)
    (tmp_path / "store/adder/1/model.onnx").write_bytes(add_model(666.0))
    with pytest.raises(ArtifactRefused, match="digest mismatch"):
        load_artifact(version_url(store, "adder", "1"), trusted_keys=[trusted])


@pytest.mark.parametrize("signer", ["rogue", None])
async def test_the_sidecar_stays_not_ready_and_says_why(aiohttp_client, tmp_path: Path, store, signer) -> None:
    keypair(tmp_path, "platform")
    push_versions(store, "adder", 1.0)
    if signer is not None:
        repository.sign(store, "adder", "1", keypair(tmp_path, signer)[0])
    config = SidecarConfig(
        model_path=version_url(store, "adder", "1"),
        trusted_keys=(str(tmp_path / "platform.pub"),),
        intra_op_threads=1,
        model_cache_dir=str(tmp_path / "c"),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    with pytest.raises(ArtifactRefused):
        await app[SIDECAR].wait_ready()
    ready = await client.get("/v2/health/ready")
    why = (await ready.json())["error"]
    assert ready.status == 503 and ("does not verify" in why if signer else "not signed" in why)
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert (await client.post("/v2/models/adder/infer", json=body)).status == 503
    reason = "signature" if signer else "unsigned"
    assert (
        f'cohortgate_sidecar_model_refused_total{{model="adder",reason="{reason}"}} 1.0'
        in await (await client.get("/metrics")).text()
    )


async def test_the_sidecar_serves_a_version_signed_by_a_trusted_key(aiohttp_client, tmp_path: Path, store) -> None:
    private, trusted = keypair(tmp_path)
    push_versions(store, "adder", 1.0)
    repository.sign(store, "adder", "1", private)
    config = SidecarConfig(
        model_path=version_url(store, "adder", "1"),
        trusted_keys=(signing.inline(trusted.key),),
        intra_op_threads=1,
        model_cache_dir=str(tmp_path / "c"),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    metrics = await (await client.get("/metrics")).text()
    assert 'signed="true"' in metrics and 'version="adder/1"' in metrics


def test_cli_keygen_sign_and_the_sidecar_cli_refuses_an_unsigned_model(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cohortgate.cli", *args], capture_output=True, text=True, timeout=120
        )

    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    store = str(tmp_path / "store")
    made = cli("models", "keygen", "--out", str(tmp_path / "platform"))
    assert made.returncode == 0 and "ed25519:" in made.stdout
    assert oct((tmp_path / "platform.key").stat().st_mode & 0o777) == "0o600"
    assert cli("models", "push", "--store", store, "adder", "1", "--model", str(tmp_path / "m.onnx")).returncode == 0
    url = (tmp_path / "store/adder/1").as_uri()
    refused = cli(
        "sidecar",
        "--model",
        url,
        "--trusted-key",
        str(tmp_path / "platform.pub"),
        "--port",
        "0",
        "--model-cache",
        str(tmp_path / "c"),
    )
    assert refused.returncode == 2 and "not signed" in refused.stderr
    signed = cli("models", "sign", "--store", store, "adder", "1", "--key", str(tmp_path / "platform.key"))
    assert signed.returncode == 0, signed.stderr
    verified = cli("models", "verify", url, "--trusted-key", str(tmp_path / "platform.pub"))
    assert verified.returncode == 0 and "signed by" in verified.stdout
    listed = cli("models", "list", "--store", store)
    assert "\tsigned\t" in listed.stdout


def test_the_policy_names_trusted_keys_per_route_and_keeps_references(tmp_path: Path) -> None:
    _, trusted = keypair(tmp_path)
    text = f"""
version: 1
jwt: {{issuer: https://i, audience: a, algorithms: [ES256], jwks: jwks.json}}
routes:
  - name: adder
    match: {{model: adder}}
    trusted_keys: ["{signing.inline(trusted.key)}", platform.pub]
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "http://127.0.0.1:18101", region: eu, model: "s3://models/prod/adder/3"}}
          - {{url: "http://127.0.0.1:18102", region: ae, model: local.onnx}}
"""
    policy = parse_policy(text, base_dir=tmp_path)
    route = policy.routes[0]
    assert route.trusted_keys == (signing.inline(trusted.key), str(tmp_path / "platform.pub"))
    models = [b.model for b in route.variants[0].backends]
    assert models == ["s3://models/prod/adder/3", str(tmp_path / "local.onnx")]
