"""Model references: where an artifact lives, which bytes it must be, and who vouched for them.

A reference is what a policy's ``model:`` and the sidecar's ``--model`` hold:

* ``models/x.onnx`` — a plain local path, loaded as before (no pin, no signature; refused when
  trusted keys are set);
* ``file:///abs/x.onnx@sha256:<hex>``, ``https://host/x.onnx@sha256:<hex>``,
  ``s3://bucket/key/x.onnx@sha256:<hex>`` — one artifact, pinned by the SHA-256 of the model bytes;
* ``file:///store/NAME/VERSION``, ``https://…/NAME/VERSION``, ``s3://bucket/prefix/NAME/VERSION`` —
  a *version* in the layout ``cohortgate models push`` writes (``model.onnx``, ``manifest.json``,
  ``manifest.json.sig``). It must be pinned (``@sha256:`` of the model) or signed by a trusted key;
  the manifest's name and version must match the path, so a signed old version cannot be replayed
  under a new version's name.

Every digest is checked on the exact bytes handed to onnxruntime (after decryption, for a sealed
artifact), in memory, so nothing can change between the check and the load. Remote artifacts are
fetched into a content-addressed cache (``write_atomic``; sealed artifacts stay sealed there), each
capped at ``max_bytes``; the cache as a whole is trimmed to ``cache_bytes``, oldest first.

Parsing and checking are pure functions; ``read_blob`` and ``ArtifactCache`` are the I/O shell.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cohortgate.support.files import write_atomic
from sidecar import sealing, signing
from sidecar.errors import ArtifactRefused

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
ARTIFACT = "model.onnx"
ARTIFACT_SUFFIXES = (".onnx", ".sealed")
MANIFEST_FORMAT = "cohortgate.model/v1"
DEFAULT_MAX_BYTES = 4 * 1024**3  # one artifact
DEFAULT_CACHE_BYTES = 20 * 1024**3  # the whole cache
SCHEMES = ("file", "https", "http", "s3")
HTTP_TIMEOUT_S = 60.0
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PIN = "@sha256:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sha256(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def valid_name(text: str) -> bool:
    """Names and versions are single path segments, so a layout key can never climb out."""
    return bool(_NAME.match(text)) and text not in (".", "..")


# --------------------------------------------------------------------------- references (pure)


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed ``--model``: ``url`` without its pin; ``scheme`` is ``path`` for a plain path."""

    url: str
    scheme: str
    digest: str | None  # "sha256:<hex>" when pinned

    @property
    def is_version(self) -> bool:
        """A version directory of the push layout, not a single file (``*.onnx``, ``*.sealed``)."""
        if self.scheme == "path":
            return False
        last = urllib.parse.urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]
        return not last.endswith(ARTIFACT_SUFFIXES)

    @property
    def name_version(self) -> tuple[str, str] | None:
        if not self.is_version:
            return None
        parts = urllib.parse.urlsplit(self.url).path.rstrip("/").split("/")
        if len(parts) < 2:
            return None
        return parts[-2], parts[-1]

    def child(self, leaf: str) -> str:
        return self.url.rstrip("/") + "/" + leaf

    def __str__(self) -> str:
        return self.url + (_PIN + self.digest[len("sha256:") :] if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Split a reference into URL, scheme and pin; ``ArtifactRefused('reference')`` when malformed."""
    text = text.strip()
    digest = None
    if _PIN in text:
        text, _, hexdigest = text.rpartition(_PIN)
        digest = "sha256:" + hexdigest.lower()
        if not _DIGEST.match(digest):
            raise ArtifactRefused("reference", f"the pinned digest sha256:{hexdigest} is not 64 hex digits")
    if not text:
        raise ArtifactRefused("reference", "the model reference is empty")
    if "://" not in text:
        return Reference(text, "path", digest)
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ArtifactRefused("reference", f"model references are file://, https:// or s3:// URLs, not {scheme}://")
    if scheme == "http" and not _loopback(parts.hostname):
        raise ArtifactRefused(
            "reference", f"plain http:// is allowed to loopback only; use https:// for {parts.hostname}"
        )
    if scheme == "s3" and not parts.netloc:
        raise ArtifactRefused("reference", f"{text}: an s3:// reference names a bucket: s3://BUCKET/KEY")
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise ArtifactRefused("reference", f"{text}: a file:// URL names a local path (file:///abs/path)")
    return Reference(text, scheme, digest)


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- manifests (pure)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` says about one version; the signature covers its exact bytes."""

    name: str
    version: str
    digest: str  # of the plaintext model.onnx
    size: int
    data_contract: Any = None  # the data contract (sidecar/contract.py), as pushed; the signature covers it
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "artifact": ARTIFACT,
            "digest": self.digest,
            "size": self.size,
            "data_contract": self.data_contract,
            "metadata": dict(self.metadata),
            "created": self.created,
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = orjson.loads(data)
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        manifest = Manifest(
            name=str(doc["name"]),
            version=str(doc["version"]),
            digest=str(doc["digest"]),
            size=int(doc["size"]),
            data_contract=doc.get("data_contract"),
            metadata=MappingProxyType(dict(doc.get("metadata") or {})),
            created=str(doc.get("created", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactRefused("manifest", f"{where}: the manifest is malformed: {exc}") from None
    if not _DIGEST.match(manifest.digest):
        raise ArtifactRefused("manifest", f"{where}: the manifest's digest {manifest.digest!r} is not sha256:<hex>")
    return manifest


def check_digest(data: bytes | memoryview, expected: str, where: str) -> str:
    actual = sha256(data)
    if actual != expected:
        raise ArtifactRefused("digest", f"{where}: digest mismatch: expected {expected}, got {actual}")
    return actual


# --------------------------------------------------------------------------- fetching (I/O)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could hand the artifact request to another host; pinned URLs are followed exactly."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def read_blob(url: str, max_bytes: int = DEFAULT_MAX_BYTES, *, missing_ok: bool = False) -> bytes | None:
    """The bytes at ``url`` (file, http(s), s3), at most ``max_bytes``; ``None`` when missing and allowed."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower() if "://" in url else "path"
    try:
        if scheme in ("path", "file"):
            path = Path(urllib.parse.unquote(parts.path) if scheme == "file" else url)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise ArtifactRefused("fetch", f"{url} does not exist") from None
            _cap(size, max_bytes, url)
            return path.read_bytes()
        if scheme in ("http", "https"):
            return _read_http(url, max_bytes, missing_ok)
        if scheme == "s3":
            return _read_s3(parts.netloc, parts.path.lstrip("/"), max_bytes, missing_ok, url)
    except OSError as exc:
        raise ArtifactRefused("fetch", f"cannot read {url}: {exc.strerror or exc}") from None
    raise ArtifactRefused("reference", f"cannot read {url}: unknown scheme {scheme}")


def _cap(size: int, max_bytes: int, url: str) -> None:
    if size > max_bytes:
        raise ArtifactRefused("size", f"{url} has {size} bytes; the limit is {max_bytes} (--model-max-bytes)")


def _read_http(url: str, max_bytes: int, missing_ok: bool) -> bytes | None:
    try:
        with _opener.open(url, timeout=HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length is not None:
                _cap(int(length), max_bytes, url)
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and missing_ok:
            return None
        raise ArtifactRefused("fetch", f"cannot fetch {url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise ArtifactRefused("fetch", f"cannot fetch {url}: {exc.reason}") from None
    _cap(len(data), max_bytes, url)
    return data


def s3_client():
    """A boto3 S3 client; the endpoint comes from ``AWS_ENDPOINT_URL(_S3)`` for S3-compatible stores."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ArtifactRefused("fetch", "s3:// references need boto3: pip install 'cohortgate[s3]'") from None
    return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def _read_s3(bucket: str, key: str, max_bytes: int, missing_ok: bool, url: str) -> bytes | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = s3_client().get_object(Bucket=bucket, Key=key)
        _cap(int(obj.get("ContentLength") or 0), max_bytes, url)
        data = obj["Body"].read(max_bytes + 1)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404") and missing_ok:
            return None
        raise ArtifactRefused("fetch", f"cannot fetch {url}: {code or exc}") from None
    except BotoCoreError as exc:
        raise ArtifactRefused("fetch", f"cannot fetch {url}: {exc}") from None
    _cap(len(data), max_bytes, url)
    return data


class ArtifactCache:
    """Remote artifacts by the digest of their model, as fetched (sealed ones stay sealed).

    A hit is checked again after reading (the loader always hashes what it loads), and a corrupt
    entry is dropped and fetched anew. Written with ``write_atomic``: a crash never leaves half a file
    under a digest's name. Trimmed to ``max_bytes`` in all, least recently used first.
    """

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def get(self, digest: str) -> bytes | None:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        os.utime(path)  # recently used
        return data

    def drop(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return  # larger than the whole cache: serve it, do not keep it
        write_atomic(self.path(digest), data, mode=0o600, dir_mode=0o700)
        self._trim(keep=self.path(digest))

    def _trim(self, keep: Path) -> None:
        entries = []
        for entry in self.root.glob("sha256-*"):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cohortgate" / "models"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class Artifact:
    """Model bytes that passed every check, and what they are (for headers, metrics and audit)."""

    model: bytes = field(repr=False)
    digest: str
    reference: str
    version: str | None = None  # "NAME/VERSION" from a manifest
    signed_by: str | None = None  # the trusted key's id
    sealed: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds: fetch, verify, decrypt
    data_contract: Any = None  # the manifest's data contract (sidecar/contract.py), covered by its signature

    @property
    def label(self) -> str:
        """The served version for a response header: ``NAME/VERSION`` or the short digest."""
        return self.version or self.digest[: len("sha256:") + 12]


def load_artifact(
    text: str,
    *,
    trusted_keys: Sequence[signing.TrustedKey] = (),
    kek: sealing.Kek | None = None,
    cache: ArtifactCache | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Artifact:
    """Fetch, verify and (if sealed) decrypt one reference; ``ArtifactRefused`` says which check failed."""
    ref = parse_reference(text)
    expected: str | None  # the model's digest, when anything pins it
    timings: dict[str, float] = {}
    version = signed_by = None
    data_contract: Any = None
    started = time.perf_counter()
    if ref.is_version:
        where = str(ref.url)
        manifest_bytes = read_blob(ref.child(MANIFEST), 1024 * 1024)
        assert manifest_bytes is not None
        signature = read_blob(ref.child(SIGNATURE), 64 * 1024, missing_ok=True)
        timings["fetch"] = time.perf_counter() - started
        t = time.perf_counter()
        if trusted_keys:
            signed_by = signing.verify(manifest_bytes, signature, trusted_keys, where).key_id
        elif ref.digest is None:
            raise ArtifactRefused(
                "unsigned", f"{where}: a version reference needs a pinned digest (@sha256:…) or a trusted key"
            )
        manifest = parse_manifest(manifest_bytes, where)
        expected_nv = ref.name_version
        if expected_nv is not None and (manifest.name, manifest.version) != expected_nv:
            raise ArtifactRefused(
                "manifest",
                f"{where}: the manifest describes {manifest.name}/{manifest.version}, not {'/'.join(expected_nv)}",
            )
        if ref.digest is not None and ref.digest != manifest.digest:
            raise ArtifactRefused(
                "digest", f"{where}: digest mismatch: pinned {ref.digest}, manifest {manifest.digest}"
            )
        timings["verify"] = time.perf_counter() - t
        expected = manifest.digest
        version = f"{manifest.name}/{manifest.version}"
        data_contract = manifest.data_contract
        blob_url = ref.child(ARTIFACT)
        _cap(manifest.size, max_bytes, blob_url)
    else:
        where = ref.url
        if trusted_keys:
            raise ArtifactRefused(
                "unsigned",
                f"{where} is a bare artifact, which carries no signature, and trusted keys are set: "
                "serve a signed version (cohortgate models push + sign)",
            )
        if ref.digest is None and ref.scheme != "path":
            raise ArtifactRefused("unsigned", f"{where}: a URL reference needs a pinned digest (@sha256:…)")
        expected = ref.digest
        blob_url = ref.url
    remote = cache is not None and expected is not None and ref.scheme not in ("path", "file")
    try:
        blob, digest, sealed = _fetch_and_check(blob_url, expected, kek, cache if remote else None, max_bytes, timings)
    except ArtifactRefused as exc:
        if not (remote and exc.reason in ("digest", "decrypt")):
            raise
        # A corrupt or tampered cache entry is not kept, and the artifact is fetched anew, once.
        cache.drop(expected)  # type: ignore[union-attr, arg-type]
        blob, digest, sealed = _fetch_and_check(blob_url, expected, kek, cache, max_bytes, timings)
    return Artifact(blob, digest, str(ref), version, signed_by, sealed, MappingProxyType(timings), data_contract)


def _fetch_and_check(
    url: str,
    expected: str | None,
    kek: sealing.Kek | None,
    cache: ArtifactCache | None,
    max_bytes: int,
    timings: dict[str, float],
) -> tuple[bytes, str, bool]:
    """(plain model bytes, their digest, whether they were sealed); with ``cache``, hits come from it and
    fetched artifacts go into it."""
    t = time.perf_counter()
    raw = cache.get(expected) if cache is not None and expected is not None else None
    from_cache = raw is not None
    if raw is None:
        raw = read_blob(url, max_bytes)
        assert raw is not None
    timings["fetch"] = timings.get("fetch", 0.0) + time.perf_counter() - t
    sealed = sealing.is_sealed(raw)
    blob = raw
    if sealed:
        t = time.perf_counter()
        blob = sealing.unseal(raw, kek, url)
        timings["decrypt"] = timings.get("decrypt", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    digest = check_digest(blob, expected, url) if expected else sha256(blob)
    timings["verify"] = timings.get("verify", 0.0) + time.perf_counter() - t
    if cache is not None and expected is not None and not from_cache:
        cache.put(expected, raw)  # only what verified (sealed artifacts stay sealed in the cache)
    return blob, digest, sealed


# --------------------------------------------------------------------------- metrics


class ArtifactMetrics:
    """A prometheus collector for the model supply chain of one sidecar."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.refused: Counter[str] = Counter()  # by reason
        self.served: Artifact | None = None
        self.swaps: Counter[str] = Counter()  # by outcome

    def collect(self) -> Iterator:
        prefix = "cohortgate_sidecar_model"
        refused = CounterMetricFamily(
            f"{prefix}_refused",
            "Model artifacts refused by a supply-chain check, by reason (digest, signature, unsigned, decrypt, …).",
            labels=["model", "reason"],
        )
        for reason, count in sorted(self.refused.items()):
            refused.add_metric([self.model, reason], count)
        yield refused
        swaps = CounterMetricFamily(
            f"{prefix}_swaps", "Live model swaps, by outcome (swapped, refused).", labels=["model", "outcome"]
        )
        for outcome, count in sorted(self.swaps.items()):
            swaps.add_metric([self.model, outcome], count)
        yield swaps
        if self.served is not None:
            a = self.served
            info = GaugeMetricFamily(
                f"{prefix}_info",
                "1 for the artifact being served: its version, digest and whether it was signed and sealed.",
                labels=["model", "version", "digest", "signed", "sealed"],
            )
            info.add_metric(
                [self.model, a.label, a.digest, str(a.signed_by is not None).lower(), str(a.sealed).lower()], 1
            )
            yield info
            seconds = GaugeMetricFamily(
                f"{prefix}_load_seconds",
                "Time the served artifact took to load, by stage (fetch, verify, decrypt, session, warm_up).",
                labels=["model", "stage"],
            )
            for stage, value in sorted(a.timings.items()):
                seconds.add_metric([self.model, stage], value)
            yield seconds
