"""The versioned model layout, on a directory or an S3-compatible bucket: the writing side of
``sidecar.artifacts`` (``cohortgate models push/list/pull/sign/seal``).

    <store>/<name>/<version>/model.onnx          the model, plain or sealed (sealing.py)
    <store>/<name>/<version>/manifest.json       digest of the plain model, size, data contract, metadata
    <store>/<name>/<version>/manifest.json.sig   detached Ed25519 signature over manifest.json (signing.py)

Versions are immutable: pushing an existing version is refused unless forced, and the manifest is
written last, so a reader never sees a version whose model is still being uploaded. Signing and
sealing do not touch the manifest, so ``push → sign → seal`` keeps the signature valid: it vouches for
the plain model's digest, which the loader checks after decrypting in memory.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cohortgate.support.files import write_atomic
from sidecar import artifacts, sealing, signing
from sidecar.artifacts import ARTIFACT, MANIFEST, SIGNATURE, Manifest
from sidecar.errors import ArtifactRefused, ModelLoadError


class Store(Protocol):
    def read(self, key: str, limit: int = artifacts.DEFAULT_MAX_BYTES) -> bytes | None: ...
    def head(self, key: str, n: int) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def keys(self) -> Iterator[str]: ...
    def url(self, key: str) -> str: ...


class DirectoryStore:
    """A directory (local disk, NFS, a mounted volume); writes are atomic renames."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str, limit: int = artifacts.DEFAULT_MAX_BYTES) -> bytes | None:
        return artifacts.read_blob(str(self._path(key)), limit, missing_ok=True)

    def head(self, key: str, n: int) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read(n)
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self) -> Iterator[str]:
        if self.root.is_dir():
            for path in sorted(self.root.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    yield path.relative_to(self.root).as_posix()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Store:
    """An S3-compatible bucket (AWS, MinIO, Ceph…); the endpoint comes from ``AWS_ENDPOINT_URL``."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = artifacts.s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str, limit: int = artifacts.DEFAULT_MAX_BYTES) -> bytes | None:
        return artifacts.read_blob(self.url(key), limit, missing_ok=True)

    def head(self, key: str, n: int) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{n - 1}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise ArtifactRefused("fetch", f"cannot read {self.url(key)}: {exc}") from None
        return obj["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def keys(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", ()):
                yield obj["Key"][len(start) :]

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(url: str) -> Store:
    """``s3://bucket[/prefix]``, ``file:///dir`` or a plain directory path."""
    if url.startswith("s3://"):
        parts = urllib.parse.urlsplit(url)
        if not parts.netloc:
            raise ArtifactRefused("reference", f"{url}: an S3 store is s3://BUCKET[/PREFIX]")
        return S3Store(parts.netloc, parts.path)
    if url.startswith("file://"):
        return DirectoryStore(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if "://" in url:
        raise ArtifactRefused("reference", f"a model store is a directory, file:// or s3:// URL, not {url}")
    return DirectoryStore(url)


def _version_key(name: str, version: str) -> str:
    for what, value in (("name", name), ("version", version)):
        if not artifacts.valid_name(value):
            raise ArtifactRefused("reference", f"model {what} {value!r} must be letters, digits, '.', '_' or '-'")
    return f"{name}/{version}"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    name: str
    version: str
    digest: str
    size: int
    signed: bool
    sealed: bool
    reference: str  # what a policy's model: names: the version URL pinned by its digest


def push(
    store: Store,
    name: str,
    version: str,
    model: bytes,
    *,
    metadata: Mapping[str, Any] | None = None,
    data_contract: Any = None,
    force: bool = False,
) -> VersionInfo:
    """Write ``model.onnx`` then ``manifest.json``; refuse to overwrite a version unless ``force``."""
    key = _version_key(name, version)
    if sealing.is_sealed(model):
        raise ArtifactRefused("reference", "push the plain model, then seal it in the store (models seal)")
    if not force and store.head(f"{key}/{MANIFEST}", 1) is not None:
        raise ArtifactRefused("exists", f"{store.url(key)} exists; versions are immutable (push a new version)")
    manifest = Manifest(
        name=name,
        version=version,
        digest=artifacts.sha256(model),
        size=len(model),
        data_contract=data_contract,
        metadata=dict(metadata or {}),
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    store.delete(f"{key}/{SIGNATURE}")  # a forced push invalidates the old signature
    store.write(f"{key}/{ARTIFACT}", model)
    store.write(f"{key}/{MANIFEST}", manifest.to_bytes())
    return VersionInfo(name, version, manifest.digest, manifest.size, False, False, pinned(store, key, manifest.digest))


def pinned(store: Store, key: str, digest: str) -> str:
    return f"{store.url(key)}@{digest}"


def read_manifest(store: Store, name: str, version: str) -> tuple[bytes, Manifest]:
    key = _version_key(name, version)
    data = store.read(f"{key}/{MANIFEST}", 1024 * 1024)
    if data is None:
        raise ArtifactRefused("fetch", f"{store.url(key)} has no manifest.json: no such version")
    return data, artifacts.parse_manifest(data, store.url(key))


def list_versions(store: Store, name: str | None = None) -> list[VersionInfo]:
    keys = set(store.keys())
    out = []
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != MANIFEST or (name is not None and parts[0] != name):
            continue
        _, manifest = read_manifest(store, parts[0], parts[1])
        vkey = f"{parts[0]}/{parts[1]}"
        head = store.head(f"{vkey}/{ARTIFACT}", len(sealing.MAGIC)) or b""
        out.append(
            VersionInfo(
                manifest.name,
                manifest.version,
                manifest.digest,
                manifest.size,
                f"{vkey}/{SIGNATURE}" in keys,
                sealing.is_sealed(head),
                pinned(store, vkey, manifest.digest),
            )
        )
    return out


def sign(store: Store, name: str, version: str, private_key_path: str | Path) -> str:
    """Write ``manifest.json.sig``; returns the key id."""
    private = signing.load_private_key(private_key_path)
    data, _ = read_manifest(store, name, version)
    store.write(f"{_version_key(name, version)}/{SIGNATURE}", signing.sign(private, data))
    return signing.key_id(private.public_key())


def seal(store: Store, name: str, version: str, kek: sealing.Kek) -> None:
    """Replace ``model.onnx`` by its sealed form, after checking it is the model the manifest names."""
    key = _version_key(name, version)
    _, manifest = read_manifest(store, name, version)
    model = store.read(f"{key}/{ARTIFACT}")
    if model is None:
        raise ArtifactRefused("fetch", f"{store.url(key)} has no model.onnx")
    if sealing.is_sealed(model):
        raise ArtifactRefused("exists", f"{store.url(key)} is sealed already")
    artifacts.check_digest(model, manifest.digest, store.url(f"{key}/{ARTIFACT}"))
    sealed = sealing.seal(model, kek)
    if sealing.unseal(sealed, kek, store.url(key)) != model:  # a KMS hook that cannot unwrap is caught now
        raise ArtifactRefused("decrypt", "sealing did not round-trip; the model was not replaced")
    store.write(f"{key}/{ARTIFACT}", sealed)


def pull(
    store: Store,
    name: str,
    version: str,
    out: str | Path,
    *,
    trusted_keys: tuple[signing.TrustedKey, ...] = (),
    kek: sealing.Kek | None = None,
) -> artifacts.Artifact:
    """Verify a version (signature when keys are given; the manifest's digest always) and write it.

    With ``kek`` the plain model is written (0600): pulling is an operator's explicit act; the sidecar
    itself never writes plaintext. Without it a sealed model is verified by signature only and written
    sealed.
    """
    key = _version_key(name, version)
    _, manifest = read_manifest(store, name, version)
    head = store.head(f"{key}/{ARTIFACT}", len(sealing.MAGIC)) or b""
    if sealing.is_sealed(head) and kek is None:
        if trusted_keys:
            data, _ = read_manifest(store, name, version)
            signing.verify(data, store.read(f"{key}/{SIGNATURE}", 64 * 1024), trusted_keys, store.url(key))
        blob = store.read(f"{key}/{ARTIFACT}")
        assert blob is not None
        write_atomic(out, blob, mode=0o600)
        return artifacts.Artifact(b"", manifest.digest, store.url(key), f"{name}/{version}", sealed=True)
    reference = store.url(key) if trusted_keys else pinned(store, key, manifest.digest)
    artifact = artifacts.load_artifact(reference, trusted_keys=trusted_keys, kek=kek)
    write_atomic(out, artifact.model, mode=0o600)
    return artifact


def data_contract_from(path: str | None) -> Any:
    """The manifest's data contract (sidecar/contract.py): a JSON file's content, validated before it is pushed."""
    if path is None:
        return None
    import orjson

    from sidecar import contract

    try:
        doc = orjson.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactRefused("manifest", f"cannot read the data contract {path}: {exc}") from None
    try:
        contract.parse(doc, path)
    except ModelLoadError as exc:
        raise ArtifactRefused("manifest", str(exc)) from None
    return doc


__all__ = [
    "DirectoryStore",
    "S3Store",
    "Store",
    "VersionInfo",
    "data_contract_from",
    "list_versions",
    "open_store",
    "pull",
    "push",
    "seal",
    "sign",
]
