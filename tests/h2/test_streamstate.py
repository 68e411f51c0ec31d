"""The stream lifecycle table (``gateway.h2.streamstate``): complete, and every stream can end."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.h2.errors import ConnectionProtocolError, H2ProtocolError, StreamProtocolError
from gateway.h2.frames import ErrorCode
from gateway.h2.streamstate import PEER_EVENTS, REFUSALS, TRANSITIONS, StreamEvent, StreamState, next_state
from tests.h2.strategies import legal_stream_events

S, E = StreamState, StreamEvent
ALL_PAIRS = set(itertools.product(StreamState, StreamEvent))


def test_every_pair_has_exactly_one_outcome():
    assert set(TRANSITIONS) | set(REFUSALS) == ALL_PAIRS
    assert not set(TRANSITIONS) & set(REFUSALS)


@given(st.sampled_from(StreamState), st.sampled_from(StreamEvent), st.integers(1, 2**31 - 1))
def test_any_pair_moves_to_its_next_state_or_raises_a_protocol_error(state, event, sid):
    try:
        new = next_state(state, event, sid)
    except H2ProtocolError as exc:
        assert (state, event) in REFUSALS
        if isinstance(exc, StreamProtocolError):
            assert exc.stream_id == sid and event in PEER_EVENTS
        else:
            assert isinstance(exc, ConnectionProtocolError)
            # Our own events out of turn are bugs of ours; the peer's never are.
            assert (exc.code == ErrorCode.INTERNAL_ERROR) == (event not in PEER_EVENTS)
    else:
        assert new is TRANSITIONS[state, event]


@pytest.mark.parametrize(
    ("state", "event", "error", "code"),
    [
        (S.HALF_CLOSED_REMOTE, E.RECV_DATA, StreamProtocolError, ErrorCode.STREAM_CLOSED),
        (S.ANSWERED_REMOTE_CLOSED, E.RECV_HEADERS, StreamProtocolError, ErrorCode.STREAM_CLOSED),
        (S.CLOSED, E.RECV_DATA, StreamProtocolError, ErrorCode.STREAM_CLOSED),
        (S.CLOSED, E.RECV_HEADERS, ConnectionProtocolError, ErrorCode.STREAM_CLOSED),
        (S.IDLE, E.RECV_DATA, ConnectionProtocolError, ErrorCode.PROTOCOL_ERROR),
        (S.IDLE, E.RECV_RST_STREAM, ConnectionProtocolError, ErrorCode.PROTOCOL_ERROR),
        (S.CLOSED, E.ANSWER, ConnectionProtocolError, ErrorCode.INTERNAL_ERROR),
        (S.OPEN, E.SEND_END_STREAM, ConnectionProtocolError, ErrorCode.INTERNAL_ERROR),
    ],
)
def test_refusals_carry_the_rfc_9113_error(state, event, error, code):
    with pytest.raises(error) as raised:
        next_state(state, event, 7)
    assert raised.value.code == code


@pytest.mark.parametrize(
    "events",
    [
        # Envoy's ext_proc: our answer comes first, then the peer's reset.
        [E.RECV_HEADERS, E.RECV_DATA, E.RECV_RST_STREAM],
        # Unary: the request ends, then we answer.
        [E.RECV_HEADERS, E.RECV_DATA, E.RECV_END_STREAM, E.ANSWER, E.SEND_END_STREAM],
        # An answer before the request ends (sent with RST_STREAM NO_ERROR).
        [E.RECV_HEADERS, E.RECV_DATA, E.ANSWER, E.SEND_END_STREAM],
        # The final block waits for flow control while the request ends with trailers.
        [E.RECV_HEADERS, E.RECV_DATA, E.ANSWER, E.RECV_DATA, E.RECV_HEADERS, E.RECV_END_STREAM, E.SEND_END_STREAM],
        # A stream error of the peer's.
        [E.RECV_HEADERS, E.SEND_RST_STREAM],
    ],
)
def test_legal_sequences_reach_closed(events):
    state = S.IDLE
    for event in events:
        state = next_state(state, event, 1)
    assert state is S.CLOSED


def _can_close(state: StreamState) -> bool:
    seen, todo = {state}, [state]
    while todo:
        here = todo.pop()
        for (s, _), new in TRANSITIONS.items():
            if s is here and new not in seen:
                seen.add(new)
                todo.append(new)
    return S.CLOSED in seen


@given(legal_stream_events())
def test_any_legal_walk_stays_legal_and_can_still_close(events):
    state = S.IDLE
    for event in events:
        state = next_state(state, event, 1)  # never raises: each event was legal where taken
        assert state is not S.IDLE
    assert _can_close(state)
    # Losing the connection closes a stream from wherever the walk left it.
    assert next_state(state, E.CONNECTION_CLOSED, 1) is S.CLOSED


def test_closed_is_final():
    assert {new for (state, _), new in TRANSITIONS.items() if state is S.CLOSED} == {S.CLOSED}
