"""The fast ext_proc server's connection state machine, driven with bytes (no sockets, no loop)."""

from __future__ import annotations

import itertools
import logging
import struct

import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.h2 import H2Connection, H2Limits
from gateway.h2.streamstate import StreamState
from tests.h2.strategies import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    EchoProcessor,
    Peer,
    Reader,
    data_frame,
    frame,
    goaway,
    grpc_message,
    headers_frame,
    ping,
    processing_requests,
    request_header_list,
    rst,
    window_update,
)
from tests.h2.strategies import settings as settings_frame

LIVE_STATES = set(StreamState) - {StreamState.IDLE, StreamState.CLOSED}


def req(kind: str = "request_headers") -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    getattr(r, kind).SetInParent()
    return r


# ----------------------------------------------------------------------------- the happy path


def test_handshake_sends_settings_window_and_acks():
    peer = Peer()
    (ours,) = peer.reader.settings
    limits = H2Limits()
    assert ours[2] == 0  # ENABLE_PUSH
    assert ours[3] == limits.max_concurrent_streams
    assert ours[4] == limits.initial_window_size
    assert ours[6] == limits.max_header_list_size
    assert peer.reader.window_updates == [(0, limits.connection_window_size - 65535)]
    assert peer.reader.settings_acks == 1
    assert not peer.conn.closed


def test_envoy_shaped_stream_headers_then_half_close():
    peer = Peer()
    peer.request(1, req(), end=False)
    s = peer.stream(1)
    assert s.headers[0] == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    (response,) = s.responses
    assert response.request_headers.response.header_mutation.set_headers[0].header.key == "x-seen-1"
    assert not s.ended
    peer.send(data_frame(1, b"", end_stream=True))
    assert s.ended and s.grpc_status == 0 and s.rst is None
    assert peer.conn.open_streams == 0


def test_several_messages_on_one_stream_are_answered_in_order():
    peer = Peer()
    kinds = ["request_headers", "request_body", "response_headers", "response_body", "response_trailers"]
    peer.request(1, *[req(k) for k in kinds])
    s = peer.stream(1)
    values = [r.request_headers.response.header_mutation.set_headers[0].header for r in s.responses]
    assert [h.key for h in values] == [f"x-seen-{i}" for i in range(1, 6)]
    assert [h.raw_value.split(b":")[0].decode() for h in values] == kinds
    assert s.grpc_status == 0


def test_processor_returning_none_sends_nothing_and_trailers_only_at_the_end():
    peer = Peer()
    peer.request(1, req("request_trailers"))
    s = peer.stream(1)
    assert s.messages == []
    assert s.headers == [[(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]]


def test_messages_split_across_data_frames_and_one_frame_with_many():
    peer = Peer()
    body = grpc_message(req()) + grpc_message(req("request_body")) + grpc_message(req("response_body"))
    peer.send(headers_frame(peer.encoder, 1))
    for i in range(0, len(body), 3):
        peer.send(data_frame(1, body[i : i + 3]))
    peer.send(data_frame(1, b"", end_stream=True) + headers_frame(peer.encoder, 3))
    peer.send(data_frame(3, body, end_stream=True))
    assert len(peer.stream(1).responses) == 3 and len(peer.stream(3).responses) == 3


def test_request_trailers_close_the_stream():
    peer = Peer()
    peer.request(1, req(), end=False)
    peer.send(headers_frame(peer.encoder, 1, end_stream=True, headers=[(b"x-trailer", b"1")]))
    assert peer.stream(1).grpc_status == 0


def test_cancel_by_rst_stream_drops_the_stream():
    peer = Peer()
    peer.request(1, req(), end=False)
    peer.send(rst(1, CANCEL))
    assert peer.conn.open_streams == 0
    assert peer.counters.peer_resets == 1
    frames = peer.send(data_frame(1, grpc_message(req())))  # late DATA after the peer's reset
    assert [f[0] for f in frames] == [RST_STREAM]  # STREAM_CLOSED, connection unharmed
    assert not peer.conn.closed


def test_ping_is_acknowledged_with_its_payload():
    peer = Peer()
    peer.send(ping(b"abcdefgh"))
    assert peer.reader.ping_acks == [b"abcdefgh"]
    peer.send(ping(b"zzzzzzzz", ack=True))  # an ACK is not answered
    assert peer.reader.ping_acks == [b"abcdefgh"]


def test_unknown_frame_types_and_flags_are_ignored():
    peer = Peer()
    peer.send(frame(0xFA, 0xFF, 0, b"whatever") + frame(0x20, 0, 7, b""))
    peer.request(1, req())
    assert peer.stream(1).grpc_status == 0 and not peer.conn.closed


def test_padding_and_priority_flags_are_parsed():
    peer = Peer()
    block = peer.encoder.encode(request_header_list())
    payload = bytes([3]) + struct.pack(">IB", 0, 15) + block + b"\0\0\0"
    msg = grpc_message(req())
    peer.send(frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, payload))
    peer.send(frame(DATA, PADDED | END_STREAM, 1, bytes([5]) + msg + b"\0" * 5))
    peer.send(frame(PRIORITY, 0, 3, struct.pack(">IB", 1, 200)))  # PRIORITY on an idle stream is fine
    assert peer.stream(1).grpc_status == 0 and len(peer.stream(1).messages) == 1


def test_continuation_frames_assemble_one_block():
    peer = Peer()
    block = peer.encoder.encode(request_header_list(extra=[(b"x-pad", b"p" * 100)]))
    frames = frame(HEADERS, 0, 1, block[:10]) + frame(CONTINUATION, 0, 1, block[10:20])
    frames += frame(CONTINUATION, 0, 1, b"") + frame(CONTINUATION, END_HEADERS, 1, block[20:])
    peer.send(frames + data_frame(1, grpc_message(req()), end_stream=True))
    assert peer.stream(1).grpc_status == 0 and len(peer.stream(1).messages) == 1


def test_repeated_header_blocks_hit_the_memo():
    peer = Peer()
    for sid in range(1, 40, 2):
        peer.request(sid, req())
    assert peer.conn._decoder.hits >= 18
    assert all(peer.stream(sid).grpc_status == 0 for sid in range(1, 40, 2))


# ----------------------------------------------------------------------------- gRPC-level errors


def test_compressed_message_is_refused_with_unimplemented():
    peer = Peer()
    peer.request(1, grpc_message(req(), flag=1), end=False)
    s = peer.stream(1)
    assert s.grpc_status == 12 and s.field(b":status") == b"200"  # trailers-only
    assert s.rst == NO_ERROR  # the request had not ended: ask the peer to stop


def test_message_over_the_limit_is_resource_exhausted_before_it_is_buffered():
    peer = Peer(H2Limits(max_message_size=1000))
    peer.request(1, struct.pack(">BI", 0, 1001), end=False)
    assert peer.stream(1).grpc_status == 8
    assert peer.conn.buffered_bytes == 0


def test_unknown_method_is_unimplemented_and_non_grpc_gets_http_errors():
    peer = Peer()
    peer.request(1, headers=request_header_list(b"/grpc.health.v1.Health/Check"))
    peer.request(3, headers=request_header_list(content_type=b"application/json"))
    peer.request(5, headers=request_header_list(method=b"GET"))
    assert peer.stream(1).grpc_status == 12
    assert peer.stream(3).field(b":status") == b"415"
    assert peer.stream(5).field(b":status") == b"405"
    assert peer.counters.streams == 0 and not peer.conn.closed


def test_processor_exception_is_internal_generic_logged_once_and_counted(caplog):
    peer = Peer()
    boom = pb.ProcessingRequest()
    boom.request_headers.headers.headers.add(key="x-boom", raw_value=b"1")
    with caplog.at_level(logging.ERROR, logger="gateway.h2"):
        peer.request(1, boom, end=False)
    s = peer.stream(1)
    assert s.grpc_status == 13
    assert s.field(b"grpc-message") == b"internal error"
    assert b"secret" not in b"".join(v for block in s.headers for _, v in block)
    assert s.rst == NO_ERROR
    assert peer.counters.processor_errors == 1
    records = [r for r in caplog.records if r.name == "gateway.h2"]
    assert len(records) == 1 and records[0].exc_info is not None
    peer.request(3, req())  # the connection survives
    assert peer.stream(3).grpc_status == 0


def test_processor_factory_exception_is_internal():
    def broken():
        raise ValueError("no")

    peer = Peer(processor=broken)
    peer.request(1, req())
    assert peer.stream(1).grpc_status == 13 and peer.counters.processor_errors == 1


def test_undecodable_message_and_truncated_message_are_internal():
    peer = Peer()
    peer.request(1, struct.pack(">BI", 0, 3) + b"\xff\xff\xff")
    peer.request(3, struct.pack(">BI", 0, 10) + b"abc")
    assert peer.stream(1).grpc_status == 13
    assert peer.stream(3).field(b"grpc-message") == b"incomplete message"


# ----------------------------------------------------------------------------- flow control


def test_response_data_honours_the_peers_stream_window():
    class Big:
        def handle(self, request):
            r = pb.ProcessingResponse()
            r.request_body.response.body_mutation.body = b"b" * 100
            return r

    peer = Peer(processor=Big, initial_window_size=40)
    peer.request(1, req())
    s = peer.stream(1)
    assert len(s.data) == 40 and not s.ended  # window-limited, trailers held back
    peer.send(window_update(1, 30))
    assert len(s.data) == 70 and not s.ended
    peer.send(settings_frame(initial_window_size=1000))  # SETTINGS delta re-opens the stream
    assert s.ended and s.grpc_status == 0 and len(s.responses) == 1
    assert peer.conn.buffered_bytes == 0


@pytest.mark.parametrize("request_ends_first", [True, False])
def test_final_block_decided_behind_the_window_waits_and_cuts_short_only_an_open_request(request_ends_first):
    """ANSWERED: DATA queued, status decided (a bad message flag), the request still open."""

    class Big:
        def handle(self, request):
            r = pb.ProcessingResponse()
            r.request_body.response.body_mutation.body = b"b" * 100
            return r

    peer = Peer(processor=Big, initial_window_size=40)
    peer.request(1, req(), end=False)
    peer.send(data_frame(1, grpc_message(req(), flag=2)))  # answered INTERNAL once the DATA is out
    s = peer.stream(1)
    assert len(s.data) == 40 and not s.ended and s.rst is None
    peer.send(data_frame(1, grpc_message(req())))  # dropped: the answer is decided
    if request_ends_first:
        peer.send(data_frame(1, b"", end_stream=True))
    peer.send(window_update(1, 1000))
    assert s.ended and s.grpc_status == 13 and len(s.responses) == 1
    # An answer that ends before the request asks the peer to stop (RFC 9113 §8.1); after it, nothing.
    assert s.rst == (None if request_ends_first else NO_ERROR)
    assert peer.conn.open_streams == 0 and peer.conn.buffered_bytes == 0 and not peer.conn.closed


def test_data_after_the_request_ended_is_stream_closed_even_while_the_answer_waits():
    class Big:
        def handle(self, request):
            r = pb.ProcessingResponse()
            r.request_body.response.body_mutation.body = b"b" * 100
            return r

    peer = Peer(processor=Big, initial_window_size=40)
    peer.request(1, req())  # END_STREAM: OK decided, held behind the window
    assert not peer.stream(1).ended
    peer.send(data_frame(1, b"x"))
    assert peer.stream(1).rst == STREAM_CLOSED and peer.conn.open_streams == 0


def test_response_data_honours_connection_window_and_max_frame_size():
    class Huge:
        def handle(self, request):
            r = pb.ProcessingResponse()
            r.request_body.response.body_mutation.body = b"h" * 70000
            return r

    peer = Peer(processor=Huge, initial_window_size=1 << 20)
    peer.request(1, req())
    s = peer.stream(1)
    assert len(s.data) == 65535  # the connection window starts at 65535
    assert max(len(f[3]) for f in peer.reader.frames if f[0] == DATA) <= 16384
    peer.send(window_update(0, 100000))
    assert s.ended and len(s.responses[0].request_body.response.body_mutation.body) == 70000


def test_received_data_is_credited_back_with_window_updates():
    limits = H2Limits(initial_window_size=65535, connection_window_size=65535)
    peer = Peer(limits)
    body = pb.ProcessingRequest()
    body.request_body.body = b"x" * 16000
    peer.send(headers_frame(peer.encoder, 1))
    for _ in range(10):  # 160 kB through 64 kB windows
        peer.send(data_frame(1, grpc_message(body)))
    assert not peer.conn.closed and len(peer.stream(1).messages) == 10
    assert {sid for sid, _ in peer.reader.window_updates} == {0, 1}


def test_data_beyond_the_connection_window_is_a_flow_control_error():
    peer = Peer()
    peer.send(headers_frame(peer.encoder, 1))
    peer.conn._recv_window.available = 10  # as if the peer ignored our connection window
    peer.send(data_frame(1, b"\0" * 11))
    assert peer.conn.closed and peer.goaway_code == FLOW_CONTROL_ERROR


def test_data_beyond_the_stream_window_resets_the_stream():
    peer = Peer()
    conn = peer.conn
    peer.send(headers_frame(peer.encoder, 1))
    conn._streams[1].recv_window.available = 10  # as if the peer ignored our window
    peer.send(data_frame(1, b"\0" * 11))
    assert peer.stream(1).rst == FLOW_CONTROL_ERROR and not conn.closed


def test_shrunk_header_table_is_signalled_in_our_next_block():
    peer = Peer(header_table_size=0)
    peer.reader.decoder.max_allowed_table_size = 0  # strict: our block must shrink the table
    peer.request(1, req())
    assert peer.stream(1).grpc_status == 0


def test_peer_that_never_reads_gets_enhance_your_calm_not_unbounded_memory():
    peer = Peer(H2Limits(max_pending_output=10_000), initial_window_size=0)
    sid = 1
    while not peer.conn.closed and sid < 2000:
        peer.request(sid, req(), end=False)
        assert peer.conn.buffered_bytes <= 10_000 + 200
        sid += 2
    assert peer.goaway_code == ENHANCE_YOUR_CALM


def test_partial_messages_are_bounded_per_connection():
    peer = Peer(H2Limits(max_buffered_bytes=50_000, max_message_size=40_000))
    for sid in (1, 3):
        peer.send(headers_frame(peer.encoder, sid) + data_frame(sid, struct.pack(">BI", 0, 40_000)))
        for _ in range(2):
            peer.send(data_frame(sid, b"\0" * 15000))
    assert peer.stream(3).rst == ENHANCE_YOUR_CALM
    assert peer.conn.buffered_bytes <= 50_000


# ----------------------------------------------------------------------------- protocol errors


def _hdrs(peer: Peer, sid: int, **kw) -> bytes:
    return headers_frame(peer.encoder, sid, **kw)


CONNECTION_ERRORS = {
    "frame larger than max frame size": (lambda p: data_frame(1, b"\0" * 16385), FRAME_SIZE_ERROR),
    "DATA on stream 0": (lambda p: data_frame(0, b"x"), PROTOCOL_ERROR),
    "DATA on an idle stream": (lambda p: data_frame(5, b"x"), PROTOCOL_ERROR),
    "HEADERS on stream 0": (lambda p: _hdrs(p, 0), PROTOCOL_ERROR),
    "HEADERS with an even id": (lambda p: _hdrs(p, 2), PROTOCOL_ERROR),
    "HEADERS reusing a closed id": (lambda p: _hdrs(p, 3, end_stream=True) + _hdrs(p, 1), STREAM_CLOSED),
    "CONTINUATION without HEADERS": (lambda p: frame(CONTINUATION, END_HEADERS, 1, b""), PROTOCOL_ERROR),
    "other frame inside a header block": (lambda p: frame(HEADERS, 0, 1, b"") + ping(), PROTOCOL_ERROR),
    "CONTINUATION on another stream": (
        lambda p: frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, END_HEADERS, 3, b""),
        PROTOCOL_ERROR,
    ),
    "undecodable header block": (lambda p: frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), COMPRESSION_ERROR),
    "header index out of range": (lambda p: frame(HEADERS, END_HEADERS, 1, b"\xfe"), COMPRESSION_ERROR),
    "oversized header list": (
        lambda p: _hdrs(p, 1, headers=request_header_list(extra=[(b"x-big", b"v" * 3000)] * 10)),
        ENHANCE_YOUR_CALM,
    ),
    "CONTINUATION flood": (
        lambda p: frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, 0, 1, b"") * 100,
        ENHANCE_YOUR_CALM,
    ),
    "HEADERS padding longer than payload": (
        lambda p: frame(HEADERS, END_HEADERS | PADDED, 1, b"\x09ab"),
        PROTOCOL_ERROR,
    ),
    "DATA padding longer than payload": (lambda p: _hdrs(p, 1) + frame(DATA, PADDED, 1, b"\x05abc"), PROTOCOL_ERROR),
    "SETTINGS length not a multiple of 6": (lambda p: frame(SETTINGS, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR),
    "SETTINGS ACK with payload": (lambda p: frame(SETTINGS, ACK, 0, b"\0" * 6), FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (lambda p: frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
    "SETTINGS window above 2^31-1": (lambda p: settings_frame(initial_window_size=1 << 31), FLOW_CONTROL_ERROR),
    "SETTINGS max frame size too small": (lambda p: settings_frame(max_frame_size=100), PROTOCOL_ERROR),
    "SETTINGS enable push 2": (lambda p: settings_frame(enable_push=2), PROTOCOL_ERROR),
    "PING wrong length": (lambda p: frame(PING, 0, 0, b"1234"), FRAME_SIZE_ERROR),
    "PING on a stream": (lambda p: frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
    "GOAWAY too short": (lambda p: frame(GOAWAY, 0, 0, b"1234"), FRAME_SIZE_ERROR),
    "WINDOW_UPDATE zero on the connection": (lambda p: window_update(0, 0), PROTOCOL_ERROR),
    "WINDOW_UPDATE overflows the connection": (lambda p: window_update(0, (1 << 31) - 1), FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE wrong length": (lambda p: frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1\0"), FRAME_SIZE_ERROR),
    "WINDOW_UPDATE on an idle stream": (lambda p: window_update(9, 1), PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (lambda p: rst(9, CANCEL), PROTOCOL_ERROR),
    "RST_STREAM wrong length": (lambda p: _hdrs(p, 1) + frame(RST_STREAM, 0, 1, b"\0\0\0"), FRAME_SIZE_ERROR),
    "PUSH_PROMISE from a client": (lambda p: frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2"), PROTOCOL_ERROR),
    "PRIORITY wrong length": (lambda p: frame(PRIORITY, 0, 1, b"\0\0\0\0"), FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", sorted(CONNECTION_ERRORS))
def test_connection_errors_end_in_goaway_with_the_rfc_code(case):
    build, code = CONNECTION_ERRORS[case]
    peer = Peer()
    peer.send(build(peer))
    assert peer.conn.closed
    assert peer.reader.frames[-1][0] == GOAWAY
    assert peer.goaway_code == code
    assert peer.counters.internal_errors == 0
    assert peer.send(_hdrs(peer, 101)) == []  # nothing is read after the GOAWAY
    assert peer.conn.buffered_bytes == 0


STREAM_ERRORS = {
    "uppercase header name": (lambda p: _hdrs(p, 1, headers=[*request_header_list(), (b"X-Up", b"1")]), PROTOCOL_ERROR),
    "missing :path": (lambda p: _hdrs(p, 1, headers=request_header_list()[:2]), PROTOCOL_ERROR),
    "pseudo-header after a regular one": (
        lambda p: _hdrs(p, 1, headers=[*request_header_list(), (b":authority", b"x")]),
        PROTOCOL_ERROR,
    ),
    "connection-specific header": (
        lambda p: _hdrs(p, 1, headers=[*request_header_list(), (b"connection", b"close")]),
        PROTOCOL_ERROR,
    ),
    "response pseudo-header in a request": (
        lambda p: _hdrs(p, 1, headers=[(b":status", b"200"), *request_header_list()]),
        PROTOCOL_ERROR,
    ),
    "stream depends on itself": (
        lambda p: frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, struct.pack(">IB", 1, 0) + p.encoder.encode([])),
        PROTOCOL_ERROR,
    ),
    "trailers without END_STREAM": (lambda p: _hdrs(p, 1) + _hdrs(p, 1, headers=[(b"x-t", b"1")]), PROTOCOL_ERROR),
    "pseudo-header in trailers": (
        lambda p: _hdrs(p, 1) + _hdrs(p, 1, end_stream=True, headers=[(b":path", b"/")]),
        PROTOCOL_ERROR,
    ),
    "WINDOW_UPDATE zero on a stream": (lambda p: _hdrs(p, 1) + window_update(1, 0), PROTOCOL_ERROR),
    "WINDOW_UPDATE overflows a stream": (lambda p: _hdrs(p, 1) + window_update(1, (1 << 31) - 1), FLOW_CONTROL_ERROR),
    "PRIORITY self-dependency on an open stream": (
        lambda p: _hdrs(p, 1) + frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 0)),
        PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("case", sorted(STREAM_ERRORS))
def test_stream_errors_reset_only_that_stream(case):
    build, code = STREAM_ERRORS[case]
    peer = Peer()
    peer.send(build(peer))
    assert peer.stream(1).rst == code
    assert not peer.conn.closed and peer.conn.open_streams == 0
    peer.request(3, req())
    assert peer.stream(3).grpc_status == 0


def test_data_on_a_half_closed_stream_is_stream_closed():
    peer = Peer()
    peer.send(_hdrs(peer, 1) + data_frame(1, b"", end_stream=True) + data_frame(1, b"x"))
    assert peer.stream(1).grpc_status == 0
    assert peer.stream(1).rst == STREAM_CLOSED and not peer.conn.closed


def test_too_many_streams_are_refused():
    peer = Peer(H2Limits(max_concurrent_streams=2))
    for sid in (1, 3, 5):
        peer.send(_hdrs(peer, sid))
    assert peer.stream(5).rst == REFUSED_STREAM
    assert peer.counters.refused_streams == 1 and peer.conn.open_streams == 2
    peer.send(data_frame(5, b"late"))  # late frames on the refused stream are ignored
    assert not peer.conn.closed and peer.stream(5).rst == REFUSED_STREAM


def test_bad_preface_is_a_protocol_error():
    conn = H2Connection(EchoProcessor)
    reader = Reader()
    reader.feed(conn.initiate())
    reader.feed(conn.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert conn.closed and reader.goaway_code == PROTOCOL_ERROR


def test_first_frame_must_be_settings():
    conn = H2Connection(EchoProcessor)
    reader = Reader()
    reader.feed(conn.initiate())
    reader.feed(conn.receive(PREFACE + ping()))
    assert reader.goaway_code == PROTOCOL_ERROR


# ----------------------------------------------------------------------------- shutdown


def test_drain_in_two_steps_finishes_open_streams_and_refuses_new_ones():
    peer = Peer()
    peer.request(1, req(), end=False)
    peer.reader.feed(peer.conn.start_drain())
    assert peer.reader.goaways == [((1 << 31) - 1, NO_ERROR)]
    peer.request(3, req(), end=False)  # in flight before the peer saw the GOAWAY: still served
    assert len(peer.stream(3).messages) == 1
    drain_ping = next(f[3] for f in peer.reader.frames if f[0] == PING and not f[1] & ACK)
    peer.send(ping(drain_ping, ack=True))
    assert peer.reader.goaways[-1] == (3, NO_ERROR)
    peer.request(5, req())
    assert peer.stream(5).rst == REFUSED_STREAM
    peer.send(data_frame(1, grpc_message(req("request_body")), end_stream=True))
    assert len(peer.stream(1).messages) == 2 and peer.stream(1).grpc_status == 0
    assert not peer.conn.closed
    peer.send(data_frame(3, b"", end_stream=True))
    assert peer.stream(3).grpc_status == 0
    assert peer.conn.closed  # last stream done: the adapter closes the socket


def test_drain_without_streams_closes_after_the_final_goaway():
    peer = Peer()
    peer.reader.feed(peer.conn.start_drain())
    peer.reader.feed(peer.conn.finish_drain())
    assert peer.conn.closed and peer.reader.goaways[-1] == (0, NO_ERROR)


def test_peer_goaway_closes_once_its_streams_are_done():
    peer = Peer()
    peer.request(1, req(), end=False)
    peer.send(goaway(1))
    assert not peer.conn.closed
    peer.send(data_frame(1, b"", end_stream=True))
    assert peer.conn.closed and peer.reader.goaway_code == NO_ERROR


# ----------------------------------------------------------------------------- properties


@st.composite
def wire_scenarios(draw):
    """Valid ext_proc traffic on one connection, and an equivalent framing of it.

    Returns (canonical bytes, split-and-interleaved chunks, pings sent, settings frames sent).
    """
    n_streams = draw(st.integers(1, 4))
    streams = []
    for _ in range(n_streams):
        messages = draw(st.lists(processing_requests(), max_size=3))
        ending = draw(st.sampled_from(["data", "empty", "trailers", "open", "cancel"]))
        extra = draw(st.lists(st.tuples(st.sampled_from([b"x-a", b"x-b"]), st.sampled_from([b"1", b"22"])), max_size=2))
        streams.append((b"".join(grpc_message(m) for m in messages), ending, extra))

    def units(index: int) -> list[tuple]:
        body, ending, extra = streams[index]
        out: list[tuple] = [("headers", extra, ending == "data" and not body)]
        cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=4))) | {0, len(body)})
        pieces = [body[a:b] for a, b in itertools.pairwise(cuts)] or []
        for i, piece in enumerate(pieces):
            out.append(("data", piece, ending == "data" and i == len(pieces) - 1))
        if ending == "empty":
            out.append(("data", b"", True))
        elif ending == "trailers":
            out.append(("trailers", [(b"x-trailer", b"t")], True))
        elif ending == "cancel":
            out.append(("rst",))
        return out

    plan = [units(i) for i in range(n_streams)]
    started = 0
    order: list[tuple[int, tuple]] = []
    while any(plan):
        candidates = [i for i in range(started) if plan[i]] + ([started] if started < n_streams else [])
        i = candidates[draw(st.integers(0, len(candidates) - 1))]
        started = max(started, i + 1)
        order.append((i, plan[i].pop(0)))

    encoder = hpack.Encoder()
    split = b""
    pings, n_settings = [], 1
    for i, unit in order:
        sid = 2 * i + 1
        extra_frame = draw(st.sampled_from([None, None, None, "ping", "settings"]))
        if extra_frame == "ping":
            opaque = draw(st.binary(min_size=8, max_size=8))
            pings.append(opaque)
            split += ping(opaque)
        elif extra_frame == "settings":
            values = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "header_table_size": st.integers(0, 4096),
                        "max_frame_size": st.integers(16384, (1 << 24) - 1),
                        "initial_window_size": st.integers(65535, 1 << 20),
                        "max_concurrent_streams": st.integers(10, 1000),
                    },
                )
            )
            n_settings += 1
            split += settings_frame(**values)
        if unit[0] in ("headers", "trailers"):
            headers = request_header_list(extra=unit[1]) if unit[0] == "headers" else unit[1]
            block = encoder.encode(headers, huffman=draw(st.booleans()))
            cuts = sorted(set(draw(st.lists(st.integers(0, len(block)), max_size=3))) | {0, len(block)})
            parts = [block[a:b] for a, b in itertools.pairwise(cuts)] or [b""]
            flags = END_STREAM if unit[2] else 0
            prefix = b""
            if draw(st.booleans()):
                flags |= PRIORITY_FLAG
                prefix = struct.pack(">IB", 0, draw(st.integers(0, 255)))
            pad = draw(st.none() | st.integers(0, 20))
            if pad is not None:
                flags |= PADDED
                prefix = bytes([pad]) + prefix
            first = prefix + parts[0] + b"\0" * (pad or 0)
            if len(parts) == 1:
                split += frame(HEADERS, flags | END_HEADERS, sid, first)
            else:
                split += frame(HEADERS, flags, sid, first)
                for j, part in enumerate(parts[1:]):
                    split += frame(CONTINUATION, END_HEADERS if j == len(parts) - 2 else 0, sid, part)
        elif unit[0] == "data":
            pad = draw(st.none() | st.integers(0, 20))
            flags = END_STREAM if unit[2] else 0
            payload = unit[1]
            if pad is not None:
                flags |= PADDED
                payload = bytes([pad]) + payload + b"\0" * pad
            split += frame(DATA, flags, sid, payload)
        else:
            split += rst(sid, CANCEL)

    # The canonical framing: stream after stream, one HEADERS, the whole body in one DATA frame.
    encoder = hpack.Encoder()
    canonical = b""
    for i, (body, ending, extra) in enumerate(streams):
        sid = 2 * i + 1
        canonical += headers_frame(encoder, sid, end_stream=ending == "data" and not body,
                                   headers=request_header_list(extra=extra))  # fmt: skip
        if body:
            canonical += data_frame(sid, body, end_stream=ending == "data")
        if ending == "empty":
            canonical += data_frame(sid, b"", end_stream=True)
        elif ending == "trailers":
            canonical += headers_frame(encoder, sid, end_stream=True, headers=[(b"x-trailer", b"t")])
        elif ending == "cancel":
            canonical += rst(sid, CANCEL)

    cut_points = sorted(set(draw(st.lists(st.integers(0, len(split)), max_size=12))))
    bounds = [0, *cut_points, len(split)]
    chunks = [split[a:b] for a, b in itertools.pairwise(bounds)]
    return canonical, chunks, pings, n_settings


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire_scenarios())
def test_any_framing_and_chunking_gives_the_same_responses(scenario):
    canonical, chunks, pings, n_settings = scenario
    reference = Peer()
    reference.send(canonical)
    peer = Peer()
    for chunk in chunks:
        peer.send(chunk)
    assert peer.reader.summary() == reference.reader.summary()
    assert peer.reader.ping_acks == pings
    assert peer.reader.settings_acks == n_settings
    assert peer.reader.goaways == [] and not peer.conn.closed
    assert peer.counters.internal_errors == 0


_FRAME_TYPES = st.sampled_from([DATA, DATA, DATA, HEADERS, HEADERS, CONTINUATION, PRIORITY, RST_STREAM, SETTINGS,
                                PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION, 0xA, 0xFF])  # fmt: skip
_SIDS = st.sampled_from([0, 1, 1, 1, 2, 3, 5, 7, 99, (1 << 31) - 1])
_FLAGS = st.sampled_from([0, END_STREAM, PADDED, PADDED | END_STREAM, END_HEADERS, PRIORITY_FLAG | END_HEADERS,
                          PADDED | PRIORITY_FLAG | END_HEADERS | END_STREAM, ACK]) | st.integers(0, 255)  # fmt: skip


@st.composite
def hostile_frames(draw) -> bytes:
    kind = draw(st.sampled_from(["raw", "raw", "garbage", "settings", "window", "grpc", "headers", "big_headers"]))
    sid = draw(_SIDS)
    if kind == "big_headers":  # over the header-list limit, split into HEADERS + CONTINUATION frames
        value = b"v" * draw(st.integers(9_000, 12_000))
        block = hpack.Encoder().encode(request_header_list(extra=[(b"x-big", value), (b"x-big2", value)]))
        parts = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        out = frame(HEADERS, 0, sid, parts[0])
        for j, part in enumerate(parts[1:], 2):
            out += frame(CONTINUATION, END_HEADERS if j == len(parts) else 0, sid, part)
        return out
    if kind == "raw":
        payload = draw(st.sampled_from([b"", b"\0", b"\x01", b"\xff" * 4, b"\0" * 8]) | st.binary(max_size=40))
        return frame(draw(_FRAME_TYPES), draw(_FLAGS), sid, payload)
    if kind == "garbage":  # a header whose length field lies, or plain noise
        return draw(st.binary(min_size=1, max_size=30))
    if kind == "settings":
        pairs = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, (1 << 32) - 1)), max_size=3))
        return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))
    if kind == "window":
        return window_update(sid, draw(st.integers(0, (1 << 32) - 1)))
    if kind == "grpc":
        flag = draw(st.sampled_from([0, 0, 1, 7]))
        length = draw(st.sampled_from([0, 5, 100, 1 << 30, (1 << 32) - 1]))
        return data_frame(sid, struct.pack(">BI", flag, length) + draw(st.binary(max_size=20)),
                          end_stream=draw(st.booleans()))  # fmt: skip
    headers = draw(st.lists(st.tuples(st.sampled_from([b":path", b":method", b"x-a", b"X-B", b"te", b""]),
                                      st.binary(max_size=10)), max_size=5))  # fmt: skip
    if draw(st.booleans()):
        headers = request_header_list() + headers
    block = hpack.Encoder().encode(headers)
    return frame(HEADERS, draw(st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM, 0])), sid, block)


def test_every_small_frame_shape_on_a_live_stream_is_handled():
    """Exhaustive over types, flag combinations and edge payloads: no internal error, ever."""
    payloads = [b"", b"\0", b"\x01", b"\x05", b"\xff", b"\0\0\0\0", b"\0\0\0\1\x10", b"\x03\0\0\0\1\x10",
                b"\0" * 8, b"\xff" * 9]  # fmt: skip
    flags = [0, END_STREAM, PADDED, PRIORITY_FLAG, END_HEADERS, PADDED | PRIORITY_FLAG,
             PADDED | PRIORITY_FLAG | END_HEADERS | END_STREAM, 0xFF]  # fmt: skip
    for ftype in range(12):
        for flag in flags:
            for sid in (0, 1, 2, 3):
                for payload in payloads:
                    peer = Peer()
                    peer.request(1, req(), end=False)
                    peer.send(frame(ftype, flag, sid, payload))
                    assert peer.counters.internal_errors == 0, (ftype, flag, sid, payload)
                    assert not peer.conn.closed or peer.reader.frames[-1][0] == GOAWAY


@settings(max_examples=500, deadline=None)
@given(hostile_frames())
def test_any_single_frame_on_a_live_stream_is_handled(hostile):
    peer = Peer(H2Limits(max_message_size=2048))
    peer.request(1, req(), end=False)
    peer.send(hostile)
    assert peer.counters.internal_errors == 0
    if peer.conn.closed:
        assert peer.reader.frames[-1][0] == GOAWAY


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.booleans() | hostile_frames(), max_size=25),
    st.lists(st.integers(1, 64), min_size=1, max_size=10),
)
def test_hostile_input_ends_cleanly_with_memory_bounded(items, chunk_sizes):
    """Any bytes after a valid handshake: no exception, bounded buffers, GOAWAY if it closes."""
    limits = H2Limits(max_concurrent_streams=4, max_buffered_bytes=4096, max_pending_output=4096,
                      max_message_size=2048)  # fmt: skip
    peer = Peer(limits)
    stream = b""
    sid = 1
    for item in items:
        if item is True:  # interleave valid requests so hostile frames hit live streams too
            stream += headers_frame(peer.encoder, sid) + data_frame(sid, grpc_message(req()))
            sid += 2
        elif item is not False:
            stream += item
    bound = limits.max_frame_size + 9 + limits.max_header_list_size + 1024
    bound += limits.max_buffered_bytes + limits.max_pending_output
    pos, i = 0, 0
    while pos < len(stream):
        size = chunk_sizes[i % len(chunk_sizes)] * 7
        peer.send(stream[pos : pos + size])
        pos, i = pos + size, i + 1
        assert peer.conn.buffered_bytes <= bound
        assert peer.conn.open_streams <= limits.max_concurrent_streams
        # A stream the connection still holds is live: IDLE and CLOSED ones are never kept.
        assert all(s.state in LIVE_STATES for s in peer.conn._streams.values())
    assert peer.counters.internal_errors == 0
    if peer.conn.closed:
        assert peer.reader.frames[-1][0] == GOAWAY
        assert peer.conn.buffered_bytes == 0
