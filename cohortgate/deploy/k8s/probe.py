"""``python -m cohortgate.deploy.k8s.probe uds PATH... | tcp HOST:PORT... | http URL...``: the pods' exec probes.

Kubelet probes reach a pod's IP only; Envoy's admin listens on loopback and the processor on a Unix
socket, so the probes run inside the container instead. Standard library only, one attempt, a short
timeout, exit status 0 (healthy) or 1 with the reason on stderr. Several targets: every one must
answer (a gateway with ``--workers N`` has one socket per worker).
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 1.5


def check(kind: str, target: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when healthy, else why not."""
    try:
        if kind == "uds":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(target)
            return None
        if kind == "tcp":
            host, _, port = target.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return None
        if kind == "http":
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(target, timeout=timeout) as response:
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"unknown probe kind {kind!r} (uds, tcp or http)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(
            "usage: python -m cohortgate.deploy.k8s.probe uds PATH... | tcp HOST:PORT... | http URL...", file=sys.stderr
        )
        return 2
    status = 0
    for target in args[1:]:
        problem = check(args[0], target)
        if problem is not None:
            print(f"probe {args[0]} {target}: {problem}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
