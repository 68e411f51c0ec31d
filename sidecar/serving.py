"""Load one model reference into a warmed-up session: the blocking half of a load or a live swap.

Runs in the executor thread the new model will use, so a swap never stalls the model being served.
The verified bytes are handed to onnxruntime and dropped once the session exists: the artifact kept
for headers, metrics and audit carries no model bytes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from sidecar import artifacts, sealing, signing
from sidecar.model import OnnxModel


class LoadSettings(Protocol):
    """The parts of ``SidecarConfig`` a load needs."""

    @property
    def device(self) -> str: ...
    @property
    def intra_op_threads(self) -> int | None: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def trusted_keys(self) -> tuple[str, ...]: ...
    @property
    def kek(self) -> str | None: ...
    @property
    def model_cache_dir(self) -> str | None: ...
    @property
    def model_max_bytes(self) -> int: ...


def model_name(reference: str) -> str:
    """The OIP model name a reference implies: a version's NAME, else the file's stem."""
    try:
        ref = artifacts.parse_reference(reference)
    except artifacts.ArtifactRefused:
        return Path(reference).stem
    nv = ref.name_version
    if nv is not None:
        return nv[0]
    return Path(ref.url.rstrip("/").rsplit("/", 1)[-1]).stem


def load_model(settings: LoadSettings, reference: str, name: str) -> tuple[OnnxModel, artifacts.Artifact]:
    """Fetch, verify, decrypt (in memory), create the session and warm it up."""
    trusted = tuple(signing.load_trusted_key(spec) for spec in settings.trusted_keys)
    kek = sealing.load_kek(settings.kek) if settings.kek else None
    cache = artifacts.ArtifactCache(settings.model_cache_dir or artifacts.default_cache_dir())
    artifact = artifacts.load_artifact(
        reference, trusted_keys=trusted, kek=kek, cache=cache, max_bytes=settings.model_max_bytes
    )
    timings = dict(artifact.timings)
    started = time.perf_counter()
    model = OnnxModel(
        artifacts.parse_reference(reference).url,
        name,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        model_bytes=artifact.model,
    )
    timings["session"] = time.perf_counter() - started
    started = time.perf_counter()
    model.warm_up(settings.max_batch_size if model.signature.batchable else 1)
    timings["warm_up"] = time.perf_counter() - started
    return model, dataclasses.replace(artifact, model=b"", timings=MappingProxyType(timings))
