"""Loopback HTTP for the CLI, the supervisor and Envoy's admin: no proxies, a timeout, JSON both ways.

Every local call (controller API, Envoy admin, a sidecar's readiness) goes through `call`, so the proxy
rule (never send loopback traffic through ``$http_proxy``) and error handling live in one place.
"""

from __future__ import annotations

import json
import urllib.error
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


def call(
    url: str,
    method: str = "GET",
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One request. ``body`` (not bytes) is sent as JSON. An HTTP error status is a `Reply`, not an
    exception; a connection failure raises `OSError` (``urllib.error.URLError`` is one)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None and not isinstance(body, bytes):
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return Reply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.read(), dict(exc.headers or {}))
