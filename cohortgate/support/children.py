"""Child processes a supervisor starts with ``python -m MODULE``: hand-over and parent watch.

The parent writes the child's settings, pickled and length-prefixed, to the child's stdin and keeps
the pipe open; the child reads them once, then watches the pipe: when it closes (the parent died,
even by SIGKILL) the child sends itself SIGTERM and drains as if told to stop. So a child never
outlives its supervisor. (`gateway.workers` does the same by hand; this is the shared form.)
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import threading
from typing import Any

_LENGTH = struct.Struct(">I")
_STDIN = 0


def handoff(settings: Any) -> bytes:
    """What the parent writes to a child's stdin (and then leaves open)."""
    payload = pickle.dumps(settings)
    return _LENGTH.pack(len(payload)) + payload


def _read_exactly(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(_STDIN, n - len(data))
        if not chunk:
            raise EOFError("the parent closed the pipe before its hand-over was complete")
        data += chunk
    return data


def receive() -> Any:
    """In the child: read the parent's hand-over from stdin (pickle from our own parent only)."""
    (size,) = _LENGTH.unpack(_read_exactly(_LENGTH.size))
    return pickle.loads(_read_exactly(size))


def exit_with_parent() -> None:
    """In the child: SIGTERM ourselves when the parent's stdin pipe closes (a watch thread).

    It reads the raw descriptor, never ``sys.stdin``: a daemon thread blocked inside the buffered
    reader holds its lock, and the interpreter aborts at exit when it cannot take that lock."""

    def watch() -> None:
        while os.read(_STDIN, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cohortgate-parent-watch", daemon=True).start()
