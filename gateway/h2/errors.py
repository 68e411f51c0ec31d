"""The two protocol errors of the HTTP/2 core, each carrying the RFC 9113 §7 code it is answered with.

Raised anywhere below ``H2Connection.receive`` / ``tick`` and turned into frames there; neither
ever reaches the caller:

    Exception
    └── H2ProtocolError
        ├── ConnectionProtocolError(code, reason)   GOAWAY code; nothing more is read or answered
        └── StreamProtocolError(stream_id, code)    RST_STREAM code; the connection carries on

``ErrorCode.INTERNAL_ERROR`` in a ``ConnectionProtocolError`` means a bug of ours (an illegal
stream transition that only our own code can cause), counted as an internal error.
"""

from __future__ import annotations

from gateway.h2.frames import ErrorCode


class H2ProtocolError(Exception):
    """The peer (or, with INTERNAL_ERROR, our own code) broke an HTTP/2 rule."""

    code: ErrorCode


class ConnectionProtocolError(H2ProtocolError):
    """Ends the connection with GOAWAY ``code``; ``reason`` goes in its debug data."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class StreamProtocolError(H2ProtocolError):
    """Ends one stream with RST_STREAM ``code``."""

    def __init__(self, stream_id: int, code: ErrorCode) -> None:
        super().__init__(stream_id, code)
        self.stream_id = stream_id
        self.code = code
