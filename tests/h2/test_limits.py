"""The fast ext_proc server's timeouts, flood limits and grpc-timeout, sans-I/O on a hand-driven clock.

Each limit in ``H2Limits`` is shown both ways: the peer may go up to it, and one step past it ends
the connection (or the stream) with the RFC's answer.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from gateway.h2 import H2Connection, H2Limits
from gateway.h2.connection import DRAIN_PING_GRACE
from gateway.h2.grpcwire import parse_timeout
from tests.h2.strategies import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    EchoProcessor,
    FakeClock,
    Peer,
    Reader,
    data_frame,
    frame,
    grpc_message,
    headers_frame,
    ping,
    request_header_list,
    rst,
)
from tests.h2.strategies import settings as settings_frame

SETTINGS_TIMEOUT = 0x4
MAX_SID = (1 << 31) - 1


def req(kind: str = "request_headers") -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    getattr(r, kind).SetInParent()
    return r


def assert_calm(peer: Peer, counter: str) -> None:
    assert peer.conn.closed
    assert peer.reader.frames[-1][0] == GOAWAY and peer.goaway_code == ENHANCE_YOUR_CALM
    assert getattr(peer.counters, counter) == 1
    assert peer.counters.connection_errors == 1 and peer.counters.internal_errors == 0


def drain_ping_payload(peer: Peer) -> bytes:
    return next(f[3] for f in peer.reader.frames if f[0] == PING and not f[1] & ACK)


# ----------------------------------------------------------------------------- validation


NEW_FIELDS = {
    "settings_timeout": 0,
    "idle_timeout": -1,
    "uds_idle_timeout": 0,
    "flood_window": 0,
    "max_peer_resets": 0,
    "max_pings": 0,
    "max_settings": 0,
    "max_settings_entries": 0,
    "max_empty_frames": 0,
}


@pytest.mark.parametrize("name", sorted(NEW_FIELDS))
def test_limits_out_of_range_are_refused_by_name(name):
    with pytest.raises(ValueError, match=name):
        H2Limits(**{name: NEW_FIELDS[name]})


def test_timeouts_can_be_turned_off_and_set_the_tick_interval():
    off = H2Limits(settings_timeout=None, idle_timeout=None, uds_idle_timeout=None)
    assert off.tick_interval == 1.0
    assert H2Limits().tick_interval == 1.0
    assert H2Limits(idle_timeout=0.2).tick_interval == pytest.approx(0.05)
    assert H2Limits(settings_timeout=0.001).tick_interval == 0.01  # floor: never a busy loop


# ----------------------------------------------------------------------------- SETTINGS ACK timeout


def test_settings_not_acknowledged_in_time_is_settings_timeout():
    peer = Peer(H2Limits(settings_timeout=5.0), handshake_done=False)
    peer.tick(4.9)
    assert not peer.conn.closed
    peer.tick(0.2)
    assert peer.conn.closed and peer.goaway_code == SETTINGS_TIMEOUT
    assert peer.counters.settings_timeouts == 1 and peer.counters.connection_errors == 1


def test_settings_acknowledged_in_time_never_times_out():
    peer = Peer(H2Limits(settings_timeout=5.0, idle_timeout=None), handshake_done=False)
    peer.tick(4.0)
    peer.send(frame(SETTINGS, ACK, 0))
    for _ in range(10):
        peer.tick(100.0)
    assert not peer.conn.closed and peer.reader.goaways == []


def test_a_peer_that_never_sends_a_byte_is_dropped_by_the_settings_timeout():
    clock = FakeClock()
    conn = H2Connection(EchoProcessor, H2Limits(settings_timeout=3.0), clock=clock)
    reader = Reader()
    reader.feed(conn.initiate())
    clock.advance(3.0)
    reader.feed(conn.tick())
    assert conn.closed and reader.goaway_code == SETTINGS_TIMEOUT


def test_settings_timeout_off():
    peer = Peer(H2Limits(settings_timeout=None, idle_timeout=None), handshake_done=False)
    peer.tick(1e6)
    assert not peer.conn.closed


# ----------------------------------------------------------------------------- idle timeout


def test_idle_connection_is_drained_gracefully_after_the_idle_timeout():
    peer = Peer(H2Limits(idle_timeout=30.0))
    peer.request(1, req())
    assert peer.stream(1).grpc_status == 0
    peer.tick(1.0)  # the tick that sees the connection idle
    peer.tick(29.5)
    assert peer.reader.goaways == []
    peer.tick(1.0)
    assert peer.reader.goaways == [(MAX_SID, NO_ERROR)]  # step one: nothing refused yet
    assert peer.counters.idle_timeouts == 1 and not peer.conn.closed
    peer.request(3, req(), end=False)  # crossed our GOAWAY in flight: still served
    assert len(peer.stream(3).messages) == 1
    peer.send(ping(drain_ping_payload(peer), ack=True))
    assert peer.reader.goaways[-1] == (3, NO_ERROR) and not peer.conn.closed
    peer.send(data_frame(3, b"", end_stream=True))
    assert peer.stream(3).grpc_status == 0 and peer.conn.closed
    assert peer.counters.connection_errors == 0


def test_open_stream_keeps_the_connection_out_of_idle():
    peer = Peer(H2Limits(idle_timeout=30.0))
    peer.request(1, req(), end=False)  # an ext_proc stream waiting for the response phase
    for _ in range(10):
        peer.tick(100.0)
    assert peer.reader.goaways == [] and peer.counters.idle_timeouts == 0


def test_each_new_stream_restarts_the_idle_clock():
    peer = Peer(H2Limits(idle_timeout=30.0))
    for sid in range(1, 20, 2):
        peer.tick(20.0)
        peer.request(sid, req())  # opened and finished between two ticks
    peer.tick(20.0)  # sees the last stream: idle from here (ticks are a second apart in production)
    peer.tick(29.0)
    assert peer.reader.goaways == []
    peer.tick(1.0)
    assert peer.reader.goaways == [(MAX_SID, NO_ERROR)]


def test_idle_drain_with_a_peer_that_never_acks_closes_after_the_ping_grace():
    peer = Peer(H2Limits(idle_timeout=10.0))
    peer.tick(0.0)
    peer.tick(10.0)
    assert peer.reader.goaways == [(MAX_SID, NO_ERROR)]
    peer.tick(DRAIN_PING_GRACE / 2)
    assert not peer.conn.closed
    peer.tick(DRAIN_PING_GRACE / 2)
    assert peer.reader.goaways[-1] == (0, NO_ERROR) and peer.conn.closed  # a half-open peer goes too


def test_unix_socket_peers_use_uds_idle_timeout_off_by_default():
    limits = H2Limits(idle_timeout=10.0)
    peer = Peer(limits, local=True)
    for _ in range(5):
        peer.tick(1000.0)
    assert peer.reader.goaways == [] and not peer.conn.closed
    peer = Peer(dataclasses.replace(limits, uds_idle_timeout=50.0), local=True)
    peer.tick(0.0)
    peer.tick(40.0)
    assert peer.reader.goaways == []
    peer.tick(10.0)
    assert peer.reader.goaways == [(MAX_SID, NO_ERROR)]


def test_idle_timeout_off():
    peer = Peer(H2Limits(idle_timeout=None))
    for _ in range(5):
        peer.tick(1e5)
    assert peer.reader.goaways == []


# ----------------------------------------------------------------------------- rapid reset


def open_and_cancel(peer: Peer, sid: int) -> None:
    peer.send(headers_frame(peer.encoder, sid) + rst(sid, CANCEL))


def test_rapid_reset_beyond_the_limit_is_enhance_your_calm():
    peer = Peer(H2Limits(max_peer_resets=10))
    for sid in range(1, 21, 2):
        open_and_cancel(peer, sid)
    assert not peer.conn.closed and peer.counters.peer_resets == 10
    open_and_cancel(peer, 21)
    assert_calm(peer, "flood_resets")


def test_resets_after_the_answer_are_envoys_normal_ending_and_never_count():
    peer = Peer(H2Limits(max_peer_resets=10))
    for sid in range(1, 2001, 2):
        peer.request(sid, req(), end=False)
        peer.send(rst(sid, CANCEL))
    assert not peer.conn.closed and peer.counters.peer_resets == 1000
    assert peer.counters.flood_resets == 0


def test_flood_window_restarts_the_counts():
    peer = Peer(H2Limits(max_peer_resets=10, flood_window=5.0))
    sid = iter(range(1, 1000, 2))
    for _ in range(10):
        open_and_cancel(peer, next(sid))
    peer.clock.advance(5.0)  # a new window: ten more are fine
    for _ in range(10):
        open_and_cancel(peer, next(sid))
    assert not peer.conn.closed
    peer.clock.advance(4.9)  # still inside that window: the eleventh is a flood
    open_and_cancel(peer, next(sid))
    assert_calm(peer, "flood_resets")


# ----------------------------------------------------------------------------- empty frames


EMPTY_FRAMES = {
    "zero-length DATA": lambda sid: frame(DATA, 0, sid, b""),
    "DATA of padding only": lambda sid: frame(DATA, PADDED, sid, b"\x03\0\0\0"),
}


@pytest.mark.parametrize("case", sorted(EMPTY_FRAMES))
def test_empty_data_frames_beyond_the_limit_are_enhance_your_calm(case):
    build = EMPTY_FRAMES[case]
    peer = Peer(H2Limits(max_empty_frames=5))
    peer.send(headers_frame(peer.encoder, 1))
    peer.send(build(1) * 5)
    assert not peer.conn.closed
    peer.send(build(1))
    assert_calm(peer, "flood_empty_frames")


def test_empty_data_that_ends_the_stream_is_not_empty():
    peer = Peer(H2Limits(max_empty_frames=1))
    for sid in range(1, 21, 2):
        peer.send(headers_frame(peer.encoder, sid) + data_frame(sid, b"", end_stream=True))
    assert not peer.conn.closed and peer.stream(19).grpc_status == 0


def test_empty_continuation_flood_is_enhance_your_calm():
    limits = H2Limits(max_empty_frames=5, max_continuation_frames=1000)
    block = Peer().encoder.encode(request_header_list())
    peer = Peer(limits)
    peer.send(frame(HEADERS, 0, 1, block[:5]) + frame(CONTINUATION, 0, 1, b"") * 5)
    assert not peer.conn.closed
    peer.send(frame(CONTINUATION, 0, 1, b""))
    assert_calm(peer, "flood_empty_frames")


def test_empty_headers_fragments_count_across_streams():
    peer = Peer(H2Limits(max_empty_frames=3))
    block = peer.encoder.encode(request_header_list())
    for sid in (1, 3, 5):  # an empty HEADERS, the block in CONTINUATION: valid, but wasteful
        peer.send(frame(HEADERS, END_STREAM, sid, b"") + frame(CONTINUATION, END_HEADERS, sid, block))
    assert not peer.conn.closed and peer.stream(5).grpc_status == 0
    peer.send(frame(HEADERS, END_STREAM, 7, b""))
    assert_calm(peer, "flood_empty_frames")


def test_continuation_frames_per_block_are_bounded():
    peer = Peer(H2Limits(max_continuation_frames=3))
    block = peer.encoder.encode(request_header_list())
    parts = [block[i : i + 8] for i in range(0, 32, 8)] + [block[32:]]
    frames = frame(HEADERS, END_STREAM, 1, parts[0])
    frames += frame(CONTINUATION, 0, 1, parts[1]) + frame(CONTINUATION, 0, 1, parts[2])
    frames += frame(CONTINUATION, END_HEADERS, 1, parts[3] + parts[4])
    peer.send(frames)  # three CONTINUATIONs: fine
    assert peer.stream(1).grpc_status == 0
    block = peer.encoder.encode(request_header_list())
    frames = frame(HEADERS, END_STREAM, 3, block[:4])
    frames += b"".join(frame(CONTINUATION, 0, 3, block[i : i + 4]) for i in range(4, 16, 4))
    peer.send(frames + frame(CONTINUATION, END_HEADERS, 3, block[16:]))  # the fourth
    assert peer.conn.closed and peer.goaway_code == ENHANCE_YOUR_CALM


# ----------------------------------------------------------------------------- PING and SETTINGS floods


def test_ping_flood_beyond_the_limit_is_enhance_your_calm():
    peer = Peer(H2Limits(max_pings=20))
    peer.send(ping(b"12345678") * 20)
    assert len(peer.reader.ping_acks) == 20 and not peer.conn.closed
    peer.send(ping(b"12345678", ack=True) * 100)  # ACKs need no answer and are not counted
    assert not peer.conn.closed
    peer.send(ping(b"12345678"))
    assert_calm(peer, "flood_pings")
    assert len(peer.reader.ping_acks) == 20


def test_pings_spread_over_windows_are_fine():
    peer = Peer(H2Limits(max_pings=20, flood_window=10.0))
    for _ in range(10):
        peer.send(ping() * 20)
        peer.clock.advance(10.0)
    assert len(peer.reader.ping_acks) == 200 and not peer.conn.closed


def test_settings_flood_beyond_the_limit_is_enhance_your_calm():
    peer = Peer(H2Limits(max_settings=10))  # the handshake's SETTINGS is the first
    peer.send(settings_frame(max_frame_size=20000) * 9)
    assert peer.reader.settings_acks == 10 and not peer.conn.closed
    peer.send(frame(SETTINGS, ACK, 0) * 50)  # ACKs are not counted
    peer.send(settings_frame(max_frame_size=20000))
    assert_calm(peer, "flood_settings")


def test_settings_frame_with_too_many_entries_is_enhance_your_calm():
    peer = Peer(H2Limits(max_settings_entries=4))
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535) * 4))
    assert not peer.conn.closed and peer.reader.settings_acks == 2
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535) * 5))
    assert peer.conn.closed and peer.goaway_code == ENHANCE_YOUR_CALM


# ----------------------------------------------------------------------------- grpc-timeout


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"10S", 10.0),
        (b"10100m", 10.1),  # what grpcio sends for timeout=10
        (b"251m", 0.251),
        (b"2H", 7200.0),
        (b"3M", 180.0),
        (b"99999999u", 99.999999),
        (b"5n", 5e-9),
        (b"0S", 0.0),
    ],
)
def test_parse_timeout(value, seconds):
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"10", b"10s", b"123456789S", b"-1S", b"1.5S", b" 1S", b"1S "])
def test_parse_timeout_refuses_malformed(value):
    assert parse_timeout(value) is None


def with_timeout(value: bytes) -> list[tuple[bytes, bytes]]:
    return request_header_list(extra=[(b"grpc-timeout", value)])


def test_message_arriving_after_the_deadline_is_deadline_exceeded():
    class Counting(EchoProcessor):
        handled = 0

        def handle(self, request):
            Counting.handled += 1
            return super().handle(request)

    peer = Peer(processor=Counting)
    peer.send(headers_frame(peer.encoder, 1, headers=with_timeout(b"1S")) + data_frame(1, grpc_message(req())))
    assert len(peer.stream(1).messages) == 1  # in time
    peer.clock.advance(0.999)
    peer.send(data_frame(1, grpc_message(req("response_headers"))))
    assert len(peer.stream(1).messages) == 2
    peer.clock.advance(0.002)
    peer.send(data_frame(1, grpc_message(req("response_body"))))
    s = peer.stream(1)
    assert s.grpc_status == 4 and s.field(b"grpc-message") == b"deadline exceeded"
    assert len(s.messages) == 2 and Counting.handled == 2  # the late message was never processed
    assert s.rst == NO_ERROR  # the request had not ended: ask the peer to stop
    assert peer.counters.deadline_exceeded == 1 and not peer.conn.closed


def test_zero_timeout_is_expired_on_arrival_and_trailers_only():
    peer = Peer()
    peer.request(1, req(), headers=with_timeout(b"0m"))
    s = peer.stream(1)
    assert s.grpc_status == 4 and s.field(b":status") == b"200" and s.messages == []


def test_deadline_is_counted_per_stream_even_when_the_block_is_memoised():
    peer = Peer()
    for sid in (1, 3, 5):
        peer.clock.advance(10.0)  # each stream's 2 s starts at its own headers
        peer.send(headers_frame(peer.encoder, sid, headers=with_timeout(b"2S")))
        peer.clock.advance(1.5)
        peer.send(data_frame(sid, grpc_message(req()), end_stream=True))
        assert peer.stream(sid).grpc_status == 0, sid
    assert peer.conn._decoder.hits >= 1


def test_tick_expires_a_stream_waiting_past_its_deadline():
    peer = Peer()
    peer.request(1, req(), end=False, headers=with_timeout(b"2S"))
    peer.request(3, req(), end=False)  # no grpc-timeout: no deadline
    peer.tick(1.0)
    assert peer.stream(1).grpc_status is None
    peer.tick(1.5)
    assert peer.stream(1).grpc_status == 4 and peer.stream(1).rst == NO_ERROR
    assert peer.stream(3).grpc_status is None and peer.conn.open_streams == 1


def test_malformed_grpc_timeout_is_internal():
    peer = Peer()
    peer.request(1, req(), headers=with_timeout(b"soon"))
    s = peer.stream(1)
    assert s.grpc_status == 13 and s.field(b"grpc-message") == b"malformed grpc-timeout"
    assert peer.counters.streams == 0 and not peer.conn.closed


# ----------------------------------------------------------------------------- nothing else changed


def test_limits_do_not_disturb_refusal_after_a_drain():
    peer = Peer(H2Limits(max_peer_resets=1))
    peer.request(1, req(), end=False)
    peer.reader.feed(peer.conn.start_drain())
    peer.send(ping(drain_ping_payload(peer), ack=True))
    peer.request(3, req())
    assert peer.stream(3).rst == REFUSED_STREAM
    assert [f[0] for f in peer.reader.frames].count(RST_STREAM) == 1 and not peer.conn.closed
