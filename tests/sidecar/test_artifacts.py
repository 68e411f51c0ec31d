"""Model references: pinned digests, fetching into the cache, size caps, and the versioned store on a
directory and on an S3-compatible bucket (moto's server, started here on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from cohortgate.core.contract import HEADER_MODEL_DIGEST, HEADER_MODEL_VERSION
from sidecar import artifacts, repository
from sidecar.artifacts import ArtifactCache, load_artifact, parse_reference, sha256
from sidecar.errors import ArtifactRefused
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.sidecar_helpers import free_port
from tests.sidecar.supply_helpers import add_model, push_versions

# ------------------------------------------------------------------------------------------ pure


def test_references_parse_into_url_scheme_and_pin() -> None:
    pin = "ab" * 32
    ref = parse_reference(f"s3://bucket/models/tabular/3@sha256:{pin.upper()}")
    assert (ref.url, ref.scheme, ref.digest) == ("s3://bucket/models/tabular/3", "s3", f"sha256:{pin}")
    assert ref.is_version and ref.name_version == ("tabular", "3")
    one = parse_reference(f"https://models.example/x.onnx@sha256:{pin}")
    assert not one.is_version and str(one) == f"https://models.example/x.onnx@sha256:{pin}"
    assert parse_reference("file:///store/tabular/2026.12.03").name_version == ("tabular", "2026.12.03")
    plain = parse_reference("models/tabular-control.onnx")
    assert (plain.scheme, plain.digest, plain.is_version) == ("path", None, False)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ftp://host/x.onnx", "not ftp://"),
        ("http://models.example/x.onnx@sha256:" + "0" * 64, "loopback only"),
        ("file:///x.onnx@sha256:abc", "64 hex"),
        ("s3:///key.onnx", "names a bucket"),
        ("file://otherhost/x.onnx", "local path"),
    ],
)
def test_malformed_references_are_refused_with_a_sentence(text: str, words: str) -> None:
    with pytest.raises(ArtifactRefused, match=words) as info:
        parse_reference(text)
    assert info.value.reason == "reference"


# ------------------------------------------------------------------------------------------ loading


def test_a_pinned_file_reference_loads_exactly_those_bytes(tmp_path: Path) -> None:
    data = add_model(1.0)
    (tmp_path / "m.onnx").write_bytes(data)
    artifact = load_artifact(f"{(tmp_path / 'm.onnx').as_uri()}@{sha256(data)}")
    assert artifact.model == data and artifact.digest == sha256(data) and not artifact.sealed


def test_a_digest_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    wrong = sha256(add_model(2.0))
    with pytest.raises(ArtifactRefused, match="digest mismatch") as info:
        load_artifact(f"{(tmp_path / 'm.onnx').as_uri()}@{wrong}")
    assert info.value.reason == "digest"


def test_a_url_without_a_pin_or_a_signature_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    with pytest.raises(ArtifactRefused, match="pinned digest") as info:
        load_artifact((tmp_path / "m.onnx").as_uri())
    assert info.value.reason == "unsigned"


def test_an_artifact_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    data = add_model(1.0)
    (tmp_path / "m.onnx").write_bytes(data)
    with pytest.raises(ArtifactRefused, match="the limit is 10 ") as info:
        load_artifact(f"{(tmp_path / 'm.onnx').as_uri()}@{sha256(data)}", max_bytes=10)
    assert info.value.reason == "size"


async def test_https_style_fetch_goes_through_the_cache_and_a_corrupt_entry_is_dropped(
    aiohttp_server, tmp_path: Path
) -> None:
    data = add_model(1.0)
    hits = []

    async def artifact(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/models/m.onnx", artifact)
    server = await aiohttp_server(app)
    ref = f"http://127.0.0.1:{server.port}/models/m.onnx@{sha256(data)}"
    cache = ArtifactCache(tmp_path / "cache")

    def load() -> artifacts.Artifact:
        return load_artifact(ref, cache=cache)

    import asyncio

    first = await asyncio.to_thread(load)
    second = await asyncio.to_thread(load)
    assert first.model == second.model == data
    assert len(hits) == 1  # the second load came from the cache
    entry = cache.path(sha256(data))
    assert entry.read_bytes() == data and oct(entry.stat().st_mode & 0o777) == "0o600"
    entry.write_bytes(b"tampered")
    third = await asyncio.to_thread(load)
    assert (third.model == data and len(hits) == 1) or len(hits) == 2
    # the tampered entry was refused, dropped, and the next load fetched it again
    assert entry.read_bytes() == data


def test_the_cache_is_trimmed_oldest_first(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=250)
    for i, digest in enumerate("sha256:" + c * 64 for c in "abc"):
        cache.put(digest, bytes([i]) * 100)
        os.utime(cache.path(digest), ns=(i * 10**9, i * 10**9))
    kept = sorted(p.name for p in tmp_path.glob("sha256-*"))
    assert kept == ["sha256-" + "b" * 64, "sha256-" + "c" * 64]


# ------------------------------------------------------------------------------------------ the sidecar


async def test_the_sidecar_refuses_a_mismatched_pin_says_why_and_counts_it(aiohttp_client, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    ref = f"{(tmp_path / 'm.onnx').as_uri()}@{sha256(add_model(9.0))}"
    app = build_app(SidecarConfig(model_path=ref, name="m", intra_op_threads=1, model_cache_dir=str(tmp_path / "c")))
    client = await aiohttp_client(app)
    with pytest.raises(ArtifactRefused):
        await app[SIDECAR].wait_ready()
    ready = await client.get("/v2/health/ready")
    assert ready.status == 503 and "digest mismatch" in (await ready.json())["error"]
    metrics = await (await client.get("/metrics")).text()
    assert 'cohortgate_sidecar_model_refused_total{model="m",reason="digest"} 1.0' in metrics


async def test_the_sidecar_serves_a_store_version_and_names_it_in_headers_and_metrics(
    aiohttp_client, tmp_path: Path
) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    (v1,) = push_versions(store, "adder", 1.0)
    app = build_app(SidecarConfig(model_path=v1.reference, intra_op_threads=1, model_cache_dir=str(tmp_path / "c")))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    response = await client.post("/v2/models/adder/infer", json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["outputs"][0]["data"] == [2.0, 3.0]
    assert response.headers[HEADER_MODEL_VERSION] == "adder/1"
    assert response.headers[HEADER_MODEL_DIGEST] == v1.digest
    metrics = await (await client.get("/metrics")).text()
    assert f'version="adder/1",digest="{v1.digest}"' in metrics or (
        'version="adder/1"' in metrics and v1.digest in metrics
    )
    assert 'cohortgate_sidecar_model_load_seconds{model="adder",stage="verify"}' in metrics


async def test_a_plain_path_still_works_and_reports_its_digest(aiohttp_client, tmp_path: Path) -> None:
    data = add_model(3.0)
    (tmp_path / "plain.onnx").write_bytes(data)
    app = build_app(SidecarConfig(model_path=str(tmp_path / "plain.onnx"), intra_op_threads=1))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    x = np.zeros((1, 2), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = await client.post("/v2/models/plain/infer", json=body)
    assert response.status == 200 and response.headers[HEADER_MODEL_DIGEST] == sha256(data)


# ------------------------------------------------------------------------------------------ the store


def test_directory_store_push_list_pull_and_versions_are_immutable(tmp_path: Path) -> None:
    store = repository.open_store(str(tmp_path / "store"))
    v1, v2 = push_versions(store, "adder", 1.0, 2.0)
    assert (tmp_path / "store/adder/1/model.onnx").read_bytes() == add_model(1.0)
    listed = repository.list_versions(store)
    assert [(v.name, v.version, v.digest, v.signed, v.sealed) for v in listed] == [
        ("adder", "1", v1.digest, False, False),
        ("adder", "2", v2.digest, False, False),
    ]
    with pytest.raises(ArtifactRefused, match="immutable"):
        repository.push(store, "adder", "1", add_model(5.0))
    repository.pull(store, "adder", "2", tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == add_model(2.0)
    # a model swapped under an unchanged manifest is caught by the digest the manifest carries
    (tmp_path / "store/adder/2/model.onnx").write_bytes(add_model(7.0))
    with pytest.raises(ArtifactRefused, match="digest mismatch"):
        repository.pull(store, "adder", "2", tmp_path / "out2.onnx")
    with pytest.raises(ArtifactRefused, match="must be letters"):
        repository.push(store, "..", "1", add_model(1.0))


def test_cli_push_list_pull(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(add_model(1.0))
    store = str(tmp_path / "store")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cohortgate.cli", "models", *args], capture_output=True, text=True, timeout=120
        )

    pushed = cli("push", "--store", store, "adder", "1", "--model", str(tmp_path / "m.onnx"), "--metadata", "team=risk")
    assert pushed.returncode == 0, pushed.stderr
    assert f"@{sha256(add_model(1.0))}" in pushed.stdout
    assert b'"team": "risk"' in (tmp_path / "store/adder/1/manifest.json").read_bytes()
    again = cli("push", "--store", store, "adder", "1", "--model", str(tmp_path / "m.onnx"))
    assert again.returncode == 2 and "immutable" in again.stderr
    listed = cli("list", "--store", store)
    assert listed.returncode == 0 and listed.stdout.startswith("adder/1\t")
    pulled = cli("pull", "--store", store, "adder", "1", "--out", str(tmp_path / "p.onnx"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "p.onnx").read_bytes() == add_model(1.0)


# ------------------------------------------------------------------------------------------ S3


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> str:
    """A bucket on moto's S3-compatible server on 127.0.0.1 (a real HTTP server, not an in-process mock)."""
    pytest.importorskip("boto3")
    moto_server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(moto_server).exists():
        pytest.skip("moto[server] is not installed (pip install 'cohortgate[s3,test]')")
    port = free_port()
    proc = subprocess.Popen(
        [moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    deadline = time.monotonic() + 60  # moto imports a lot; generous on a busy 2-core machine
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="models")
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    try:
        yield "models"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_s3_store_push_list_and_the_sidecar_serves_from_the_bucket(
    s3_bucket: str, aiohttp_client, tmp_path: Path
) -> None:
    import asyncio

    store = repository.open_store(f"s3://{s3_bucket}/prod")
    v1, v2 = await asyncio.to_thread(push_versions, store, "adder", 1.0, 2.0)
    assert v2.reference == f"s3://{s3_bucket}/prod/adder/2@{v2.digest}"
    listed = await asyncio.to_thread(repository.list_versions, store, "adder")
    assert [v.version for v in listed] == ["1", "2"]
    app = build_app(SidecarConfig(model_path=v2.reference, intra_op_threads=1, model_cache_dir=str(tmp_path / "c")))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]}
    response = await client.post("/v2/models/adder/infer", json=body)
    assert (await response.json())["outputs"][0]["data"] == [2.0, 2.0]
    assert (tmp_path / "c" / v2.digest.replace(":", "-")).read_bytes() == add_model(2.0)
    # a pin that does not match the bucket's manifest is refused
    with pytest.raises(ArtifactRefused, match="digest mismatch"):
        await asyncio.to_thread(load_artifact, f"s3://{s3_bucket}/prod/adder/2@{v1.digest}")


# ------------------------------------------------------------------------------------------ https


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), the certificate being its own CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_https_references_verify_tls_and_follow_no_redirect(
    aiohttp_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import ssl

    store = repository.DirectoryStore(tmp_path / "store")
    (v1,) = push_versions(store, "adder", 1.0)

    async def serve_store(request: web.Request) -> web.StreamResponse:
        path = tmp_path / "store" / request.match_info["tail"]
        return web.Response(body=path.read_bytes()) if path.is_file() else web.Response(status=404)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/store/adder/1/model.onnx")

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/store/{tail:.*}", serve_store)
    app.router.add_get("/elsewhere/model.onnx", redirect)
    server = await aiohttp_server(app, ssl=context)
    base = f"https://127.0.0.1:{server.port}"

    # An unknown CA is refused (a fetch error, not a crash) ...
    with pytest.raises(ArtifactRefused, match="CERTIFICATE_VERIFY_FAILED") as info:
        await asyncio.to_thread(load_artifact, f"{base}/store/adder/1@{v1.digest}")
    assert info.value.reason == "fetch"
    # ... and trusted through the standard SSL_CERT_FILE, the version verifies and loads.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    artifact = await asyncio.to_thread(
        load_artifact, f"{base}/store/adder/1@{v1.digest}", cache=ArtifactCache(tmp_path / "c")
    )
    assert artifact.model == add_model(1.0) and artifact.version == "adder/1"
    with pytest.raises(ArtifactRefused, match="HTTP 302"):
        await asyncio.to_thread(load_artifact, f"{base}/elsewhere/model.onnx@{v1.digest}")
