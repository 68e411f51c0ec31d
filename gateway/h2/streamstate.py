"""One stream's lifecycle as a transition table, in the manner of h11's state machine.

RFC 9113 §5.1 seen from a server that answers every request with one gRPC response. Between
"open" and "closed" it adds the ANSWERED states: our final block is decided but waits behind
DATA that the peer's flow-control windows hold back; request bytes arriving then are dropped.
Sending that block always closes the stream (with RST_STREAM NO_ERROR if the request was still
open, RFC 9113 §8.1), so the RFC's "half-closed (local)" is never a resting state here.

    IDLE ─RECV_HEADERS─▶ OPEN ─RECV_END_STREAM─▶ HALF_CLOSED_REMOTE
                          │ ANSWER                    │ ANSWER
                          ▼                           ▼
                       ANSWERED ─RECV_END_STREAM─▶ ANSWERED_REMOTE_CLOSED
                          └──────SEND_END_STREAM──────┴─▶ CLOSED
    (RECV_RST_STREAM, SEND_RST_STREAM and CONNECTION_CLOSED lead from any live state to CLOSED)

Every (state, event) pair is in exactly one of two tables: ``TRANSITIONS`` (the next state) or
``REFUSALS`` (the protocol error raised, the one RFC 9113 §5.1 prescribes for what the peer did;
an illegal event of our own is a connection INTERNAL_ERROR, a bug).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from gateway.h2.errors import ConnectionProtocolError, H2ProtocolError, StreamProtocolError
from gateway.h2.frames import ErrorCode


class StreamState(enum.Enum):
    IDLE = "idle"
    OPEN = "open"  # request and answer both under way
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # request ended, answer not yet decided
    ANSWERED = "answered"  # final block decided, waiting for flow control; request still open
    ANSWERED_REMOTE_CLOSED = "answered, request ended"
    CLOSED = "closed"

    # Members are singletons: identity hashing keeps the per-frame table lookup cheap
    # (Enum's own __hash__ hashes the name in Python code).
    __hash__ = object.__hash__


class StreamEvent(enum.Enum):
    # What the peer sends.
    RECV_HEADERS = "HEADERS"  # the request headers on an idle stream, trailers on an open one
    RECV_DATA = "DATA"
    RECV_END_STREAM = "END_STREAM"
    RECV_RST_STREAM = "RST_STREAM"
    # What we do.
    ANSWER = "answer"  # the final block (status) is decided
    SEND_END_STREAM = "send END_STREAM"  # the final block is sent
    SEND_RST_STREAM = "send RST_STREAM"  # a stream error of the peer's
    CONNECTION_CLOSED = "connection closed"

    __hash__ = object.__hash__


S = StreamState
E = StreamEvent

PEER_EVENTS = frozenset({E.RECV_HEADERS, E.RECV_DATA, E.RECV_END_STREAM, E.RECV_RST_STREAM})
_LIVE = (S.OPEN, S.HALF_CLOSED_REMOTE, S.ANSWERED, S.ANSWERED_REMOTE_CLOSED)

TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (S.IDLE, E.RECV_HEADERS): S.OPEN,
    (S.IDLE, E.CONNECTION_CLOSED): S.CLOSED,
    (S.OPEN, E.RECV_HEADERS): S.OPEN,  # trailers; END_STREAM follows as its own event
    (S.OPEN, E.RECV_DATA): S.OPEN,
    (S.OPEN, E.RECV_END_STREAM): S.HALF_CLOSED_REMOTE,
    (S.OPEN, E.ANSWER): S.ANSWERED,
    (S.HALF_CLOSED_REMOTE, E.ANSWER): S.ANSWERED_REMOTE_CLOSED,
    (S.ANSWERED, E.RECV_HEADERS): S.ANSWERED,
    (S.ANSWERED, E.RECV_DATA): S.ANSWERED,  # flow-controlled, then dropped
    (S.ANSWERED, E.RECV_END_STREAM): S.ANSWERED_REMOTE_CLOSED,
    (S.ANSWERED, E.SEND_END_STREAM): S.CLOSED,  # with RST_STREAM NO_ERROR: the request is cut short
    (S.ANSWERED_REMOTE_CLOSED, E.SEND_END_STREAM): S.CLOSED,
    **{(state, event): S.CLOSED for state in _LIVE for event in (E.RECV_RST_STREAM, E.SEND_RST_STREAM)},
    **{(state, E.CONNECTION_CLOSED): S.CLOSED for state in _LIVE},
    (S.CLOSED, E.RECV_RST_STREAM): S.CLOSED,  # a late reset crossing ours is ignored
    (S.CLOSED, E.CONNECTION_CLOSED): S.CLOSED,
}

Refusal = Callable[[int], H2ProtocolError]  # stream id -> the error to raise


def _idle(reason: str) -> Refusal:
    return lambda sid: ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, reason)


def _stream_closed(sid: int) -> H2ProtocolError:
    return StreamProtocolError(sid, ErrorCode.STREAM_CLOSED)


def _headers_on_closed(sid: int) -> H2ProtocolError:
    return ConnectionProtocolError(ErrorCode.STREAM_CLOSED, "HEADERS on closed stream")


def _our_bug(state: StreamState, event: StreamEvent) -> Refusal:
    reason = f"stream {{}}: {event.value} while {state.value}"
    return lambda sid: ConnectionProtocolError(ErrorCode.INTERNAL_ERROR, reason.format(sid))


_OUR_EVENTS_OUT_OF_TURN = [
    (S.IDLE, E.ANSWER),
    (S.IDLE, E.SEND_END_STREAM),
    (S.IDLE, E.SEND_RST_STREAM),
    (S.OPEN, E.SEND_END_STREAM),  # the final block is decided (ANSWER) before it is sent
    (S.HALF_CLOSED_REMOTE, E.SEND_END_STREAM),
    (S.ANSWERED, E.ANSWER),
    (S.ANSWERED_REMOTE_CLOSED, E.ANSWER),
    (S.CLOSED, E.ANSWER),
    (S.CLOSED, E.SEND_END_STREAM),
    (S.CLOSED, E.SEND_RST_STREAM),
]

REFUSALS: dict[tuple[StreamState, StreamEvent], Refusal] = {
    # RFC 9113 §5.1 idle: only HEADERS (or PRIORITY) may arrive; anything else is a connection error.
    (S.IDLE, E.RECV_DATA): _idle("frame on idle stream"),
    (S.IDLE, E.RECV_END_STREAM): _idle("frame on idle stream"),
    (S.IDLE, E.RECV_RST_STREAM): _idle("RST_STREAM on idle stream"),
    # §5.1 half-closed (remote): frames other than WINDOW_UPDATE, PRIORITY, RST_STREAM.
    **{
        (state, event): _stream_closed
        for state in (S.HALF_CLOSED_REMOTE, S.ANSWERED_REMOTE_CLOSED)
        for event in (E.RECV_HEADERS, E.RECV_DATA, E.RECV_END_STREAM)
    },
    # §5.1 closed (and not reset by us, whose late frames the connection ignores first).
    (S.CLOSED, E.RECV_DATA): _stream_closed,
    (S.CLOSED, E.RECV_END_STREAM): _stream_closed,
    (S.CLOSED, E.RECV_HEADERS): _headers_on_closed,
    # Our own events out of turn: a bug of ours, never the peer's doing.
    **{(state, event): _our_bug(state, event) for state, event in _OUR_EVENTS_OUT_OF_TURN},
}


def next_state(state: StreamState, event: StreamEvent, stream_id: int) -> StreamState:
    """The state ``event`` leads to, or raise the protocol error it earns."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise REFUSALS[state, event](stream_id) from None
