"""Detached Ed25519 signatures over a model version's manifest.

Why Ed25519 with ``cryptography`` and not the OpenSSF ``model-signing`` package: model-signing 1.1
pulls in sigstore, tuf, in-toto and a dozen more packages, signs a directory tree through Sigstore's
bundle format, and its key-based mode still wants the whole serialisation stack; the sidecar's
image should not carry that to verify one 64-byte signature over one small JSON file. The manifest
already pins the artifact's SHA-256, so signing the manifest's exact bytes signs the model.

Formats (all text, so they travel in policies and environment variables):

* private key: PKCS#8 PEM, written 0600;
* public key: SubjectPublicKeyInfo PEM, or inline ``ed25519:<base64 of the 32 raw bytes>``;
* signature file (``manifest.json.sig``): ``{"alg": "ed25519", "key_id": ..., "signature": <b64>}``,
  where ``key_id`` is the first 16 hex digits of SHA-256 over the raw public key (a hint for the
  operator; verification tries every trusted key).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.errors import ArtifactRefused

ALG = "ed25519"
INLINE_PREFIX = "ed25519:"


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A public key the platform trusts, with the id its signatures carry."""

    key: Ed25519PublicKey
    key_id: str
    source: str  # where it came from, for messages (a path or "inline")

    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def inline(public: Ed25519PublicKey) -> str:
    """The ``ed25519:<base64>`` form, short enough for a policy file."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return INLINE_PREFIX + base64.b64encode(raw).decode()


def generate() -> tuple[bytes, bytes]:
    """A new key pair as (private PKCS#8 PEM, public PEM)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactRefused("key", f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactRefused("key", f"{path} is not an Ed25519 private key")
    return key


def load_trusted_key(spec: str) -> TrustedKey:
    """``ed25519:<base64>`` inline, else a path to a public-key PEM."""
    if spec.startswith(INLINE_PREFIX):
        try:
            raw = base64.b64decode(spec[len(INLINE_PREFIX) :], validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise ArtifactRefused("key", f"trusted key {spec[:20]}… is not 32 base64-encoded bytes: {exc}") from None
        return TrustedKey(key, key_id(key), "inline")
    try:
        loaded = serialization.load_pem_public_key(Path(spec).read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactRefused("key", f"cannot read the trusted key {spec}: {exc}") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ArtifactRefused("key", f"trusted key {spec} is not an Ed25519 public key")
    return TrustedKey(loaded, key_id(loaded), spec)


def sign(private: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """The signature file's bytes for these exact manifest bytes."""
    doc = {
        "alg": ALG,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(manifest)).decode(),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def verify(manifest: bytes, signature_file: bytes | None, trusted: Sequence[TrustedKey], where: str) -> TrustedKey:
    """The trusted key that signed ``manifest``; ``ArtifactRefused`` when none did."""
    if signature_file is None:
        raise ArtifactRefused("unsigned", f"{where} is not signed (no manifest.json.sig) and trusted keys are set")
    try:
        doc = orjson.loads(signature_file)
        if doc.get("alg") != ALG:
            raise ValueError(f"alg {doc.get('alg')!r}, expected {ALG!r}")
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactRefused("signature", f"{where}: the signature file is malformed: {exc}") from None
    for candidate in trusted:
        try:
            candidate.key.verify(signature, manifest)
        except InvalidSignature:
            continue
        return candidate
    ids = ", ".join(k.key_id for k in trusted) or "none"
    raise ArtifactRefused(
        "signature",
        f"{where}: the signature (key id {doc.get('key_id')}) does not verify with any trusted key ({ids})",
    )
