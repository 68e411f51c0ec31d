"""System shared memory (the OIP/KServe v2 / Triton extension): regions a co-located client registers.

A client creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a named region of it
(``key``, ``offset``, ``byte_size``), then sends inputs by reference (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset`` in a tensor's parameters) and may ask for an
output to be written into a region instead of the response. ``Regions`` holds the registered
regions; ``protocol`` and ``grpc_service`` call ``read`` and ``write``; the server's routes call
``register``, ``status`` and ``unregister``.

Security: a region lets a caller make the sidecar read and write any shared-memory object its user
can open. So the extension is off unless ``--shared-memory`` is given (every call then answers 403
``shared_memory_disabled``), it refuses requests that came through the gateway (they carry the
processor's ``x-cohortgate-cluster``; the gateway itself refuses these paths too, see
``cohortgate.core.contract.sidecar_local_only``), keys are plain names inside ``/dev/shm`` (no
other ``/``, opened with ``O_NOFOLLOW``, regular files only), and at most ``max_regions`` are held.

Copies: an input is copied out of the mapping once, when the request is decoded. Reading it in
place (``np.frombuffer`` on the mapping) would save that copy, but the client could then change the
tensor after the data contract checked it and before onnxruntime (or the batcher's concatenation)
read it, and the copy is one ``memcpy`` against a JSON parse or a socket read. Outputs are written
into the region once, after inference. Before each access the object's size is checked again
(``fstat``), so a client that shrank its object gets an error rather than a SIGBUS; a client that
shrinks it during the copy itself can still crash the sidecar, one more reason the extension is for
trusted, co-located clients only.

Errors (each a ``SidecarError`` with a stable ``code`` beside ``error``):

    SharedMemoryError (mixin: code, region)
    ├── SharedMemoryDisabled   403  shared_memory_disabled    off, or the request came through the gateway
    ├── RegionNotFound         404  shared_memory_not_found   no region of that name
    ├── RegionExists           409  shared_memory_exists      a region of that name is registered
    ├── RegionInvalid          400  shared_memory_invalid     bad key/offset/size, object missing or too small
    ├── RegionOutOfBounds      400  shared_memory_bounds      a tensor's bytes do not fit its region
    └── TooManyRegions         400  shared_memory_too_many    over ``max_regions``
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sidecar.errors import BadRequest, NotFound, SidecarError

SHM_DIR = "/dev/shm"
DEFAULT_MAX_REGIONS = 64
EXTENSION = "system_shared_memory"
#: The tensor parameters of the extension.
PARAM_REGION = "shared_memory_region"
PARAM_BYTE_SIZE = "shared_memory_byte_size"
PARAM_OFFSET = "shared_memory_offset"
PARAMS = (PARAM_REGION, PARAM_BYTE_SIZE, PARAM_OFFSET)


class SharedMemoryError(SidecarError):
    code = "shared_memory"

    def __init__(self, message: str, region: str = "") -> None:
        super().__init__(message)
        self.region = region

    @property
    def details(self) -> dict[str, str]:
        return {"code": self.code, "region": self.region} if self.region else {"code": self.code}


class SharedMemoryDisabled(SharedMemoryError):
    status = 403
    code = "shared_memory_disabled"


class RegionNotFound(SharedMemoryError, NotFound):
    status = 404
    code = "shared_memory_not_found"


class RegionExists(SharedMemoryError):
    status = 409
    code = "shared_memory_exists"


class RegionInvalid(SharedMemoryError, BadRequest):
    status = 400
    code = "shared_memory_invalid"


class RegionOutOfBounds(SharedMemoryError, BadRequest):
    status = 400
    code = "shared_memory_bounds"


class TooManyRegions(SharedMemoryError, BadRequest):
    status = 400
    code = "shared_memory_too_many"


OFF_SENTENCE = "system shared memory is off on this sidecar; start it with --shared-memory (co-located clients only)"
VIA_GATEWAY_SENTENCE = "system shared memory is only for clients on the sidecar's host, never through the gateway"


@dataclass(frozen=True, slots=True)
class Reference:
    """A tensor's place in a region, as its parameters give it."""

    region: str
    byte_size: int
    offset: int = 0


def reference(parameters: Any, tensor: str) -> Reference | None:
    """The shared-memory reference in a tensor's parameters (a plain dict), or None; ``BadRequest`` if malformed."""
    if type(parameters) is not dict or (PARAM_REGION not in parameters and PARAM_BYTE_SIZE not in parameters):
        return None
    return checked_reference(
        tensor, parameters.get(PARAM_REGION), parameters.get(PARAM_BYTE_SIZE), parameters.get(PARAM_OFFSET, 0)
    )


def checked_reference(tensor: str, region: Any, byte_size: Any, offset: Any) -> Reference:
    if type(region) is not str or not region:
        raise RegionInvalid(f"{tensor}: {PARAM_REGION} must be a region name and comes with {PARAM_BYTE_SIZE}")
    if type(byte_size) is not int or byte_size < 0:
        raise RegionInvalid(
            f"{tensor}: {PARAM_BYTE_SIZE} must be a non-negative integer and comes with {PARAM_REGION}", region
        )
    if type(offset) is not int or offset < 0:
        raise RegionInvalid(f"{tensor}: {PARAM_OFFSET} must be a non-negative integer", region)
    return Reference(region, byte_size, offset)


class _Region:
    """One registered region: the object's descriptor (for ``fstat``) and a mapping of its bytes."""

    __slots__ = ("_fd", "_map", "_view", "byte_size", "key", "name", "offset")

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = os.path.join(SHM_DIR, _file_name(name, key))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            message = f"region '{name}': cannot open shared memory key {key!r}: {exc.strerror}"
            raise RegionInvalid(message, name) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionInvalid(f"region '{name}': key {key!r} is not a shared memory object", name)
            if offset + byte_size > info.st_size:
                raise RegionInvalid(
                    f"region '{name}': offset {offset} + byte_size {byte_size} runs past the end of key {key!r} "
                    f"({info.st_size} bytes)",
                    name,
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap's offset must be page-aligned
            self._map = mmap.mmap(fd, offset + byte_size - start, offset=start) if byte_size else None
            self._view = memoryview(self._map)[offset - start :] if self._map is not None else memoryview(b"")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def span(self, ref: Reference, tensor: str) -> memoryview:
        """The bytes ``ref`` names, after checking they lie inside the region and the object still holds them."""
        if ref.offset + ref.byte_size > self.byte_size:
            raise RegionOutOfBounds(
                f"{tensor}: offset {ref.offset} + byte_size {ref.byte_size} runs past the end of region "
                f"'{self.name}' ({self.byte_size} bytes)",
                self.name,
            )
        if os.fstat(self._fd).st_size < self.offset + self.byte_size:
            raise RegionInvalid(f"region '{self.name}': its shared memory object {self.key!r} has shrunk", self.name)
        return self._view[ref.offset : ref.offset + ref.byte_size]

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a tensor still views it: unmapped when that goes
                self._map.close()
        os.close(self._fd)


def _file_name(name: str, key: str) -> str:
    """``/dev/shm``'s name for a key: leading slashes dropped (as ``shm_open`` does), nothing else."""
    bare = key.lstrip("/") if type(key) is str else ""
    if not bare or "/" in bare or "\0" in bare or bare in (".", ".."):
        raise RegionInvalid(f"region '{name}': key must be a shared memory name such as '/my_key', got {key!r}", name)
    return bare


class Regions:
    """The registered regions of one sidecar. ``enabled`` False: every call answers 403."""

    def __init__(self, enabled: bool = False, max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()  # REST and gRPC share one loop today; the lock costs nothing

    def _check(self) -> None:
        if not self.enabled:
            raise SharedMemoryDisabled(OFF_SENTENCE)

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        self._check()
        if not name:
            raise RegionInvalid("a region needs a name")
        if type(offset) is not int or offset < 0:
            raise RegionInvalid(f"region '{name}': offset must be a non-negative integer, got {offset!r}", name)
        if type(byte_size) is not int or byte_size < 0:
            raise RegionInvalid(f"region '{name}': byte_size must be a non-negative integer, got {byte_size!r}", name)
        with self._lock:
            if name in self._regions:
                raise RegionExists(f"shared memory region '{name}' is already registered", name)
            if len(self._regions) >= self.max_regions:
                raise TooManyRegions(
                    f"this sidecar holds at most {self.max_regions} shared memory regions; unregister one first", name
                )
            self._regions[name] = _Region(name, key, offset, byte_size)

    def status(self, name: str = "") -> list[dict[str, Any]]:
        self._check()
        if name:
            return [self._get(name).status()]
        return [r.status() for r in self._regions.values()]

    def unregister(self, name: str = "") -> None:
        """Unregister ``name``, or every region when empty."""
        self._check()
        with self._lock:
            if name:
                self._get(name)
                self._regions.pop(name).close()
            else:
                self._close_all()

    def close(self) -> None:
        """Unregister everything (shutdown); works when disabled too."""
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        regions, self._regions = self._regions, {}
        for region in regions.values():
            region.close()

    def _get(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"no shared memory region '{name}' is registered", name)
        return region

    # Tensors -------------------------------------------------------------------------------
    def check(self, ref: Reference, tensor: str) -> None:
        """Before inference: the region of an output exists and holds ``ref``'s bytes."""
        self._check()
        self._get(ref.region).span(ref, tensor)

    def read(self, ref: Reference, tensor: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the input ``ref`` names, as ``dtype`` and ``shape`` (whose size must be exactly ``byte_size``)."""
        self._check()
        needed = math.prod(shape) * dtype.itemsize
        if ref.byte_size != needed:
            raise RegionOutOfBounds(
                f"input '{tensor}': {PARAM_BYTE_SIZE} is {ref.byte_size} but {format_dims(shape)} of "
                f"{dtype.name} needs {needed} bytes",
                ref.region,
            )
        span = self._get(ref.region).span(ref, f"input '{tensor}'")
        return np.frombuffer(span, dtype).reshape(shape).copy()

    def write(self, ref: Reference, tensor: str, array: np.ndarray) -> int:
        """Write ``array``'s bytes at ``ref``; the number written (``byte_size`` must hold them)."""
        self._check()
        raw = np.ascontiguousarray(array)
        if raw.nbytes > ref.byte_size:
            raise RegionOutOfBounds(
                f"output '{tensor}': {PARAM_BYTE_SIZE} is {ref.byte_size} but the output "
                f"{format_dims(raw.shape)} of {raw.dtype.name} needs {raw.nbytes} bytes",
                ref.region,
            )
        span = self._get(ref.region).span(Reference(ref.region, raw.nbytes, ref.offset), f"output '{tensor}'")
        span[:] = memoryview(raw).cast("B")
        return raw.nbytes


def format_dims(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class TensorStore(Protocol):
    """Where tensors sent by reference live: ``Regions``, or ``OFF``/``VIA_GATEWAY`` (which refuse)."""

    def check(self, ref: Reference, tensor: str) -> None: ...

    def read(self, ref: Reference, tensor: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray: ...

    def write(self, ref: Reference, tensor: str, array: np.ndarray) -> int: ...


class _Refusing:
    """What a request may not use: every shared-memory access answers 403 (off, or via the gateway)."""

    def __init__(self, sentence: str) -> None:
        self._sentence = sentence

    def check(self, ref: Reference, tensor: str) -> None:
        raise SharedMemoryDisabled(self._sentence, ref.region)

    def read(self, ref: Reference, tensor: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        raise SharedMemoryDisabled(self._sentence, ref.region)

    def write(self, ref: Reference, tensor: str, array: np.ndarray) -> int:
        raise SharedMemoryDisabled(self._sentence, ref.region)


OFF: TensorStore = _Refusing(OFF_SENTENCE)
VIA_GATEWAY: TensorStore = _Refusing(VIA_GATEWAY_SENTENCE)
