"""Atomic file writes and cheap change detection, shared by every process that writes or follows a file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path


def write_atomic(path: Path | str, data: bytes | str, mode: int = 0o644, dir_mode: int = 0o777) -> None:
    """Temp file in the same directory, fsync, exact mode, rename: readers (Envoy's directory watch, a
    gateway following the state file) see the old file or the new one, never half of one, even after a crash.

    The temp file is created 0600 (mkstemp), so a secret is never readable by others, even briefly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What a cheap ``stat`` says about a file; a different stamp means: read it again."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: Path | str) -> FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


async def changes(path: Path | str, interval_s: float, since: FileStamp | None = None) -> AsyncIterator[FileStamp]:
    """Yield the file's new stamp each time it changes (polled every ``interval_s``; a missing file is no
    change, so a rename-in-progress never triggers). ``interval_s <= 0`` yields nothing: SIGHUP only."""
    last = since if since is not None else FileStamp.of(path)
    while interval_s > 0:
        await asyncio.sleep(interval_s)
        stamp = FileStamp.of(path)
        if stamp is not None and stamp != last:
            last = stamp
            yield stamp


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Create files and sockets without group/other permissions from their first instant (0600 / 0700).

    Process-wide while it lasts: use it around a bind or a create at start-up, not on a request path.
    """
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)
