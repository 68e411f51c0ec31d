"""A TLS handshake that must be refused with an alert, not merely fail to connect.

"Refused" tests that also accept ``ConnectionError`` pass when nothing listens at all. This helper
connects first (a missing listener raises ``ConnectionRefusedError`` and fails the test), then
handshakes and reads: under TLS 1.3 the server judges the client's certificate after the client's
half of the handshake, so its alert is the first thing the client reads. A clean close, or any
answer, is an ``AssertionError``.
"""

from __future__ import annotations

import socket
import ssl

#: ``SSLError.reason`` for the alerts a server sends when it rejects a client certificate.
CERTIFICATE_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"  # no certificate at all (TLS 1.3)
HANDSHAKE_FAILURE = "SSLV3_ALERT_HANDSHAKE_FAILURE"  # no certificate (TLS 1.2 servers, some stacks)
UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"  # a certificate from a CA the server does not trust
BAD_CERTIFICATE = "SSLV3_ALERT_BAD_CERTIFICATE"


def tls_alert(
    port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost", timeout: float = 10.0
) -> ssl.SSLError:
    """The ``SSLError`` the server's alert raises on 127.0.0.1:``port``; timeout generous for busy CI."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                data = tls.recv(1)
        except ssl.SSLError as exc:
            return exc
    raise AssertionError(f"the server completed the handshake and answered {data!r} instead of an alert")
