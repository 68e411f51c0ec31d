"""Readiness and port probes for `cohortgate up`: cheap, non-blocking (short timeouts), loopback only.

Each probe answers one question with a bool (or a number), never raises on a refused connection:
the supervisor calls them many times a second while a child starts. HTTP goes through
`cohortgate.support.http` (no proxies, one place for errors).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping

from cohortgate.support import http

_TIMEOUT_S = 1.0


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``host:port`` now (SO_REUSEADDR, as aiohttp and Envoy set it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    # Linux lets SO_REUSEADDR sockets bind beside a listener on the wildcard address; connect too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) != 0


def any_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = _TIMEOUT_S, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; ``(0, b"")`` when nothing answers."""
    return request("GET", url, timeout, headers)


def request(
    method: str, url: str, timeout: float = _TIMEOUT_S, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """``(status, body)``; ``(0, b"")`` when nothing answers (a POST sends an empty body)."""
    try:
        reply = http.call(url, method, body=b"" if method == "POST" else None, headers=headers, timeout=timeout)
    except (OSError, ValueError):
        return 0, b""
    return reply.status, reply.body


def http_ok(url: str, timeout: float = _TIMEOUT_S) -> bool:
    return 200 <= get(url, timeout)[0] < 300


def unix_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ per kind of child


def sidecar_ready(url: str) -> Callable[[], bool]:
    """OIP v2 readiness: the model is loaded and the server accepts requests."""
    return lambda: http_ok(f"{url}/v2/health/ready")


def controller_ready(api: str, als_socket: str, dashboard: str) -> Callable[[], bool]:
    """The API answers, the access-log socket accepts (Envoy reports there) and the dashboard serves."""
    return lambda: http_ok(f"{api}/healthz") and unix_accepts(als_socket) and http_ok(dashboard)


def gateway_ready(processor_socket: str, health_url: str) -> Callable[[], bool]:
    """The processor's socket accepts (Envoy fails closed without it) and ``/healthz`` answers."""
    return lambda: unix_accepts(processor_socket) and http_ok(health_url)


def always_ready() -> bool:
    return True


_RELOADS_FAILED = re.compile(rb'^cohortgate_policy_reloads_total\{result="failed"\} ([0-9.e+]+)$', re.M)
_STAT = re.compile(rb"^\S+: (\d+)$", re.M)


def gateway_policy(health_url: str) -> str | None:
    """The digest prefix the gateway's ``/healthz`` names, or None when it does not answer."""
    import json

    status, body = get(health_url)
    if status != 200:
        return None
    try:
        policy = json.loads(body).get("policy")
    except (ValueError, AttributeError):
        return None
    return policy if isinstance(policy, str) and policy else None


def gateway_switch_state(health_url: str) -> tuple[str | None, int | None]:
    """(the digest prefix ``/healthz`` names, its ``reload_failures``) from one small answer; (None, None)
    when it does not answer, failures None from a gateway that does not report them."""
    import json

    status, body = get(health_url)
    if status != 200:
        return None, None
    try:
        doc = json.loads(body)
        policy, failures = doc.get("policy"), doc.get("reload_failures")
    except (ValueError, AttributeError):
        return None, None
    return (
        policy if isinstance(policy, str) and policy else None,
        failures if isinstance(failures, int) and not isinstance(failures, bool) else None,
    )


def gateway_reload_failures(metrics_url: str) -> int | None:
    """``cohortgate_policy_reloads_total{result="failed"}`` (0 before any failure); None: no answer."""
    status, body = get(metrics_url)
    if status != 200:
        return None
    match = _RELOADS_FAILED.search(body)
    return int(float(match.group(1))) if match else 0


def envoy_stat(admin_get: Callable[[str], tuple[int, bytes]], name: str) -> int | None:
    """One counter or gauge from Envoy's admin ``/stats`` (exact name), None when unknown or unreachable."""
    try:
        status, body = admin_get(f"/stats?filter=^{re.escape(name)}$")
    except (OSError, ValueError):
        return None
    match = _STAT.search(body) if status == 200 else None
    return int(match.group(1)) if match else None
