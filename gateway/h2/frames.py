"""HTTP/2 frame layout (RFC 9113 §4, §6): constants and byte builders, nothing else.

Pure functions over bytes, shared by the connection state machine and the tests. Parsing is done
inline by the connection (one ``struct`` call per frame header) because it sits on the hot path;
this module only fixes the numbers and builds the frames the server sends.
"""

from __future__ import annotations

import enum
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: 9-byte frame header: (length << 8 | type), flags, stream id (with the reserved bit).
FRAME_HEADER = struct.Struct(">IBI")
FRAME_HEADER_SIZE = 9

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 1 << 14
MAX_MAX_FRAME = (1 << 24) - 1
DEFAULT_HEADER_TABLE = 4096
MAX_STREAM_ID = (1 << 31) - 1

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8


class ErrorCode(enum.IntEnum):
    """RFC 9113 §7 error codes, carried by RST_STREAM and GOAWAY."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: header plus payload (the caller keeps ``len(payload)`` under the peer's limit)."""
    return FRAME_HEADER.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


SETTINGS_ACK_FRAME = frame(SETTINGS, ACK, 0)


def ping_frame(opaque: bytes, *, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code) + debug)


def header_frames(stream_id: int, block: bytes, *, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (+ CONTINUATION when the block is larger than the peer's max frame size)."""
    es = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return FRAME_HEADER.pack(len(block) << 8 | HEADERS, es | END_HEADERS, stream_id) + block
    parts = [frame(HEADERS, es, stream_id, block[:max_frame])]
    for start in range(max_frame, len(block), max_frame):
        chunk = block[start : start + max_frame]
        last = start + max_frame >= len(block)
        parts.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, chunk))
    return b"".join(parts)
