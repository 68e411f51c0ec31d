"""Envelope encryption of a model artifact at rest: AES-256-GCM under a random data key, the data
key wrapped by a key-encryption key (KEK) that never touches the artifact.

A sealed artifact is one self-describing file, so it can replace ``model.onnx`` in place:

    b"CGSEAL1\\n" | header length (4 bytes, big-endian) | header JSON | ciphertext + GCM tag

The header names the algorithm, the KEK source kind and id, the wrapped data key and the nonce; it
is the GCM associated data, so editing it breaks the tag. ONNX files are protobuf and never start
with the magic, so the loader tells sealed from plain by the first bytes.

KEK sources (``--kek SPEC``):

* ``file:PATH`` — 32 raw bytes or their base64;
* ``env:NAME`` — base64 of 32 bytes in an environment variable;
* ``cmd:COMMAND`` — a KMS hook: ``COMMAND wrap`` / ``COMMAND unwrap`` read base64 on stdin and
  write base64 on stdout, so the KEK can stay inside a KMS (``aws kms encrypt``, Vault transit…).

Local KEKs wrap with AES key wrap (RFC 3394, ``cryptography``'s ``aes_key_wrap``). The plaintext
only ever exists in memory: ``unseal`` returns bytes, which onnxruntime accepts directly. One GCM
message is limited to under 2 GiB by ``cryptography``; larger models would need chunked sealing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shlex
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from cohortgate.core.contract import SEALED_ARTIFACT_MAGIC
from sidecar.errors import ArtifactRefused

MAGIC = SEALED_ARTIFACT_MAGIC
ALG = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
KMS_TIMEOUT_S = 30.0


def is_sealed(blob: bytes | memoryview) -> bool:
    return bytes(blob[: len(MAGIC)]) == MAGIC


@dataclass(frozen=True, slots=True)
class Kek:
    """A key-encryption key: local bytes (file/env) or a KMS command. Never in reprs or logs."""

    kind: str  # "file" | "env" | "cmd"
    source: str  # the path, variable name or command (no secret)
    key: bytes | None = field(default=None, repr=False)

    @property
    def key_id(self) -> str:
        """Which KEK sealed an artifact, so a wrong key is named, not just refused."""
        if self.key is not None:
            return hashlib.sha256(b"cohortgate-kek" + self.key).hexdigest()[:16]
        return "cmd"

    def wrap(self, data_key: bytes) -> bytes:
        if self.key is not None:
            return aes_key_wrap(self.key, data_key)
        return self._kms("wrap", data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        if self.key is not None:
            try:
                return aes_key_unwrap(self.key, wrapped)
            except InvalidUnwrap:
                raise ArtifactRefused(
                    "decrypt", f"the key-encryption key ({self.kind}:{self.source}) is wrong"
                ) from None
        return self._kms("unwrap", wrapped)

    def _kms(self, action: str, data: bytes) -> bytes:
        argv = [*shlex.split(self.source), action]
        try:
            done = subprocess.run(
                argv, input=base64.b64encode(data), capture_output=True, timeout=KMS_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ArtifactRefused("decrypt", f"the KMS command {argv[0]} failed to run: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:200]
            raise ArtifactRefused("decrypt", f"the KMS command {argv[0]} {action} exited {done.returncode}: {last}")
        try:
            out = base64.b64decode(done.stdout.strip(), validate=True)
        except binascii.Error:
            raise ArtifactRefused("decrypt", f"the KMS command {argv[0]} {action} printed no base64") from None
        return out


def _decode_key(text: bytes, where: str) -> bytes:
    if len(text) == KEY_BYTES:
        return text
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise ArtifactRefused("key", f"{where} must hold {KEY_BYTES} bytes (raw or base64)")
    return key


def load_kek(spec: str) -> Kek:
    """``file:PATH``, ``env:NAME`` or ``cmd:COMMAND``."""
    kind, _, source = spec.partition(":")
    if not source or kind not in ("file", "env", "cmd"):
        raise ArtifactRefused("key", f"a key-encryption key is file:PATH, env:NAME or cmd:COMMAND, not {spec!r}")
    if kind == "file":
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise ArtifactRefused("key", f"cannot read the key-encryption key {source}: {exc.strerror}") from None
        return Kek(kind, source, _decode_key(raw, f"key file {source}"))
    if kind == "env":
        value = os.environ.get(source)
        if not value:
            raise ArtifactRefused("key", f"environment variable {source} (the key-encryption key) is not set")
        return Kek(kind, source, _decode_key(value.encode(), f"environment variable {source}"))
    return Kek(kind, source)


def new_kek() -> bytes:
    """A fresh KEK as base64 text, for ``cohortgate models keygen --kek``."""
    return base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"


def seal(plaintext: bytes, kek: Kek) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    header = orjson.dumps(
        {
            "alg": ALG,
            "kek": kek.kind,
            "kek_id": kek.key_id,
            "wrapped_key": base64.b64encode(kek.wrap(data_key)).decode(),
            "nonce": base64.b64encode(nonce).decode(),
        }
    )
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, header)
    return b"".join((MAGIC, struct.pack(">I", len(header)), header, ciphertext))


def unseal(blob: bytes, kek: Kek | None, where: str = "the artifact") -> bytes:
    """The plaintext, in memory; ``ArtifactRefused`` for a wrong key or a tampered file."""
    if not is_sealed(blob):
        raise ArtifactRefused("decrypt", f"{where} is not sealed")
    if kek is None:
        raise ArtifactRefused("decrypt", f"{where} is sealed: give the key-encryption key (--kek file:|env:|cmd:)")
    view = memoryview(blob)
    try:
        (length,) = struct.unpack(">I", view[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header_bytes = bytes(view[start : start + length])
        header = orjson.loads(header_bytes)
        if header.get("alg") != ALG:
            raise ValueError(f"alg {header.get('alg')!r}")
        wrapped = base64.b64decode(header["wrapped_key"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactRefused("decrypt", f"{where} has a malformed seal header: {exc}") from None
    if kek.key is not None and header.get("kek_id") not in (None, kek.key_id):
        raise ArtifactRefused(
            "decrypt",
            f"{where} was sealed under key-encryption key {header.get('kek_id')}, "
            f"but {kek.kind}:{kek.source} is {kek.key_id}",
        )
    data_key = kek.unwrap(wrapped)
    if len(data_key) != KEY_BYTES:
        raise ArtifactRefused("decrypt", f"{where}: the unwrapped data key has {len(data_key)} bytes, not {KEY_BYTES}")
    try:
        return AESGCM(data_key).decrypt(nonce, view[start + length :], header_bytes)
    except InvalidTag:
        raise ArtifactRefused("decrypt", f"{where} does not decrypt: wrong key, or the file was altered") from None
