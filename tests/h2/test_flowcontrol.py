"""Flow control on its own (``gateway.h2.flowcontrol``): windows are never overrun and nothing is lost."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.h2.errors import ConnectionProtocolError, StreamProtocolError
from gateway.h2.flowcontrol import ReceiveWindow, SendFlow, StreamFlow
from gateway.h2.frames import ErrorCode


@given(st.integers(1024, 1 << 20), st.lists(st.floats(0, 1), max_size=60))
def test_a_peer_within_the_window_is_credited_back_exactly_what_it_sent(size, fractions):
    window = ReceiveWindow(size, size)
    sent = credited = 0
    for fraction in fractions:
        n = int(window.available * fraction)  # a peer that keeps to the window
        increment = window.receive(n)
        assert increment is not None
        assert increment == 0 or increment >= size // 2  # one update per half window, not per frame
        sent += n
        credited += increment
        assert 0 <= window.available <= size
        assert size - window.available < size / 2 + 1  # never left more than half used
    assert credited + (size - window.available) == sent


def test_a_peer_beyond_the_window_is_refused():
    window = ReceiveWindow(100, 10)
    assert window.receive(11) is None
    assert window.receive(10) == 100  # refused bytes were not counted


def _frames(out: list[bytes]) -> list[tuple[int, bytes]]:
    """(stream id, payload) of each DATA frame ``SendFlow`` wrote."""
    frames = []
    for header, payload in zip(out[::2], out[1::2], strict=True):
        length_type, flags, sid = struct.unpack(">IBI", header)
        assert length_type & 0xFF == 0 and flags == 0 and length_type >> 8 == len(payload)
        frames.append((sid, payload))
    return frames


@given(
    st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(1, 300)), min_size=1, max_size=20),
    st.lists(st.tuples(st.sampled_from([0, 1, 3]), st.integers(1, 400)), max_size=20),
    st.integers(16384, 20000),
)
def test_data_never_exceeds_a_window_and_arrives_whole_and_in_order(messages, updates, max_frame):
    flow: SendFlow[StreamFlow] = SendFlow(max_queued=1 << 20)
    flow.window = 500
    flow.max_frame = max_frame
    streams = {1: StreamFlow(1, 65535, 200), 3: StreamFlow(3, 65535, 0)}
    out: list[bytes] = []
    given_windows = {0: 500, 1: 200, 3: 0}
    expected = {1: b"", 3: b""}
    for i, (sid, size) in enumerate(messages):
        data = bytes([i]) * size
        expected[sid] += data
        flow.send(streams[sid], data, out)
    for sid, increment in updates:
        given_windows[sid] += increment
        if sid == 0:
            flow.grow_connection(increment)
            for s in list(flow.blocked.values()):
                flow.drain(s, out)
        else:
            flow.grow_stream(streams[sid], increment)
            if streams[sid].queued:
                flow.drain(streams[sid], out)
    sent = {1: b"", 3: b""}
    for sid, payload in _frames(out):
        assert len(payload) <= max_frame
        sent[sid] += payload
    for sid in (1, 3):
        assert len(sent[sid]) <= given_windows[sid]
        assert sent[sid] + b"".join(streams[sid].queued) == expected[sid]
        assert streams[sid].queued_bytes == len(expected[sid]) - len(sent[sid])
        assert (sid in flow.blocked) == bool(streams[sid].queued)
    assert len(sent[1]) + len(sent[3]) <= given_windows[0]
    assert flow.queued_bytes == streams[1].queued_bytes + streams[3].queued_bytes


def test_a_peer_that_never_opens_its_windows_costs_a_bounded_queue():
    flow: SendFlow[StreamFlow] = SendFlow(max_queued=1000)
    stream = StreamFlow(1, 65535, 0)
    flow.send(stream, b"x" * 1000, [])
    with pytest.raises(ConnectionProtocolError) as raised:
        flow.send(stream, b"x", [])
    assert raised.value.code == ErrorCode.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    ("grow", "error", "code"),
    [
        (lambda flow, s: flow.grow_connection(0), ConnectionProtocolError, ErrorCode.PROTOCOL_ERROR),
        (lambda flow, s: flow.grow_connection(1 << 31), ConnectionProtocolError, ErrorCode.FLOW_CONTROL_ERROR),
        (lambda flow, s: flow.grow_stream(s, 0), StreamProtocolError, ErrorCode.PROTOCOL_ERROR),
        (lambda flow, s: flow.grow_stream(s, 1 << 31), StreamProtocolError, ErrorCode.FLOW_CONTROL_ERROR),
        (lambda flow, s: flow.set_initial_window(1 << 31, [s]), ConnectionProtocolError, ErrorCode.FLOW_CONTROL_ERROR),
    ],
)
def test_window_updates_beyond_the_rfc_limits_are_refused(grow, error, code):
    flow: SendFlow[StreamFlow] = SendFlow(max_queued=1000)
    with pytest.raises(error) as raised:
        grow(flow, StreamFlow(1, 65535, 65535))
    assert raised.value.code == code
