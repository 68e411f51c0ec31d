"""A purpose-built HTTP/2 gRPC server for exactly one method, Envoy's ext_proc ``Process``.

grpcio spends its time in its poller thread and wake-ups, and a general HTTP/2 state machine
costs more than the whole decision; a server written for one peer and one method does not.

    frames.py       frame layout, constants, builders                   (pure)
    errors.py       connection and stream protocol errors               (pure)
    hpackmemo.py    hpack decoder + generation-keyed block memo         (pure)
    streamstate.py  a stream's lifecycle as a transition table          (pure)
    flowcontrol.py  windows both ways, WINDOW_UPDATE, queued DATA       (pure)
    grpcwire.py     request validation, prebuilt status blocks          (pure)
    grpcstream.py   one gRPC call: message framing, processor, status   (pure)
    connection.py   one connection: frames, dispatch, limits, drain     (pure, sans-I/O)
    server.py       asyncio Protocol adapter, UDS/TCP/TLS, drain        (I/O)
    metrics.py      H2Counters as Prometheus metrics, at scrape time
"""

from gateway.h2.connection import H2Connection, H2Counters, H2Limits, NewProcessor, StreamProcessor
from gateway.h2.metrics import register_h2_metrics
from gateway.h2.server import FastServer, serve_fast

__all__ = [
    "FastServer",
    "H2Connection",
    "H2Counters",
    "H2Limits",
    "NewProcessor",
    "StreamProcessor",
    "register_h2_metrics",
    "serve_fast",
]
