"""HTTP/2 flow control (RFC 9113 §5.2, §6.9): both windows in each direction, and WINDOW_UPDATE.

Receiving, we re-open a window in one WINDOW_UPDATE once half of it is used, so a peer that keeps
to its windows never stalls and we send one update per half window, not one per frame. Sending,
DATA that the peer's stream or connection window (or its max frame size) does not admit waits in
the stream's queue; the queues of all streams are bounded together, so a peer that never opens its
windows costs at most ``max_queued`` bytes before the connection gives up on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from gateway.h2 import frames as f
from gateway.h2.errors import ConnectionProtocolError, StreamProtocolError
from gateway.h2.frames import ErrorCode


class ReceiveWindow:
    """What the peer may still send us on the connection or on one stream, and its refill."""

    __slots__ = ("available", "size")

    def __init__(self, size: int, available: int) -> None:
        self.size = size  # what we re-open it to
        self.available = available

    def receive(self, n: int) -> int | None:
        """Count ``n`` received bytes (padding included): the WINDOW_UPDATE increment now due,
        0 while less than half the window is used, None if the peer overran the window."""
        available = self.available - n
        if available < 0:
            return None
        used = self.size - available
        if used >= self.size >> 1:
            self.available = self.size
            return used
        self.available = available
        return 0


class StreamFlow:
    """One stream's two windows and its DATA queued behind the send one (the stream class extends it)."""

    __slots__ = ("queued", "queued_bytes", "recv_window", "send_window", "sid")

    def __init__(self, sid: int, recv_window: int, send_window: int) -> None:
        self.sid = sid
        self.recv_window = ReceiveWindow(recv_window, recv_window)
        self.send_window = send_window
        self.queued: list[bytes] = []  # DATA payloads held back by flow control
        self.queued_bytes = 0


StreamT = TypeVar("StreamT", bound=StreamFlow)


class SendFlow(Generic[StreamT]):
    """The peer's side: its connection window, its initial stream window and max frame size, and
    the streams whose DATA waits for them (in the order they blocked)."""

    __slots__ = ("blocked", "initial_window", "max_frame", "max_queued", "queued_bytes", "window")

    def __init__(self, max_queued: int) -> None:
        self.window = f.DEFAULT_WINDOW
        self.initial_window = f.DEFAULT_WINDOW
        self.max_frame = f.DEFAULT_MAX_FRAME
        self.max_queued = max_queued
        self.queued_bytes = 0
        self.blocked: dict[int, StreamT] = {}

    def send(self, s: StreamT, data: bytes, out: list[bytes]) -> None:
        """One DATA payload for ``s``: framed into ``out`` now, as far as the windows allow, or queued."""
        n = len(data)
        if not s.queued and n <= s.send_window and n <= self.window and n <= self.max_frame:
            s.send_window -= n
            self.window -= n
            out.append(f.FRAME_HEADER.pack(n << 8 | f.DATA, 0, s.sid))
            out.append(data)
            return
        s.queued.append(data)
        s.queued_bytes += n
        self.queued_bytes += n
        self.blocked[s.sid] = s
        self.drain(s, out)
        if self.queued_bytes > self.max_queued:
            raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "peer does not open its windows")

    def drain(self, s: StreamT, out: list[bytes]) -> bool:
        """Frame as much of ``s``'s queue as the windows admit; True once the queue is empty."""
        queued = s.queued
        while queued:
            chunk = queued[0]
            n = min(len(chunk), s.send_window, self.window, self.max_frame)
            if n <= 0:
                return False
            out.append(f.FRAME_HEADER.pack(n << 8 | f.DATA, 0, s.sid))
            out.append(chunk[:n])
            s.send_window -= n
            self.window -= n
            s.queued_bytes -= n
            self.queued_bytes -= n
            if n == len(chunk):
                queued.pop(0)
            else:
                queued[0] = chunk[n:]
        del self.blocked[s.sid]
        return True

    def grow_connection(self, increment: int) -> None:
        """WINDOW_UPDATE on stream 0 (the caller then drains the blocked streams)."""
        if increment == 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "zero window increment")
        self.window += increment
        if self.window > f.MAX_WINDOW:
            raise ConnectionProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")

    def grow_stream(self, s: StreamT, increment: int) -> None:
        """WINDOW_UPDATE on an open stream (the caller then drains it)."""
        if increment == 0:
            raise StreamProtocolError(s.sid, ErrorCode.PROTOCOL_ERROR)
        s.send_window += increment
        if s.send_window > f.MAX_WINDOW:
            raise StreamProtocolError(s.sid, ErrorCode.FLOW_CONTROL_ERROR)

    def set_initial_window(self, value: int, streams: Iterable[StreamT]) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE: every open stream's window moves by the change (§6.9.2)."""
        if value > f.MAX_WINDOW:
            raise ConnectionProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "initial window too large")
        delta = value - self.initial_window
        self.initial_window = value
        for s in streams:
            s.send_window += delta
            if s.send_window > f.MAX_WINDOW:
                raise ConnectionProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")

    def forget(self, s: StreamT) -> None:
        """``s`` closed: its queue no longer counts, nor waits."""
        self.queued_bytes -= s.queued_bytes
        self.blocked.pop(s.sid, None)

    def clear(self) -> None:
        self.blocked.clear()
        self.queued_bytes = 0
