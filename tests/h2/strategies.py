"""Test-side HTTP/2 for the fast ext_proc server: a frame writer/reader written independently of
``gateway.h2`` (so the server's codec is not checked against itself), a response transcript, an
in-memory peer with a hand-driven clock, test processors, and the hypothesis strategies the
h2server tests share.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import hpack
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import strategies as st

from gateway.h2 import H2Connection, H2Counters, H2Limits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHOD = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11


# ------------------------------------------------------------------------------------ writing


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3,
           "initial_window_size": 4, "max_frame_size": 5, "max_header_list_size": 6}  # fmt: skip
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def ping(opaque: bytes = b"12345678", *, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def goaway(last: int, code: int = NO_ERROR) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last, code))


def handshake(**settings_values: int) -> bytes:
    return PREFACE + settings(**settings_values)


def request_header_list(
    path: bytes = METHOD, *, method: bytes = b"POST", content_type: bytes = b"application/grpc", extra=()
) -> list[tuple[bytes, bytes]]:
    """The header list Envoy's gRPC client sends to open an ext_proc stream."""
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"ext_proc_cluster"),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        (b"x-envoy-internal", b"true"),
        *extra,
    ]


def headers_frame(encoder: hpack.Encoder, sid: int, *, end_stream: bool = False, headers=None) -> bytes:
    block = encoder.encode(headers if headers is not None else request_header_list())
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block)


def grpc_message(message: bytes | pb.ProcessingRequest, *, flag: int = 0) -> bytes:
    body = message if isinstance(message, bytes) else message.SerializeToString()
    return struct.pack(">BI", flag, len(body)) + body


def data_frame(sid: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, sid, payload)


# ------------------------------------------------------------------------------------ reading


@dataclass
class StreamTranscript:
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # every header block
    data: bytes = b""
    ended: bool = False
    rst: int | None = None

    @property
    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos + 5 <= len(self.data):
            flag, length = struct.unpack_from(">BI", self.data, pos)
            assert flag == 0, "the server never compresses"
            out.append(self.data[pos + 5 : pos + 5 + length])
            pos += 5 + length
        assert pos == len(self.data), "a truncated gRPC message in the response"
        return out

    @property
    def responses(self) -> list[pb.ProcessingResponse]:
        return [pb.ProcessingResponse.FromString(m) for m in self.messages]

    def field(self, name: bytes) -> bytes | None:
        for block in self.headers:
            for n, v in block:
                if n == name:
                    return v
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.field(b"grpc-status")
        return None if value is None else int(value)


class Reader:
    """Parses everything the server writes: frames, its HPACK blocks, per-stream transcripts."""

    def __init__(self) -> None:
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.streams: dict[int, StreamTranscript] = {}
        self.settings: list[dict[int, int]] = []
        self.settings_acks = 0
        self.ping_acks: list[bytes] = []
        self.goaways: list[tuple[int, int]] = []
        self.window_updates: list[tuple[int, int]] = []
        self._block = b""
        self._block_sid = 0
        self._block_end = False

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self.buf += data
        new = []
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            ftype, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            new.append((ftype, flags, sid, payload))
            self._on_frame(ftype, flags, sid, payload)
        self.frames.extend(new)
        return new

    def stream(self, sid: int) -> StreamTranscript:
        return self.streams.setdefault(sid, StreamTranscript())

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._block_sid:
            assert ftype == CONTINUATION and sid == self._block_sid, "server broke a header block"
        if ftype == DATA:
            s = self.stream(sid)
            assert not s.ended and s.rst is None, "DATA after the stream ended"
            s.data += payload
            s.ended = bool(flags & END_STREAM)
        elif ftype in (HEADERS, CONTINUATION):
            self._block += payload
            if ftype == HEADERS:
                self._block_sid, self._block_end = sid, bool(flags & END_STREAM)
            if flags & END_HEADERS:
                s = self.stream(self._block_sid)
                assert not s.ended and s.rst is None, "HEADERS after the stream ended"
                s.headers.append([(bytes(n), bytes(v)) for n, v in self.decoder.decode(self._block, raw=True)])
                s.ended = self._block_end
                self._block, self._block_sid = b"", 0
        elif ftype == RST_STREAM:
            self.stream(sid).rst = struct.unpack(">I", payload)[0]
        elif ftype == SETTINGS:
            if flags & ACK:
                self.settings_acks += 1
            else:
                self.settings.append(dict(struct.iter_unpack(">HI", payload)))
        elif ftype == PING:
            assert flags & ACK or payload.startswith(b"drain"), "the server only pings to drain"
            if flags & ACK:
                self.ping_acks.append(payload)
        elif ftype == GOAWAY:
            self.goaways.append(struct.unpack_from(">II", payload))
        elif ftype == WINDOW_UPDATE:
            self.window_updates.append((sid, struct.unpack(">I", payload)[0]))
        else:
            raise AssertionError(f"server sent frame type {ftype}")

    @property
    def goaway_code(self) -> int | None:
        return self.goaways[-1][1] if self.goaways else None

    def summary(self) -> dict[int, tuple]:
        """What the peer can observe per stream, independent of framing and timing."""
        return {
            sid: (tuple(tuple(b) for b in s.headers), tuple(s.messages), s.ended, s.rst)
            for sid, s in sorted(self.streams.items())
        }


# ------------------------------------------------------------------------------------ peer


class FakeClock:
    """A clock that moves only when told: timeouts and flood windows without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Peer:
    """A client talking to one H2Connection through memory, on a ``FakeClock``."""

    def __init__(
        self,
        limits: H2Limits | None = None,
        processor=None,
        *,
        local: bool = False,
        handshake_done: bool = True,
        **client_settings: int,
    ) -> None:
        self.counters = H2Counters()
        self.clock = FakeClock()
        self.conn = H2Connection(processor or EchoProcessor, limits, self.counters, clock=self.clock, local=local)
        self.reader = Reader()
        self.reader.feed(self.conn.initiate())
        self.encoder = hpack.Encoder()
        self.send(handshake(**client_settings))
        if handshake_done:
            self.send(frame(SETTINGS, ACK, 0))  # as every real client does

    def send(self, data: bytes) -> list:
        return self.reader.feed(self.conn.receive(data))

    def tick(self, advance: float = 0.0) -> list:
        self.clock.advance(advance)
        return self.reader.feed(self.conn.tick())

    def request(self, sid: int, *messages, end: bool = True, headers=None) -> None:
        frames = headers_frame(self.encoder, sid, headers=headers, end_stream=end and not messages)
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            frames += data_frame(sid, m if isinstance(m, bytes) else grpc_message(m), end_stream=end and last)
        self.send(frames)

    def stream(self, sid: int) -> StreamTranscript:
        return self.reader.stream(sid)

    @property
    def goaway_code(self) -> int | None:
        return self.reader.goaway_code


# ------------------------------------------------------------------------------------ processors


class EchoProcessor:
    """Deterministic per stream: answers each message with what it saw, in order.

    request_trailers get no answer (exercises ``None``); a request header ``x-boom`` raises.
    """

    def __init__(self) -> None:
        self.seen = 0

    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        self.seen += 1
        kind = request.WhichOneof("request")
        if kind == "request_trailers":
            return None
        if kind == "request_headers":
            for h in request.request_headers.headers.headers:
                if h.key == "x-boom":
                    raise RuntimeError("secret failure detail")
        response = pb.ProcessingResponse()
        common = response.request_headers.response
        mutation = common.header_mutation.set_headers.add().header
        mutation.key = f"x-seen-{self.seen}"
        mutation.raw_value = f"{kind}:{request.ByteSize()}".encode()
        return response


# ------------------------------------------------------------------------------------ strategies

header_keys = st.sampled_from([":path", ":method", "authorization", "x-user", "content-type", "x-boom-not"])
header_values = st.binary(max_size=40)


@st.composite
def header_maps(draw) -> base_pb2.HeaderMap:
    hm = base_pb2.HeaderMap()
    for key, value in draw(st.lists(st.tuples(header_keys, header_values), max_size=6)):
        h = hm.headers.add()
        h.key, h.raw_value = key, value
    return hm


@st.composite
def processing_requests(draw) -> pb.ProcessingRequest:
    """Every message shape Envoy sends on an ext_proc stream."""
    req = pb.ProcessingRequest()
    kind = draw(st.sampled_from(["request_headers", "request_body", "response_headers",
                                 "response_body", "request_trailers", "response_trailers"]))  # fmt: skip
    if kind in ("request_headers", "response_headers"):
        getattr(req, kind).headers.CopyFrom(draw(header_maps()))
        getattr(req, kind).end_of_stream = draw(st.booleans())
    elif kind in ("request_body", "response_body"):
        getattr(req, kind).body = draw(st.binary(max_size=300))
        getattr(req, kind).end_of_stream = draw(st.booleans())
    else:
        getattr(req, kind).trailers.CopyFrom(draw(header_maps()))
    if draw(st.booleans()):
        attrs = struct_pb2.Struct()
        attrs.update({"source.principal": draw(st.text(max_size=20)), "request.size": 12})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


@st.composite
def legal_stream_events(draw, max_steps: int = 12) -> list:
    """A walk through ``streamstate.TRANSITIONS`` from IDLE: each event legal where it is taken."""
    from gateway.h2.streamstate import TRANSITIONS, StreamState

    state, events = StreamState.IDLE, []
    for _ in range(draw(st.integers(0, max_steps))):
        choices = sorted((e for (s, e) in TRANSITIONS if s is state), key=lambda e: e.name)
        if not choices:
            break
        event = draw(st.sampled_from(choices))
        events.append(event)
        state = TRANSITIONS[state, event]
    return events
