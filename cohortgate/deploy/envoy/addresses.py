"""Where Envoy reaches the processor and the access-log service: parsed and checked once, here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cohortgate.core.contract import MAX_GATEWAY_WORKERS, worker_socket

_LOOPBACK_NAMES = {"localhost"}


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_endpoint(spec: str, what: str) -> tuple[str | None, str | None, int | None]:
    """``uds:PATH`` or ``tcp:HOST:PORT`` -> (uds, host, port); ValueError names the bad part."""
    kind, _, rest = spec.partition(":")
    if kind == "uds" and rest:
        return rest, None, None
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return None, host, int(port)
    raise ValueError(f"{what} {spec!r} must be uds:PATH or tcp:HOST:PORT")


@dataclass(frozen=True, slots=True)
class ProcessorAddress:
    """Where Envoy reaches the ext_proc processor: a Unix socket when co-located, else TCP.

    TCP to anything but loopback must use mTLS (``tls=True``): the processor decides who gets in,
    so its hop is never plaintext across a network.
    """

    uds: str | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False
    workers: int = 1  # processor processes on ``uds`` (`worker_socket` names each one's socket)

    def __post_init__(self) -> None:
        if (self.uds is None) == (self.host is None):
            raise ValueError("ProcessorAddress needs exactly one of uds or host+port")
        if not 1 <= self.workers <= MAX_GATEWAY_WORKERS:
            raise ValueError(f"ProcessorAddress: {self.workers} workers; give 1 to {MAX_GATEWAY_WORKERS}")
        if self.workers > 1 and self.uds is None:
            raise ValueError("ProcessorAddress: several workers listen on Unix sockets (uds:PATH), one each")
        if self.host is not None and not (self.port and 0 < self.port < 65536):
            raise ValueError(f"ProcessorAddress port {self.port!r} is not a TCP port")
        if self.uds is not None and self.tls:
            raise ValueError("ProcessorAddress: TLS over a Unix socket is not supported; the socket's mode guards it")
        if self.host is not None and not self.tls and not is_loopback(self.host):
            raise ValueError(f"ProcessorAddress: plaintext TCP to {self.host} is refused; set tls=True (mTLS)")

    @classmethod
    def parse(cls, spec: str, *, tls: bool | None = None, workers: int = 1) -> ProcessorAddress:
        """``uds:PATH`` or ``tcp:HOST:PORT``; TCP gets mTLS unless the host is loopback (or ``tls`` says)."""
        uds, host, port = _parse_endpoint(spec, "processor address")
        if uds is not None:
            return cls(uds=uds, workers=workers)
        assert host is not None
        return cls(host=host, port=port, tls=(not is_loopback(host)) if tls is None else tls, workers=workers)

    @property
    def sockets(self) -> tuple[str, ...]:
        """Every worker's Unix socket (empty for TCP)."""
        if self.uds is None:
            return ()
        return tuple(worker_socket(self.uds, i, self.workers) for i in range(self.workers))


@dataclass(frozen=True, slots=True)
class AccessLogTarget:
    """Envoy's gRPC access-log service (ALS) endpoint: a Unix socket or a loopback TCP port."""

    uds: str | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.uds is None) == (self.host is None):
            raise ValueError("AccessLogTarget needs exactly one of uds or host+port")
        if self.host is not None and not (self.port and 0 < self.port < 65536):
            raise ValueError(f"AccessLogTarget port {self.port!r} is not a TCP port")

    @classmethod
    def parse(cls, spec: str) -> AccessLogTarget:
        uds, host, port = _parse_endpoint(spec, "access log address")
        return cls(uds=uds, host=host, port=port)


@dataclass(frozen=True, slots=True)
class TraceCollector:
    """An OTLP/HTTP collector for Envoy's OpenTelemetry tracer and the share of new traces to start.

    Only ``http://HOST:PORT`` (the collector's OTLP/HTTP port, usually 4318): Envoy posts protobuf
    spans to ``/v1/traces`` under it. A remote or TLS collector is best reached through a local
    OpenTelemetry Collector agent, which also batches and retries."""

    host: str
    port: int
    ratio: float = 0.01
    path: str = "/v1/traces"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"trace sample ratio {self.ratio}: must be within 0..1")

    @classmethod
    def parse(cls, url: str, ratio: float = 0.01) -> TraceCollector:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"OTLP endpoint {url!r}: give http://HOST:PORT (the collector's OTLP/HTTP port)")
        base = parts.path.rstrip("/")
        return cls(host=parts.hostname, port=parts.port or 4318, ratio=ratio, path=f"{base}/v1/traces")

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"
