"""Loopback HTTP for the CLI, the supervisor and Envoy's admin: no proxies, a timeout, JSON both ways.

Every local call (controller API, Envoy admin, a sidecar's readiness) goes through `call`, so the proxy
rule (never send loopback traffic through ``$http_proxy``) and error handling live in one place.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body or b"null")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _call_unix(path: str, url: str, method: str, data: bytes | None, headers: dict[str, str], timeout: float) -> Reply:
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read(), dict(resp.headers))
    except http.client.HTTPException as exc:  # a malformed answer: a connection problem to the caller
        raise ConnectionError(f"{path}: {exc!r}") from exc
    finally:
        conn.close()


def call(
    url: str,
    method: str = "GET",
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    unix_socket: str | None = None,
) -> Reply:
    """One request. ``body`` (not bytes) is sent as JSON. An HTTP error status is a `Reply`, not an
    exception; a connection failure raises `OSError` (``urllib.error.URLError`` is one).

    With ``unix_socket``, the request goes to that socket (``url`` gives the path and query; its
    host is ignored): Envoy's admin, for one, listens on a 0600 socket only its user can open."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    if unix_socket is not None:
        sent = dict(headers or {})
        if data is not None and not isinstance(body, bytes):
            sent["Content-Type"] = "application/json"
        return _call_unix(unix_socket, url, method, data, sent, timeout)
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None and not isinstance(body, bytes):
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return Reply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.read(), dict(exc.headers or {}))


UNIX_PREFIX = "unix:"


def call_admin(admin: str, path: str, method: str = "GET", *, timeout: float = 5.0) -> Reply:
    """A request to an admin endpoint named ``unix:SOCKET`` or ``http://HOST:PORT`` (Envoy's admin)."""
    if admin.startswith(UNIX_PREFIX):
        return call("http://localhost" + path, method, timeout=timeout, unix_socket=admin[len(UNIX_PREFIX) :])
    return call(admin.rstrip("/") + path, method, timeout=timeout)
