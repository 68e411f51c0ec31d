"""The server side of one HTTP/2 connection carrying ext_proc gRPC streams, without I/O.

Sans-I/O in the manner of h11 and h2: ``receive(bytes) -> bytes`` feeds what the peer sent and
returns what to send back; the asyncio adapter (``server.py``) only moves bytes. Because the
per-stream processor is synchronous, every message is answered inside the ``receive`` call that
completed it, in order, so the connection never holds unbounded work.

Written for one peer (Envoy) and one method, not as a general HTTP/2 library, yet it keeps the
rules a peer may rely on: SETTINGS and PING acknowledged, both flow-control levels honoured for
DATA it sends and re-opened for DATA it receives, CONTINUATION, padding and priority fields
parsed, frame-size, header-list and concurrent-stream limits enforced, unknown frame types
ignored, GOAWAY in two steps on drain (RFC 9113 §6.8). Misbehaviour ends the stream with
RST_STREAM or the connection with GOAWAY, carrying the RFC's error code; nothing the peer sends
raises out of ``receive`` and every buffer has a bound:

    input       < one frame (max_frame_size + 9) between calls
    messages    <= max_message_size per stream, max_buffered_bytes per connection
    output      <= max_pending_output of DATA waiting for the peer's windows
    headers     <= max_header_list_size decoded, a little more compressed

This module holds the frames and the connection's own state; the rest has its own home:

    streamstate.py  a stream's lifecycle, as a transition table
    flowcontrol.py  windows in both directions, WINDOW_UPDATE, DATA queued behind them
    grpcstream.py   one gRPC call: message framing, the processor, its final status
    errors.py       the connection and stream protocol errors
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import hpack

from gateway.h2 import frames as f
from gateway.h2.errors import ConnectionProtocolError, StreamProtocolError
from gateway.h2.flowcontrol import ReceiveWindow, SendFlow
from gateway.h2.frames import ErrorCode
from gateway.h2.grpcstream import GrpcStream, MalformedMessage, NewProcessor, StreamProcessor
from gateway.h2.grpcwire import MALFORMED, RESPONSE_HEADERS, GrpcStatus, request_verdict, trailers, trailers_valid
from gateway.h2.hpackmemo import Headers, MemoDecoder
from gateway.h2.streamstate import StreamEvent, StreamState, next_state

__all__ = ["DRAIN_PING_GRACE", "H2Connection", "H2Counters", "H2Limits", "NewProcessor", "StreamProcessor"]

log = logging.getLogger("gateway.h2")

# Enum members bound once: a class attribute lookup costs more than the table lookup it feeds.
_IDLE = StreamState.IDLE
_OPEN = StreamState.OPEN
_ANSWERED = StreamState.ANSWERED
_ANSWERED_REMOTE_CLOSED = StreamState.ANSWERED_REMOTE_CLOSED
_CLOSED = StreamState.CLOSED
_ANSWER_UNDECIDED = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_RECV_HEADERS = StreamEvent.RECV_HEADERS
_RECV_DATA = StreamEvent.RECV_DATA
_RECV_END_STREAM = StreamEvent.RECV_END_STREAM
_RECV_RST_STREAM = StreamEvent.RECV_RST_STREAM
_ANSWER = StreamEvent.ANSWER
_SEND_END_STREAM = StreamEvent.SEND_END_STREAM
_SEND_RST_STREAM = StreamEvent.SEND_RST_STREAM
_CONNECTION_CLOSED = StreamEvent.CONNECTION_CLOSED


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one connection may cost. Defaults suit Envoy's ext_proc traffic with room to spare.

    Timeouts are in seconds (``None`` turns one off) and are applied by ``H2Connection.tick()``.
    Flood limits count events per connection within ``flood_window`` seconds; one more than the
    limit ends the connection with GOAWAY ENHANCE_YOUR_CALM (the HTTP/2 DoS classes of
    CVE-2019-9512/9515/9518 and CVE-2023-44487).
    """

    max_concurrent_streams: int = 256
    initial_window_size: int = 1 << 20  # per stream, advertised in SETTINGS
    connection_window_size: int = 1 << 24
    max_frame_size: int = f.DEFAULT_MAX_FRAME
    max_header_list_size: int = 16 << 10
    max_message_size: int = 4 << 20
    max_buffered_bytes: int = 16 << 20  # partial messages, all streams of a connection
    max_pending_output: int = 16 << 20  # DATA waiting for the peer's flow-control windows
    header_cache_entries: int = 256
    max_continuation_frames: int = 64  # per header block
    # Timeouts.
    settings_timeout: float | None = 10.0  # the peer must ACK our SETTINGS (else GOAWAY SETTINGS_TIMEOUT)
    idle_timeout: float | None = 300.0  # TCP/TLS: no open stream this long -> graceful GOAWAY
    # A Unix-socket peer is our own Envoy on this host: the kernel reports its death, so no
    # half-open connection can linger, and closing an idle one only costs Envoy a reconnect.
    uds_idle_timeout: float | None = None
    # Floods: events allowed per flood_window.
    flood_window: float = 10.0
    max_peer_resets: int = 1000  # RST_STREAM cancelling a stream not yet answered (rapid reset)
    max_pings: int = 1000  # PINGs that need an ACK
    max_settings: int = 100  # SETTINGS frames that need an ACK
    max_settings_entries: int = 32  # per SETTINGS frame
    max_empty_frames: int = 100  # DATA without data or END_STREAM, header fragments without data or END_HEADERS

    def __post_init__(self) -> None:
        def timeout_ok(value: float | None) -> bool:
            return value is None or value > 0

        checks = [
            (1 <= self.max_concurrent_streams <= f.MAX_WINDOW, "max_concurrent_streams"),
            (f.DEFAULT_WINDOW <= self.initial_window_size <= f.MAX_WINDOW, "initial_window_size"),
            (f.DEFAULT_WINDOW <= self.connection_window_size <= f.MAX_WINDOW, "connection_window_size"),
            (f.DEFAULT_MAX_FRAME <= self.max_frame_size <= f.MAX_MAX_FRAME, "max_frame_size"),
            (self.max_header_list_size >= 1024, "max_header_list_size"),
            (self.max_message_size >= 1, "max_message_size"),
            (self.max_buffered_bytes >= 1, "max_buffered_bytes"),
            (self.max_pending_output >= 1, "max_pending_output"),
            (self.header_cache_entries >= 1, "header_cache_entries"),
            (self.max_continuation_frames >= 0, "max_continuation_frames"),
            (timeout_ok(self.settings_timeout), "settings_timeout"),
            (timeout_ok(self.idle_timeout), "idle_timeout"),
            (timeout_ok(self.uds_idle_timeout), "uds_idle_timeout"),
            (self.flood_window > 0, "flood_window"),
            (self.max_peer_resets >= 1, "max_peer_resets"),
            (self.max_pings >= 1, "max_pings"),
            (self.max_settings >= 1, "max_settings"),
            (self.max_settings_entries >= 1, "max_settings_entries"),
            (self.max_empty_frames >= 1, "max_empty_frames"),
        ]
        bad = [name for ok, name in checks if not ok]
        if bad:
            raise ValueError(f"H2Limits out of range: {', '.join(bad)}")

    @property
    def tick_interval(self) -> float:
        """How often the adapter should call ``tick()``: a quarter of the shortest timeout, at most 1 s."""
        timeouts = [t for t in (self.settings_timeout, self.idle_timeout, self.uds_idle_timeout) if t is not None]
        return max(0.01, min([1.0, *(t / 4 for t in timeouts)]))


@dataclass(slots=True)
class H2Counters:
    """Running totals, shared by every connection of a server (read them for metrics)."""

    connections: int = 0
    streams: int = 0
    messages: int = 0
    processor_errors: int = 0
    connection_errors: int = 0  # GOAWAY sent with an error code
    internal_errors: int = 0  # a bug of ours caught at the connection boundary (GOAWAY INTERNAL_ERROR)
    stream_errors: int = 0  # RST_STREAM sent with an error code
    refused_streams: int = 0
    peer_resets: int = 0  # RST_STREAM received (Envoy ends every ext_proc stream this way)
    deadline_exceeded: int = 0  # streams answered DEADLINE_EXCEEDED (their grpc-timeout ran out)
    settings_timeouts: int = 0  # GOAWAY SETTINGS_TIMEOUT: our SETTINGS never acknowledged
    idle_timeouts: int = 0  # connections closed (gracefully) for having no stream too long
    # Flood limits hit, each a GOAWAY ENHANCE_YOUR_CALM (also counted in connection_errors).
    flood_resets: int = 0
    flood_pings: int = 0
    flood_settings: int = 0
    flood_empty_frames: int = 0


_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_DRAIN_PING = b"drain\x00\x00\x01"
#: How long a drain waits for the PING's ACK before the final GOAWAY (the server's timer and
#: ``tick()`` both enforce it, so a peer that never answers cannot hold a drain open).
DRAIN_PING_GRACE = 1.0
_RESET_MEMORY = 256  # stream ids reset by us, whose late frames are ignored (RFC 9113 §5.4.2)

_PREFACE, _SETTINGS_FIRST, _FRAMES = 0, 1, 2  # what the connection reads next


class H2Connection:
    """Server side of one connection: ``initiate()`` once, then ``receive()`` per chunk read."""

    def __init__(
        self,
        new_processor: NewProcessor,
        limits: H2Limits | None = None,
        counters: H2Counters | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        local: bool = False,
        trace_context: bool = False,
    ) -> None:
        """``local``: the peer came over a Unix socket (``uds_idle_timeout`` applies, not ``idle_timeout``).

        ``trace_context``: hand each new processor the stream's ``traceparent``/``tracestate``
        metadata (Envoy puts its own trace context there when it started the trace); off, nothing
        is read and the factory is called with no argument.

        ``clock`` is read only for timeouts, grpc-timeout deadlines and when a flood counter
        reaches its limit, never per frame.
        """
        self._new_processor = new_processor
        self._trace_context = trace_context
        self.limits = limits = limits or H2Limits()
        self.counters = counters if counters is not None else H2Counters()
        self._clock = clock
        now = clock()
        self._decoder = MemoDecoder(
            max_header_list_size=limits.max_header_list_size,
            max_entries=limits.header_cache_entries,
            derive=request_verdict,
        )
        self._out: list[bytes] = []
        self._inbuf = bytearray()
        self._state = _PREFACE
        self.closed = False
        self._streams: dict[int, GrpcStream] = {}
        self._reset_ids: dict[int, None] = {}
        self._last_sid = 0
        self._accept_limit = f.MAX_STREAM_ID
        self._drain_state = 0  # 0 serving, 1 first GOAWAY sent, 2 final GOAWAY sent
        self._peer_goaway = False
        # Header block being assembled from HEADERS + CONTINUATION.
        self._header_sid = 0
        self._header_frag = bytearray()
        self._header_end_stream = False
        self._header_self_dep = False
        self._header_count = 0
        self._max_block = limits.max_header_list_size + 1024
        # Our receive side: the peer starts with the RFC's default connection window until initiate().
        self._max_frame_in = limits.max_frame_size
        self._stream_window = limits.initial_window_size
        self._recv_window = ReceiveWindow(limits.connection_window_size, f.DEFAULT_WINDOW)
        self._max_message = limits.max_message_size
        self._buffered = 0  # partial gRPC messages, all streams
        # The peer's receive side, which limits what we send.
        self._send_flow: SendFlow[GrpcStream] = SendFlow(limits.max_pending_output)
        self._encoder_table = f.DEFAULT_HEADER_TABLE
        self._block_prefix = b""
        # Timeouts (see tick()).
        self._settings_ack_due: float | None = None
        self._idle_timeout = limits.uds_idle_timeout if local else limits.idle_timeout
        self._idle_since = now
        self._idle_mark = 0  # _last_sid when _idle_since was set: a new stream since means not idle
        self._drain_since = now
        # Flood counters, since _window_start (see _over_limit()).
        self._window_start = now
        self._resets = 0
        self._pings = 0
        self._settings = 0
        self._empty = 0

    # ------------------------------------------------------------------ public surface

    def initiate(self) -> bytes:
        """Our SETTINGS and connection WINDOW_UPDATE, sent as soon as the socket is up."""
        self.counters.connections += 1
        lim = self.limits
        settings = {
            f.SETTINGS_ENABLE_PUSH: 0,
            f.SETTINGS_MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            f.SETTINGS_INITIAL_WINDOW_SIZE: lim.initial_window_size,
            f.SETTINGS_MAX_FRAME_SIZE: lim.max_frame_size,
            f.SETTINGS_MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        out = f.settings_frame(settings)
        if lim.settings_timeout is not None:
            self._settings_ack_due = self._clock() + lim.settings_timeout
        window = self._recv_window
        if window.size > f.DEFAULT_WINDOW:
            out += f.window_update_frame(0, window.size - f.DEFAULT_WINDOW)
            window.available = window.size
        return out

    def receive(self, data: bytes) -> bytes:
        """Consume bytes from the peer; return the bytes to write (possibly empty)."""
        if self.closed:
            return b""
        try:
            self._receive(data)
        except ConnectionProtocolError as exc:
            self._fail_with(exc)
        except Exception:  # a bug of ours must not take the process down with it
            self.counters.internal_errors += 1
            log.exception("h2: internal error; closing the connection")
            self._fail(ErrorCode.INTERNAL_ERROR, "internal error")
        return self._flush()

    def tick(self) -> bytes:
        """Apply the timeouts as of now; the adapter calls this every ``limits.tick_interval``.

        SETTINGS not acknowledged in time: GOAWAY SETTINGS_TIMEOUT. A stream past its grpc-timeout:
        DEADLINE_EXCEEDED. No stream for the idle timeout: a graceful drain (the two-step GOAWAY, so
        a stream the peer opens meanwhile is still served). A drain PING unanswered for
        ``DRAIN_PING_GRACE``: the final GOAWAY.
        """
        if self.closed:
            return b""
        now = self._clock()
        try:
            self._tick(now)
        except ConnectionProtocolError as exc:
            self._fail_with(exc)
        except Exception:
            self.counters.internal_errors += 1
            log.exception("h2: internal error in tick; closing the connection")
            self._fail(ErrorCode.INTERNAL_ERROR, "internal error")
        return self._flush()

    def _tick(self, now: float) -> None:
        due = self._settings_ack_due
        if due is not None and now >= due:
            self.counters.settings_timeouts += 1
            raise ConnectionProtocolError(ErrorCode.SETTINGS_TIMEOUT, "SETTINGS not acknowledged")
        for s in list(self._streams.values()):
            if s.deadline is not None and now >= s.deadline and s.state in _ANSWER_UNDECIDED:
                self._deadline_exceeded(s)
        if self._drain_state == 1:
            if now - self._drain_since >= DRAIN_PING_GRACE:
                self._finish_drain()
            return
        if self._idle_timeout is None or self._drain_state:
            return
        if self._streams or self._last_sid != self._idle_mark:
            self._idle_mark = self._last_sid
            self._idle_since = now
        elif now - self._idle_since >= self._idle_timeout:
            self.counters.idle_timeouts += 1
            log.info("h2: connection idle for %.0f s; closing it gracefully", now - self._idle_since)
            self._start_drain()

    def start_drain(self) -> bytes:
        """First GOAWAY step: announce shutdown, keep accepting streams already in flight."""
        if self.closed or self._drain_state:
            return b""
        self._start_drain()
        return self._flush()

    def _start_drain(self) -> None:
        self._drain_state = 1
        self._drain_since = self._clock()
        self._out.append(f.goaway_frame(f.MAX_STREAM_ID, ErrorCode.NO_ERROR))
        self._out.append(f.ping_frame(_DRAIN_PING))

    def finish_drain(self) -> bytes:
        """Second GOAWAY step (on the PING's ACK, or a timer): refuse streams above the last one."""
        if not self.closed:
            self._finish_drain()
        return self._flush()

    def close(self) -> bytes:
        """Immediate close: a final GOAWAY; open streams are abandoned."""
        if self.closed:
            return b""
        self._out.append(f.goaway_frame(self._last_sid, ErrorCode.NO_ERROR))
        self._abandon()
        return self._flush()

    def connection_lost(self) -> None:
        self._abandon()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the peer: unparsed input, partial messages, window-blocked output."""
        return len(self._inbuf) + len(self._header_frag) + self._buffered + self._send_flow.queued_bytes

    @property
    def draining(self) -> bool:
        return self._drain_state != 0

    # ------------------------------------------------------------------ framing

    def _flush(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    def _receive(self, data: bytes) -> None:
        if self._state == _PREFACE:
            self._inbuf += data
            got = bytes(self._inbuf[: len(f.PREFACE)])
            if not f.PREFACE.startswith(got):
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "bad preface")
            if len(got) < len(f.PREFACE):
                return
            del self._inbuf[: len(f.PREFACE)]
            self._state = _SETTINGS_FIRST
            data = b""
        inbuf = self._inbuf
        if inbuf:
            inbuf += data
            used = self._frames(inbuf)
            del inbuf[:used]
        else:
            used = self._frames(data)
            if used < len(data):
                inbuf += data[used:]

    def _frames(self, buf: bytes | bytearray) -> int:
        """Handle every complete frame in ``buf``; return how many bytes were used."""
        unpack = f.FRAME_HEADER.unpack_from
        pos = 0
        size = len(buf)
        while size - pos >= 9 and not self.closed:
            lt, flags, sid = unpack(buf, pos)
            length = lt >> 8
            if length > self._max_frame_in:
                raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "frame too large")
            end = pos + 9 + length
            if end > size:
                break
            ftype = lt & 0xFF
            sid &= 0x7FFFFFFF
            payload = buf[pos + 9 : end]
            pos = end
            if self._header_sid and ftype != f.CONTINUATION:
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
            if self._state != _FRAMES:
                if ftype != f.SETTINGS or flags & f.ACK:
                    raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame must be SETTINGS")
                self._state = _FRAMES
            try:
                if ftype == f.DATA:
                    self._on_data(flags, sid, payload)
                elif ftype == f.HEADERS:
                    self._on_headers(flags, sid, payload)
                elif ftype <= f.CONTINUATION:
                    self._HANDLERS[ftype](self, flags, sid, payload)
                # Unknown frame types are ignored (RFC 9113 §4.1, §5.5).
            except StreamProtocolError as exc:
                self._reset(exc.stream_id, exc.code)
        return pos

    # ------------------------------------------------------------------ frame handlers

    def _on_data(self, flags: int, sid: int, payload: bytes | bytearray) -> None:
        if sid == 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        increment = self._recv_window.receive(length)
        if increment is None:
            raise ConnectionProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        if increment:
            self._out.append(f.window_update_frame(0, increment))
        data = payload
        if flags & f.PADDED:
            if length == 0 or payload[0] >= length:
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "bad padding")
            data = payload[1 : length - payload[0]]
        if not data and not flags & f.END_STREAM:
            self._empty_frame()
        s = self._streams.get(sid)
        if s is None:
            self._on_closed_stream(sid, _RECV_DATA)
            return
        s.state = next_state(s.state, _RECV_DATA, sid)
        increment = s.recv_window.receive(length)
        if increment is None:
            raise StreamProtocolError(sid, ErrorCode.FLOW_CONTROL_ERROR)
        if data and s.state is _OPEN:
            self._on_stream_bytes(s, data)
            if s.state is _CLOSED:
                return
        if flags & f.END_STREAM:
            self._end_remote(s)
        elif increment:  # after the answers this DATA brought, as the peer reads them
            self._out.append(f.window_update_frame(sid, increment))

    def _on_headers(self, flags: int, sid: int, payload: bytes | bytearray) -> None:
        if sid == 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & f.PADDED:
            if end < 1:
                raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for padding")
            start, end = 1, end - payload[0]
        self_dep = False
        if flags & f.PRIORITY_FLAG:
            if end - start < 5:
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS too short for priority")
            self_dep = _U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == sid
            start += 5
        if end < start:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "bad padding")
        end_stream = bool(flags & f.END_STREAM)
        if flags & f.END_HEADERS:
            self._on_header_block(sid, bytes(payload[start:end]), end_stream, self_dep)
            return
        if end - start > self._max_block:
            raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if end == start:
            self._empty_frame()
        self._header_sid = sid
        self._header_frag = bytearray(payload[start:end])
        self._header_end_stream = end_stream
        self._header_self_dep = self_dep
        self._header_count = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != self._header_sid or sid == 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        frag = self._header_frag
        frag += payload
        self._header_count += 1
        if not payload and not flags & f.END_HEADERS:
            self._empty_frame()
        if len(frag) > self._max_block or self._header_count > self.limits.max_continuation_frames:
            raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            self._header_sid = 0
            self._header_frag = bytearray()
            self._on_header_block(sid, bytes(frag), self._header_end_stream, self._header_self_dep)

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length")
        if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            if sid > self._last_sid:
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "stream depends on itself")
            raise StreamProtocolError(sid, ErrorCode.PROTOCOL_ERROR)

    def _on_rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid == 0 or sid > self._last_sid:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on idle stream")
        s = self._streams.get(sid)
        if s is None:
            return  # closed: a reset crossing ours, or after our answer
        self.counters.peer_resets += 1
        self._close_stream(s, _RECV_RST_STREAM)
        if not s.headers_sent:
            # Rapid reset (CVE-2023-44487) opens streams and cancels them before they are answered.
            # Only those count: Envoy resets every ext_proc stream, but after it has its answer.
            if self._resets >= self.limits.max_peer_resets and self._over_limit():
                self._flood("flood_resets", "rapid reset")
            self._resets += 1

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            self._settings_ack_due = None  # we send SETTINGS once, in initiate()
            return
        if len(payload) % 6:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        lim = self.limits
        if len(payload) > 6 * lim.max_settings_entries:
            raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many settings in one frame")
        if self._settings >= lim.max_settings and self._over_limit():
            self._flood("flood_settings", "SETTINGS flood")
        self._settings += 1
        flow = self._send_flow
        for off in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, off)
            if ident == f.SETTINGS_INITIAL_WINDOW_SIZE:
                flow.set_initial_window(value, self._streams.values())
            elif ident == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_MAX_FRAME:
                    raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "invalid max frame size")
                flow.max_frame = value
            elif ident == f.SETTINGS_HEADER_TABLE_SIZE:
                if value < self._encoder_table:
                    # Our blocks use only the static table, but the peer's decoder still expects
                    # the shrink to be signalled at the start of our next block (RFC 7541 §4.2).
                    self._encoder_table = value
                    encoder = hpack.Encoder()
                    encoder.header_table_size = value
                    self._block_prefix = encoder.encode([])
            elif ident in (f.SETTINGS_ENABLE_PUSH, f.SETTINGS_ENABLE_CONNECT_PROTOCOL) and value > 1:
                raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "invalid boolean setting")
        self._out.append(f.SETTINGS_ACK_FRAME)
        if flow.blocked:
            self._drain_blocked()

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING length")
        if not flags & f.ACK:
            if self._pings >= self.limits.max_pings and self._over_limit():
                self._flood("flood_pings", "PING flood")
            self._pings += 1
            self._out.append(f.ping_frame(bytes(payload), ack=True))
        elif payload == _DRAIN_PING and self._drain_state == 1:
            self._finish_drain()

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        self._peer_goaway = True
        if _U32.unpack_from(payload, 4)[0] != ErrorCode.NO_ERROR:
            self._out.append(f.goaway_frame(self._last_sid, ErrorCode.NO_ERROR))
            self._abandon()
        else:
            self._maybe_close()

    def _on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        flow = self._send_flow
        if sid == 0:
            flow.grow_connection(increment)
            if flow.blocked:
                self._drain_blocked()
            return
        if sid > self._last_sid:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
        s = self._streams.get(sid)
        if s is None:
            return
        flow.grow_stream(s, increment)
        if s.queued:
            self._drain_stream(s)

    #: The per-frame dispatch, indexed by frame type (DATA and HEADERS are tested first, inline).
    _HANDLERS: tuple[Callable[[H2Connection, int, int, bytes], None], ...] = (
        _on_data,
        _on_headers,
        _on_priority,
        _on_rst_stream,
        _on_settings,
        _on_push_promise,
        _on_ping,
        _on_goaway,
        _on_window_update,
        _on_continuation,
    )

    # ------------------------------------------------------------------ flood limits

    def _empty_frame(self) -> None:
        """A frame that carries nothing and ends nothing: free for the peer, not for us."""
        if self._empty >= self.limits.max_empty_frames and self._over_limit():
            self._flood("flood_empty_frames", "empty frame flood")
        self._empty += 1

    def _over_limit(self) -> bool:
        """A flood counter is at its limit: a flood if its window is still open, else a new window.

        The clock is read only here, so counting costs one increment per frame; a peer gets at
        most twice a limit through in any ``flood_window``.
        """
        now = self._clock()
        if now - self._window_start < self.limits.flood_window:
            return True
        self._window_start = now
        self._resets = self._pings = self._settings = self._empty = 0
        return False

    def _flood(self, counter: str, what: str) -> None:
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, what)

    # ------------------------------------------------------------------ streams

    def _on_closed_stream(self, sid: int, event: StreamEvent) -> None:
        """DATA or a header block for a stream that is not open: the transition table's refusal."""
        if sid > self._last_sid:
            next_state(_IDLE, event, sid)  # DATA: raises
            return
        if sid in self._reset_ids:
            return  # late frames after our RST_STREAM are ignored
        next_state(_CLOSED, event, sid)  # raises

    def _on_header_block(self, sid: int, block: bytes, end_stream: bool, self_dep: bool) -> None:
        try:
            headers, verdict = self._decoder.decode(block)
        except hpack.OversizedHeaderListError:
            raise ConnectionProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from None
        except Exception:
            raise ConnectionProtocolError(ErrorCode.COMPRESSION_ERROR, "undecodable header block") from None
        s = self._streams.get(sid)
        if s is not None:  # trailers
            s.state = next_state(s.state, _RECV_HEADERS, sid)
            if not end_stream or self_dep or not trailers_valid(headers):
                raise StreamProtocolError(sid, ErrorCode.PROTOCOL_ERROR)
            self._end_remote(s)
            return
        if sid <= self._last_sid:
            self._on_closed_stream(sid, _RECV_HEADERS)
            return
        if not sid & 1:
            raise ConnectionProtocolError(ErrorCode.PROTOCOL_ERROR, "even stream id from a client")
        self._last_sid = sid
        if sid > self._accept_limit or len(self._streams) >= self.limits.max_concurrent_streams:
            self.counters.refused_streams += 1
            self._out.append(f.rst_stream_frame(sid, ErrorCode.REFUSED_STREAM))
            self._remember_reset(sid)
            return
        if self_dep or verdict is MALFORMED:
            raise StreamProtocolError(sid, ErrorCode.PROTOCOL_ERROR)
        deadline = None
        if verdict is not None:
            if verdict.__class__ is not float:
                self._answer_and_end(sid, verdict, end_stream)
                return
            deadline = self._clock() + verdict  # grpc-timeout, counted from the request headers
        try:
            processor = self._new_processor(trace_carrier(headers)) if self._trace_context else self._new_processor()
        except Exception:
            self._processor_failed(sid, "creating")
            self._answer_and_end(sid, trailers(GrpcStatus.INTERNAL, "internal error", trailers_only=True), end_stream)
            return
        s = GrpcStream(sid, processor, self._stream_window, self._send_flow.initial_window, deadline)
        self._streams[sid] = s
        self.counters.streams += 1
        if end_stream:
            self._end_remote(s)

    def _answer_and_end(self, sid: int, block: bytes, remote_closed: bool) -> None:
        """A complete answer on a stream that never opened (rejected request)."""
        self._out.append(self._header_frames(sid, block, end_stream=True))
        if not remote_closed:
            self._out.append(f.rst_stream_frame(sid, ErrorCode.NO_ERROR))
            self._remember_reset(sid)

    def _on_stream_bytes(self, s: GrpcStream, data: bytes | bytearray) -> None:
        """Answer each gRPC message that ``data`` completes; keep a partial one, within the limits."""
        before = len(s.buf)
        messages, failure = s.take_messages(data, self._max_message)
        self._buffered += len(s.buf) - before
        for message in messages:
            self._dispatch(s, message)
            if s.state is not _OPEN:
                return
        if failure is not None:
            self._finish(s, *failure)
            return
        if self._buffered > self.limits.max_buffered_bytes:
            raise StreamProtocolError(s.sid, ErrorCode.ENHANCE_YOUR_CALM)

    def _dispatch(self, s: GrpcStream, message: bytes) -> None:
        if s.deadline is not None and self._clock() >= s.deadline:
            self._deadline_exceeded(s)
            return
        self.counters.messages += 1
        try:
            response = s.answer(message)
        except MalformedMessage:
            self._finish(s, GrpcStatus.INTERNAL, "malformed message")
            return
        except Exception:
            self._processor_failed(s.sid, "handling a message")
            self._finish(s, GrpcStatus.INTERNAL, "internal error")
            return
        if response is None:
            return
        if not s.headers_sent:
            s.headers_sent = True
            self._out.append(self._header_frames(s.sid, RESPONSE_HEADERS, end_stream=False))
        self._send_flow.send(s, response, self._out)

    def _deadline_exceeded(self, s: GrpcStream) -> None:
        """The stream outlived its grpc-timeout: the peer has given up on any answer."""
        self.counters.deadline_exceeded += 1
        self._finish(s, GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded")

    def _processor_failed(self, sid: int, doing: str) -> None:
        self.counters.processor_errors += 1
        log.exception("ext_proc processor failed %s on stream %d; answering INTERNAL", doing, sid)

    def _end_remote(self, s: GrpcStream) -> None:
        """The peer half-closed: end our side with the status the stream earned."""
        s.state = next_state(s.state, _RECV_END_STREAM, s.sid)
        if s.state is _ANSWERED_REMOTE_CLOSED:
            return  # the final block follows the DATA still queued
        if s.buf:
            self._finish(s, GrpcStatus.INTERNAL, "incomplete message")
        else:
            self._finish(s, GrpcStatus.OK)

    def _finish(self, s: GrpcStream, status: GrpcStatus, message: str = "") -> None:
        """Decide the stream's last block; sent now, or after DATA held back by flow control."""
        s.state = next_state(s.state, _ANSWER, s.sid)
        self._buffered -= len(s.buf)
        s.buf = bytearray()
        block = s.final_block(status, message)
        if s.queued:
            s.trailers = block
        else:
            self._send_trailers(s, block)

    def _send_trailers(self, s: GrpcStream, block: bytes) -> None:
        self._out.append(self._header_frames(s.sid, block, end_stream=True))
        if s.state is _ANSWERED:
            # Complete answer before the request ended: ask the peer to stop (RFC 9113 §8.1).
            self._out.append(f.rst_stream_frame(s.sid, ErrorCode.NO_ERROR))
            self._remember_reset(s.sid)
        self._close_stream(s, _SEND_END_STREAM)

    def _drain_stream(self, s: GrpcStream) -> None:
        """Send what the windows now admit of ``s``'s queued DATA, and its final block once that is all."""
        if self._send_flow.drain(s, self._out) and s.trailers is not None:
            self._send_trailers(s, s.trailers)

    def _drain_blocked(self) -> None:
        flow = self._send_flow
        for s in list(flow.blocked.values()):
            if flow.window <= 0:
                return
            if s.state is not _CLOSED:
                self._drain_stream(s)

    def _reset(self, sid: int, code: ErrorCode) -> None:
        """Stream error: RST_STREAM with ``code``; the connection carries on."""
        self.counters.stream_errors += 1
        self._out.append(f.rst_stream_frame(sid, code))
        self._remember_reset(sid)
        s = self._streams.get(sid)
        if s is not None:
            self._close_stream(s, _SEND_RST_STREAM)

    def _remember_reset(self, sid: int) -> None:
        ids = self._reset_ids
        ids[sid] = None
        if len(ids) > _RESET_MEMORY:
            del ids[next(iter(ids))]

    def _close_stream(self, s: GrpcStream, event: StreamEvent) -> None:
        s.state = next_state(s.state, event, s.sid)
        s.processor = None
        del self._streams[s.sid]
        self._buffered -= len(s.buf)
        if s.queued:
            self._send_flow.forget(s)
        if self._drain_state == 2 or self._peer_goaway:
            self._maybe_close()

    def _finish_drain(self) -> None:
        if self._drain_state == 2:
            return
        self._drain_state = 2
        self._accept_limit = self._last_sid
        self._out.append(f.goaway_frame(self._last_sid, ErrorCode.NO_ERROR))
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._streams:
            return
        if self._drain_state == 2:
            self.closed = True
        elif self._peer_goaway:
            self._out.append(f.goaway_frame(self._last_sid, ErrorCode.NO_ERROR))
            self.closed = True

    def _header_frames(self, sid: int, block: bytes, *, end_stream: bool) -> bytes:
        if self._block_prefix:
            block = self._block_prefix + block
            self._block_prefix = b""
        return f.header_frames(sid, block, end_stream=end_stream, max_frame=self._send_flow.max_frame)

    def _fail_with(self, exc: ConnectionProtocolError) -> None:
        if exc.code == ErrorCode.INTERNAL_ERROR:  # an illegal transition of our own making
            self.counters.internal_errors += 1
            log.error("h2: internal error (%s); closing the connection", exc.reason)
            exc = ConnectionProtocolError(ErrorCode.INTERNAL_ERROR, "internal error")
        self._fail(exc.code, exc.reason)

    def _fail(self, code: ErrorCode, reason: str) -> None:
        """Connection error: GOAWAY with ``code``, then nothing more is read or answered."""
        self.counters.connection_errors += 1
        log.info("h2: connection error %s (%s); sending GOAWAY", code.name, reason)
        self._out.append(f.goaway_frame(self._last_sid, code, reason.encode("ascii")))
        self._abandon()

    def _abandon(self) -> None:
        self.closed = True
        for s in self._streams.values():
            s.state = next_state(s.state, _CONNECTION_CLOSED, s.sid)
            s.processor = None
        self._streams.clear()
        self._send_flow.clear()
        self._inbuf = bytearray()
        self._header_frag = bytearray()
        self._buffered = 0


_TRACE_KEYS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}


def trace_carrier(headers: Headers) -> dict[str, str] | None:
    """The W3C trace context among a stream's request headers (gRPC metadata), or None."""
    carrier = None
    for name, value in headers:
        key = _TRACE_KEYS.get(name)
        if key is not None:
            if carrier is None:
                carrier = {}
            carrier[key] = value.decode("latin-1")
    return carrier
