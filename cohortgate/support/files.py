"""Atomic file writes and cheap change detection, shared by every process that writes or follows a file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortgate.core.contract import POLL_FILES_ENV

EVENT_STEP_MS = 10  # an event batch is handed over once the OS was quiet this long
EVENT_DEBOUNCE_MS = 200  # ...or after this long at most, while events keep coming


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


def _watch_filter(path: Path) -> Any:
    """Only events on ``path`` itself: the directory is watched (an atomic write replaces the inode,
    so a watch on the file would die with the first rename-over), its other files are noise."""
    target = str(path)
    return lambda _change, name: name == target


def _inotify_usable(path: Path) -> bool:
    """watchfiles (inotify / FSEvents / ReadDirectoryChanges, via Rust ``notify``) installed, and the
    directory there to watch; otherwise the caller polls."""
    if os.environ.get(POLL_FILES_ENV):
        return False
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return False
    return path.parent.is_dir()


async def changes(path: Path | str, interval_s: float, since: FileStamp | None = None) -> AsyncIterator[FileStamp]:
    """Yield the file's new stamp each time it changes (a missing file is no change, so a
    rename-in-progress never triggers). ``interval_s <= 0`` yields nothing: SIGHUP only.

    With `watchfiles` the OS tells us (an edit is seen within ~``EVENT_STEP_MS``), and ``interval_s``
    is only the safety-net ``stat``; without it, or when the watch cannot start, we poll every ``interval_s``.
    """
    path = Path(path)
    last = since if since is not None else FileStamp.of(path)
    if interval_s <= 0:
        return
    if _inotify_usable(path):
        import watchfiles

        try:
            async for _batch in watchfiles.awatch(
                path.parent,
                watch_filter=_watch_filter(path),
                debounce=EVENT_DEBOUNCE_MS,
                step=EVENT_STEP_MS,
                rust_timeout=max(1, int(interval_s * 1000)),
                yield_on_timeout=True,  # an empty batch every interval_s: the safety-net stat
                recursive=False,
            ):
                stamp = FileStamp.of(path)
                if stamp is not None and stamp != last:
                    last = stamp
                    yield stamp
            return
        except OSError:  # e.g. the inotify watch limit, or the directory went away: poll instead
            pass
    while True:
        await asyncio.sleep(interval_s)
        stamp = FileStamp.of(path)
        if stamp is not None and stamp != last:
            last = stamp
            yield stamp


def watch(
    path: Path | str, interval_s: float, stop: threading.Event, since: FileStamp | None = None
) -> Iterator[FileStamp]:
    """`changes` for a thread (`cohortgate up` is synchronous): the same stamps, until ``stop`` is set."""
    path = Path(path)
    last = since if since is not None else FileStamp.of(path)
    if interval_s <= 0:
        return
    if _inotify_usable(path):
        import watchfiles

        try:
            for _batch in watchfiles.watch(
                path.parent,
                watch_filter=_watch_filter(path),
                debounce=EVENT_DEBOUNCE_MS,
                step=EVENT_STEP_MS,
                rust_timeout=max(1, int(interval_s * 1000)),
                yield_on_timeout=True,
                recursive=False,
                stop_event=stop,
                raise_interrupt=False,
            ):
                stamp = FileStamp.of(path)
                if stamp is not None and stamp != last:
                    last = stamp
                    yield stamp
            return
        except OSError:
            pass
    while not stop.wait(interval_s):
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
