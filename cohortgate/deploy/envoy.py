"""Envoy's configuration, rendered from a `Policy` with envoy-data-plane's typed classes.

Two files, split by what changes:

- ``bootstrap.yaml`` is static for the life of the process: the mTLS listener, the ext_proc filter,
  one route that forwards to the cluster named by ``x-cohortgate-cluster`` and mirrors to the
  clusters named by ``x-cohortgate-shadow-0..3`` (only the processor sets these headers), the
  processor and access-log clusters, and admin on loopback. Nothing in it depends on the policy,
  so a policy edit never needs a restart.
- ``cds.yaml`` holds the only policy-dependent part, one cluster per variant and shadow backend.
  Envoy reads it through filesystem CDS (``path_config_source`` with ``watched_directory``) and
  reloads it when `write_cds` renames a new version into place.

Every message is built from the typed classes (a misspelt field fails at construction, not inside
Envoy) and only turned into plain dicts for YAML at the end. Nothing here starts a process; see
`cohortgate.deploy.envoyproc` for that.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import importlib
import ipaddress
import json
import os
import ssl
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from cohortgate.core.contract import (
    ACCESS_LOG_HEADERS,
    ACCESS_LOG_NAME,
    HEADER_CLUSTER,
    HEADER_PREFIX,
    HEADER_ROUTE,
    HEADER_SHADOW_OF,
    HEADER_SHADOWS,
    HEADER_VARIANT,
)
from cohortgate.support.files import write_atomic

if TYPE_CHECKING:
    from cohortgate.core.policy import Backend, Policy
    from cohortgate.deploy.pki import CertPaths


PROCESSOR_CLUSTER = "cohortgate_processor"
ALS_CLUSTER = "cohortgate_als"
HTTP_SERVICE_PATH = "/ext_proc"  # where the `http` transport POSTs each ProcessingRequest
LISTENER_NAME = "cohortgate_https"
BOOTSTRAP_FILE = "bootstrap.yaml"
CDS_FILE = "cds.yaml"

REQUEST_ATTRIBUTES = (
    "connection.uri_san_peer_certificate",
    "connection.subject_peer_certificate",
    "connection.mtls",
    "source.address",
    "request.id",
)
MESSAGE_TIMEOUT = dt.timedelta(milliseconds=200)
ROUTE_TIMEOUT = dt.timedelta(seconds=30)
CONNECT_TIMEOUT = dt.timedelta(seconds=2)
STREAM_IDLE_TIMEOUT = dt.timedelta(seconds=60)
REQUEST_TIMEOUT = dt.timedelta(seconds=60)
REQUEST_HEADERS_TIMEOUT = dt.timedelta(seconds=10)
MAX_DOWNSTREAM_CONNECTIONS = 10_000

_CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~10x faster on big CDS files
_LOOPBACK_NAMES = {"localhost"}


# ------------------------------------------------------------------------------------ addresses


def _is_loopback(host: str) -> bool:
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

    def __post_init__(self) -> None:
        if (self.uds is None) == (self.host is None):
            raise ValueError("ProcessorAddress needs exactly one of uds or host+port")
        if self.host is not None and not (self.port and 0 < self.port < 65536):
            raise ValueError(f"ProcessorAddress port {self.port!r} is not a TCP port")
        if self.uds is not None and self.tls:
            raise ValueError("ProcessorAddress: TLS over a Unix socket is not supported; the socket's mode guards it")
        if self.host is not None and not self.tls and not _is_loopback(self.host):
            raise ValueError(f"ProcessorAddress: plaintext TCP to {self.host} is refused; set tls=True (mTLS)")

    @classmethod
    def parse(cls, spec: str, *, tls: bool | None = None) -> ProcessorAddress:
        """``uds:PATH`` or ``tcp:HOST:PORT``; TCP gets mTLS unless the host is loopback (or ``tls`` says)."""
        uds, host, port = _parse_endpoint(spec, "processor address")
        if uds is not None:
            return cls(uds=uds)
        assert host is not None
        return cls(host=host, port=port, tls=(not _is_loopback(host)) if tls is None else tls)


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
class EnvoyFiles:
    """What `render` wrote: start Envoy with ``-c bootstrap``; `write_cds` replaces ``cds``."""

    bootstrap: Path
    cds: Path
    listen_port: int
    admin_port: int


# ------------------------------------------------------------------------------- typed helpers


_MODULES = {
    "accesslog": "envoy_data_plane.envoy.config.accesslog.v3",
    "bootstrap": "envoy_data_plane.envoy.config.bootstrap.v3",
    "cluster": "envoy_data_plane.envoy.config.cluster.v3",
    "mutation": "envoy_data_plane.envoy.config.common.mutation_rules.v3",
    "core": "envoy_data_plane.envoy.config.core.v3",
    "endpoint": "envoy_data_plane.envoy.config.endpoint.v3",
    "listener": "envoy_data_plane.envoy.config.listener.v3",
    "overload": "envoy_data_plane.envoy.config.overload.v3",
    "route": "envoy_data_plane.envoy.config.route.v3",
    "als": "envoy_data_plane.envoy.extensions.access_loggers.grpc.v3",
    "dns_common": "envoy_data_plane.envoy.extensions.clusters.common.dns.v3",
    "dns": "envoy_data_plane.envoy.extensions.clusters.dns.v3",
    "ext_proc": "envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3",
    "router": "envoy_data_plane.envoy.extensions.filters.http.router.v3",
    "hcm": "envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3",
    "conns": "envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3",
    "tls": "envoy_data_plane.envoy.extensions.transport_sockets.tls.v3",
    "upstream_http": "envoy_data_plane.envoy.extensions.upstreams.http.v3",
    "discovery": "envoy_data_plane.envoy.service.discovery.v3",
    "type_v3": "envoy_data_plane.envoy.type.v3",
    "matcher": "envoy_data_plane.envoy.type.matcher.v3",
}


class _Modules:
    def __init__(self, **mods: Any) -> None:
        self.__dict__.update(mods)


@functools.cache
def _pb() -> _Modules:
    """The envoy-data-plane modules, imported on first use (they take ~1 s to import)."""
    # envoy-data-plane's generated models trip pydantic deprecation warnings at import time;
    # they are the library's business, not our users'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _Modules(**{name: importlib.import_module(module) for name, module in _MODULES.items()})


def _any(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyPb

    return AnyPb.pack(message)


# Proto JSON omits fields that hold their default; these defaults carry the security story, so
# the rendered YAML states them for the reader (and for a future Envoy that changes a default).
_EXPLICIT: dict[str, dict[str, Any]] = {
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor": {
        "failure_mode_allow": False,
    },
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": {
        "forward_client_cert_details": "SANITIZE",
    },
}


def _explicit(node: Any) -> Any:
    if isinstance(node, dict):
        for value in node.values():
            _explicit(value)
        for key, value in _EXPLICIT.get(node.get("@type", ""), {}).items():
            node.setdefault(key, value)
    elif isinstance(node, list):
        for item in node:
            _explicit(item)
    return node


def _to_dict(message: Any) -> dict[str, Any]:
    import betterproto2

    return _explicit(message.to_dict(casing=betterproto2.Casing.SNAKE))


def _address(pb: _Modules, *, uds: str | None = None, host: str | None = None, port: int | None = None) -> Any:
    if uds is not None:
        return pb.core.Address(pipe=pb.core.Pipe(path=uds))
    return pb.core.Address(socket_address=pb.core.SocketAddress(address=host, port_value=port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _protocol_options(pb: _Modules, *, http2: bool) -> dict[str, Any]:
    explicit = (
        pb.upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=pb.core.Http2ProtocolOptions())
        if http2
        else pb.upstream_http.HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=pb.core.Http1ProtocolOptions()
        )
    )
    options = pb.upstream_http.HttpProtocolOptions(
        explicit_http_config=explicit,
        common_http_protocol_options=pb.core.HttpProtocolOptions(idle_timeout=dt.timedelta(seconds=60)),
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(options)}


def _cluster(
    pb: _Modules,
    name: str,
    *,
    uds: str | None = None,
    host: str | None = None,
    port: int | None = None,
    http2: bool | None,
    transport_socket: Any = None,
) -> Any:
    """A single-endpoint cluster: STATIC for a socket path or an IP, DNS-resolved for a name.

    ``http2=None`` leaves the protocol options out (the caller attaches their cached dict form).
    """
    address = _address(pb, uds=uds, host=host, port=port)
    kwargs: dict[str, Any] = {}
    if uds is None and host is not None and not _is_ip(host):
        # DNS names resolve through the DnsCluster extension (the Cluster-level DNS fields are
        # deprecated in 1.40); IPv4 first because local upstreams usually bind 127.0.0.1 only.
        kwargs["cluster_type"] = pb.cluster.ClusterCustomClusterType(
            name="envoy.clusters.dns",
            typed_config=_any(
                pb.dns.DnsCluster(
                    dns_lookup_family=pb.dns_common.DnsLookupFamily.V4_PREFERRED,
                    dns_refresh_rate=dt.timedelta(seconds=30),
                )
            ),
        )
    else:
        kwargs["type"] = pb.cluster.ClusterDiscoveryType.STATIC
    return pb.cluster.Cluster(
        name=name,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=pb.endpoint.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                pb.endpoint.LocalityLbEndpoints(
                    lb_endpoints=[pb.endpoint.LbEndpoint(endpoint=pb.endpoint.Endpoint(address=address))]
                )
            ],
        ),
        typed_extension_protocol_options=_protocol_options(pb, http2=http2) if http2 is not None else {},
        transport_socket=transport_socket,
        **kwargs,
    )


def _tls_socket(context: Any) -> Any:
    return _pb().core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(context))


def _file(pb: _Modules, path: Path | str) -> Any:
    return pb.core.DataSource(filename=str(path))


def _tls_params(pb: _Modules) -> Any:
    return pb.tls.TlsParameters(
        tls_minimum_protocol_version=pb.tls.TlsParametersTlsProtocol.TLSv1_2,
    )


def _san(pb: _Modules, kind: str, value: str) -> Any:
    return pb.tls.SubjectAltNameMatcher(
        san_type=getattr(pb.tls.SubjectAltNameMatcherSanType, kind),
        matcher=pb.matcher.StringMatcher(exact=value),
    )


# ------------------------------------------------------------------------------- CDS (policy)


def default_upstream_ca() -> str:
    """The system trust store, for verifying https backends (Envoy trusts nothing by default)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import certifi
    except ImportError as exc:  # pragma: no cover - every supported platform has one of the above
        raise FileNotFoundError("no CA bundle found for https backends; pass upstream_ca") from exc
    return certifi.where()


def _backend_cluster(pb: _Modules, name: str, scheme: str, host: str, port: int, upstream_ca: str | None) -> Any:
    socket = None
    if scheme == "https":
        # Verify the backend's certificate against the CA bundle and its own host name, and send
        # SNI for DNS names; no client certificate (backends authenticate the gateway otherwise).
        ip = _is_ip(host)
        socket = _tls_socket(
            pb.tls.UpstreamTlsContext(
                sni="" if ip else host,
                common_tls_context=pb.tls.CommonTlsContext(
                    tls_params=_tls_params(pb),
                    alpn_protocols=["http/1.1"],
                    validation_context=pb.tls.CertificateValidationContext(
                        trusted_ca=_file(pb, upstream_ca or default_upstream_ca()),
                        match_typed_subject_alt_names=[_san(pb, "IP_ADDRESS" if ip else "DNS", host)],
                    ),
                ),
            )
        )
    return _cluster(pb, name, host=host, port=port, http2=None, transport_socket=socket)


@functools.cache
def _upstream_protocol_options() -> dict[str, Any]:
    pb = _pb()
    return _to_dict(pb.cluster.Cluster(typed_extension_protocol_options=_protocol_options(pb, http2=False)))[
        "typed_extension_protocol_options"
    ]


@functools.lru_cache(maxsize=16384)
def _cluster_resource(name: str, scheme: str, host: str, port: int, upstream_ca: str | None) -> dict[str, Any]:
    """One backend's CDS resource, typed then dict.

    Cached, and the protocol options (the same for every backend) are converted once:
    envoy-data-plane's ``to_dict`` costs ~2 ms a cluster, and a policy edit usually leaves
    nearly every cluster as it was.
    """
    typed = _backend_cluster(_pb(), name, scheme, host, port, upstream_ca)
    return {
        "@type": _CLUSTER_TYPE_URL,
        **_to_dict(typed),
        "typed_extension_protocol_options": _upstream_protocol_options(),
    }


def _unique_backends(backends: Iterable[Backend]) -> list[Backend]:
    seen: dict[str, Backend] = {}
    for b in backends:
        seen.setdefault(b.cluster, b)
    return list(seen.values())


def _resources(policy: Policy, upstream_ca: str | None) -> list[dict[str, Any]]:
    """The cached resource dicts (shared: never mutate them)."""
    return [
        _cluster_resource(b.cluster, b.scheme, b.host, b.port, upstream_ca) for b in _unique_backends(policy.backends)
    ]


def render_clusters(policy: Policy, *, upstream_ca: str | None = None) -> list[dict[str, Any]]:
    """The CDS resources for ``policy``: one cluster per variant and shadow backend, as dicts.

    Each dict carries its ``@type``, so the list is exactly the ``resources`` of ``cds.yaml``.
    ``upstream_ca`` verifies https backends (default: the system trust store).
    """
    return copy.deepcopy(_resources(policy, upstream_ca))


def _version(resources: list[dict[str, Any]]) -> str:
    # The version names the content, so an edit that changes no cluster renders the same file.
    return hashlib.sha256(json.dumps(resources, sort_keys=True).encode()).hexdigest()[:16]


def _cds_document(resources: list[dict[str, Any]], version: str) -> dict[str, Any]:
    envelope = _to_dict(_pb().discovery.DiscoveryResponse(version_info=version, type_url=_CLUSTER_TYPE_URL))
    return {**envelope, "resources": resources}


@functools.lru_cache(maxsize=16384)
def _cluster_text(name: str, scheme: str, host: str, port: int, upstream_ca: str | None) -> tuple[str, str]:
    """One cluster as (sorted JSON, an item of the ``resources:`` block sequence), made once and cached.

    PyYAML writes a sequence under a mapping key without indentation, so ``resources:`` followed by
    these items is a valid rendering of the whole list, and ``"[" + ", ".join(json) + "]"`` is exactly
    ``json.dumps(resources, sort_keys=True)``, so the version matches `write_cds`'s. A live edit of a
    1 000-cluster policy then costs a join and a hash instead of a full dump (~0.2 s).
    """
    resource = _cluster_resource(name, scheme, host, port, upstream_ca)
    item = yaml.dump([resource], Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return json.dumps(resource, sort_keys=True), item


def _cds_text(backends: Iterable[Backend], upstream_ca: str | None, source: str) -> tuple[str, str]:
    """(version, file text) for these backends' clusters, from the cached per-cluster texts."""
    parts = [_cluster_text(b.cluster, b.scheme, b.host, b.port, upstream_ca) for b in _unique_backends(backends)]
    version = hashlib.sha256(("[" + ", ".join(j for j, _ in parts) + "]").encode()).hexdigest()[:16]
    envelope = _to_dict(_pb().discovery.DiscoveryResponse(version_info=version, type_url=_CLUSTER_TYPE_URL))
    head = _dump(envelope, _cds_header(source))
    return version, head + ("resources:\n" + "".join(y for _, y in parts) if parts else "resources: []\n")


def written_version(path: Path) -> str | None:
    """The ``version_info`` of a CDS file we wrote (Envoy reports the one it accepted)."""
    try:
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(20), f, strict=False):
                if line.startswith("version_info:"):
                    return line.split(":", 1)[1].strip().strip("'\"")
    except FileNotFoundError:
        pass
    return None


def _dump(document: dict[str, Any], header: str) -> str:
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + body


def _write_atomic(path: Path, text: str) -> None:
    """One complete file for Envoy's directory watch (see `cohortgate.support.files.write_atomic`)."""
    write_atomic(path, text)


def _cds_header(source: str) -> str:
    return (
        f"Envoy clusters (filesystem CDS) rendered by `cohortgate envoy render` from {source}.\n"
        "Replaced atomically whenever the policy's clusters change; do not edit."
    )


def write_cds(policy: Policy, path: Path, *, upstream_ca: str | None = None) -> None:
    """Replace the CDS file atomically (temp file in the same directory + rename).

    Envoy reloads it within milliseconds; confirm with `EnvoyProcess.wait_clusters` before the
    gateway names a new cluster, and stop naming a cluster before it leaves this file. A file that
    already holds exactly these clusters is left alone, so weight-only edits cost Envoy nothing.
    """
    path = Path(path)
    resources = _resources(policy, upstream_ca)
    version = _version(resources)
    if written_version(path) == version:
        return
    _write_atomic(path, _dump(_cds_document(resources, version), _cds_header(policy.path)))


def write_cds_clusters(
    backends: Iterable[Backend], path: Path, *, upstream_ca: str | None = None, source: str = "a policy"
) -> bool:
    """`write_cds` for any set of backends (a live reload writes the union of two policies'
    clusters first); True when the file changed. Each cluster's YAML is rendered once and cached."""
    path = Path(path)
    version, text = _cds_text(backends, upstream_ca, source)
    if written_version(path) == version:
        return False
    _write_atomic(path, text)
    return True


# ------------------------------------------------------------------------- bootstrap (static)


def _route_config(pb: _Modules) -> Any:
    def header(key: str, value: str) -> Any:
        return pb.core.HeaderValueOption(
            header=pb.core.HeaderValue(key=key, value=value),
            append_action=pb.core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            keep_empty_value=False,
        )

    mirrors = [
        pb.route.RouteActionRequestMirrorPolicy(
            cluster_header=name,
            # Tell the shadow it is one, and of which variant; its answer never reaches the client.
            request_headers_mutations=[
                pb.mutation.HeaderMutation(append=header(HEADER_SHADOW_OF, f"%REQ({HEADER_VARIANT})%"))
            ],
        )
        for name in HEADER_SHADOWS
    ]
    action = pb.route.RouteAction(
        cluster_header=HEADER_CLUSTER,
        timeout=ROUTE_TIMEOUT,
        request_mirror_policies=mirrors,
        # A cluster the processor names but Envoy lacks is a configuration race, not a client error.
        cluster_not_found_response_code=pb.route.RouteActionClusterNotFoundResponseCode.SERVICE_UNAVAILABLE,
    )
    return pb.route.RouteConfiguration(
        name="cohortgate",
        validate_clusters=False,  # clusters come and go through CDS; the route names none
        virtual_hosts=[
            pb.route.VirtualHost(
                name="cohortgate",
                domains=["*"],
                routes=[
                    pb.route.Route(
                        name="by-cluster-header",
                        match=pb.route.RouteMatch(prefix="/"),
                        route=action,
                        # x-request-id is set on every response by the HCM instead (denials too).
                        response_headers_to_add=[
                            header(HEADER_VARIANT, f"%REQ({HEADER_VARIANT})%"),
                            header(HEADER_ROUTE, f"%REQ({HEADER_ROUTE})%"),
                        ],
                    )
                ],
            )
        ],
    )


def _ext_proc_filter(pb: _Modules, transport: str) -> Any:
    send, skip = pb.ext_proc.ProcessingModeHeaderSendMode.SEND, pb.ext_proc.ProcessingModeHeaderSendMode.SKIP
    none = pb.ext_proc.ProcessingModeBodySendMode.NONE
    service: dict[str, Any]
    if transport == "grpc":
        service = {
            "grpc_service": pb.core.GrpcService(envoy_grpc=pb.core.GrpcServiceEnvoyGrpc(cluster_name=PROCESSOR_CLUSTER))
        }
    elif transport == "http":
        service = {
            "http_service": pb.ext_proc.ExtProcHttpService(
                http_service=pb.core.HttpService(
                    http_uri=pb.core.HttpUri(
                        uri=f"http://{PROCESSOR_CLUSTER}{HTTP_SERVICE_PATH}",
                        cluster=PROCESSOR_CLUSTER,
                        timeout=MESSAGE_TIMEOUT,
                    )
                )
            )
        }
    else:
        raise ValueError(f"transport must be 'grpc' or 'http', not {transport!r}")
    config = pb.ext_proc.ExternalProcessor(
        **service,
        failure_mode_allow=False,
        status_on_error=pb.type_v3.HttpStatus(code=pb.type_v3.StatusCode.ServiceUnavailable),
        processing_mode=pb.ext_proc.ProcessingMode(
            request_header_mode=send,
            response_header_mode=skip,
            request_body_mode=none,
            response_body_mode=none,
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
        request_attributes=list(REQUEST_ATTRIBUTES),
        message_timeout=MESSAGE_TIMEOUT,
        # The processor names the cluster in a header; the route must be re-resolved after it.
        route_cache_action=pb.ext_proc.ExternalProcessorRouteCacheAction.CLEAR,
        mutation_rules=pb.mutation.HeaderMutationRules(
            allow_expression=pb.matcher.RegexMatcher(regex=HEADER_PREFIX + "[a-z0-9-]+"),
            disallow_system=True,  # pseudo-headers and host stay as the client sent them
            allow_envoy=False,
        ),
        stat_prefix="cohortgate",
    )
    return pb.hcm.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=_any(config))


def _access_logs(pb: _Modules, access_log: AccessLogTarget | None) -> list[Any]:
    if access_log is None:
        return []
    config = pb.als.HttpGrpcAccessLogConfig(
        common_config=pb.als.CommonGrpcAccessLogConfig(
            log_name=ACCESS_LOG_NAME,
            grpc_service=pb.core.GrpcService(envoy_grpc=pb.core.GrpcServiceEnvoyGrpc(cluster_name=ALS_CLUSTER)),
            transport_api_version=pb.core.ApiVersion.V3,
            buffer_flush_interval=dt.timedelta(milliseconds=200),
            buffer_size_bytes=16384,
        ),
        additional_request_headers_to_log=list(ACCESS_LOG_HEADERS),
    )
    return [pb.accesslog.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=_any(config))]


# Envoy's own error answers, as JSON with a stable code like the processor's denials: a backend
# that cannot be reached or answers too late, and a processor that cannot be reached (ext_proc
# fails closed with 503, like the processor's own `unavailable`, whose body is the same).
UPSTREAM_DOWN_FLAGS = ("UH", "UF", "UO", "URX", "NC", "NR", "UC", "DC", "LR", "UPE", "UMSDR")
LOCAL_REPLIES = (
    (("flags", UPSTREAM_DOWN_FLAGS), 503, "backend_unavailable",
     "The model backend for this route cannot be reached right now; try again later."),
    (("flags", ("UT",)), 504, "backend_timeout", "The model backend for this route did not answer in time."),
    (("status", 503), 503, "unavailable", "The gateway cannot decide on this request right now; try again later."),
)  # fmt: skip


def _local_reply_config(pb: _Modules) -> Any:
    from envoy_data_plane.google.protobuf import Struct

    mappers = []
    for (kind, arg), status, code, message in LOCAL_REPLIES:
        if kind == "flags":
            flt = pb.accesslog.AccessLogFilter(response_flag_filter=pb.accesslog.ResponseFlagFilter(flags=list(arg)))
        else:
            flt = pb.accesslog.AccessLogFilter(
                status_code_filter=pb.accesslog.StatusCodeFilter(
                    comparison=pb.accesslog.ComparisonFilter(
                        op=pb.accesslog.ComparisonFilterOp.EQ,
                        value=pb.core.RuntimeUInt32(default_value=arg, runtime_key="cohortgate.local_reply.status"),
                    )
                )
            )
        body = Struct.from_dict({"error": {"code": code, "message": message}})
        mappers.append(
            pb.hcm.ResponseMapper(
                filter=flt,
                status_code=status,
                body_format_override=pb.core.SubstitutionFormatString(
                    json_format=body, content_type="application/json"
                ),
            )
        )
    return pb.hcm.LocalReplyConfig(mappers=mappers)


def _listener(
    pb: _Modules,
    certs: CertPaths,
    transport: str,
    listen_address: str,
    listen_port: int,
    access_log: AccessLogTarget | None,
    concurrency: int | None,
) -> Any:
    hcm = pb.hcm.HttpConnectionManager(
        stat_prefix="cohortgate",
        codec_type=pb.hcm.HttpConnectionManagerCodecType.AUTO,
        route_config=_route_config(pb),
        http_filters=[
            _ext_proc_filter(pb, transport),
            pb.hcm.HttpFilter(
                name="envoy.filters.http.router",
                typed_config=_any(pb.router.Router(suppress_envoy_headers=True)),
            ),
        ],
        access_log=_access_logs(pb, access_log),
        local_reply_config=_local_reply_config(pb),
        # Identity comes from the TLS handshake only: drop any client-sent XFCC.
        forward_client_cert_details=pb.hcm.HttpConnectionManagerForwardClientCertDetails.SANITIZE,
        # Every request gets a fresh id (no client is trusted to bring one), and every response
        # carries it, local replies such as the processor's denials included.
        generate_request_id=True,
        preserve_external_request_id=False,
        always_set_request_id_in_response=True,
        use_remote_address=True,
        # No client is "internal", so Envoy strips client-sent x-envoy-* headers (retries,
        # timeouts) and replaces any client x-request-id. An empty config is not enough: Envoy
        # 1.40 then still trusts RFC 1918 and loopback peers, so name one range nobody comes from.
        internal_address_config=pb.hcm.HttpConnectionManagerInternalAddressConfig(
            unix_sockets=False,
            cidr_ranges=[pb.core.CidrRange(address_prefix="0.0.0.0", prefix_len=32)],
        ),
        stream_idle_timeout=STREAM_IDLE_TIMEOUT,
        request_timeout=REQUEST_TIMEOUT,
        request_headers_timeout=REQUEST_HEADERS_TIMEOUT,
        common_http_protocol_options=pb.core.HttpProtocolOptions(
            idle_timeout=dt.timedelta(seconds=300),
            headers_with_underscores_action=pb.core.HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
        ),
        # The processor matches routes on the path Envoy forwards: normalise it once, here.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=pb.hcm.HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        server_header_transformation=pb.hcm.HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH,
    )
    downstream_tls = pb.tls.DownstreamTlsContext(
        require_client_certificate=True,
        common_tls_context=pb.tls.CommonTlsContext(
            tls_params=_tls_params(pb),
            alpn_protocols=["h2", "http/1.1"],
            tls_certificates=[
                pb.tls.TlsCertificate(
                    certificate_chain=_file(pb, certs.envoy_cert), private_key=_file(pb, certs.envoy_key)
                )
            ],
            validation_context=pb.tls.CertificateValidationContext(trusted_ca=_file(pb, certs.ca_cert)),
        ),
    )
    balance = (
        pb.listener.ListenerConnectionBalanceConfig(
            exact_balance=pb.listener.ListenerConnectionBalanceConfigExactBalance()
        )
        if concurrency and concurrency > 1
        else None
    )
    return pb.listener.Listener(
        name=LISTENER_NAME,
        address=_address(pb, host=listen_address, port=listen_port),
        connection_balance_config=balance,
        filter_chains=[
            pb.listener.FilterChain(
                filters=[
                    pb.listener.Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))
                ],
                transport_socket=_tls_socket(downstream_tls),
            )
        ],
    )


def _processor_cluster(pb: _Modules, processor: ProcessorAddress, transport: str, certs: CertPaths) -> Any:
    http2 = transport == "grpc"
    socket = None
    if processor.tls:
        assert processor.host is not None
        socket = _tls_socket(
            pb.tls.UpstreamTlsContext(
                sni="" if _is_ip(processor.host) else processor.host,
                common_tls_context=pb.tls.CommonTlsContext(
                    tls_params=_tls_params(pb),
                    alpn_protocols=["h2"] if http2 else ["http/1.1"],
                    tls_certificates=[
                        pb.tls.TlsCertificate(
                            certificate_chain=_file(pb, certs.envoy_client_cert),
                            private_key=_file(pb, certs.envoy_client_key),
                        )
                    ],
                    validation_context=pb.tls.CertificateValidationContext(
                        trusted_ca=_file(pb, certs.ca_cert),
                        match_typed_subject_alt_names=[_san(pb, "URI", certs.spiffe_id("gateway"))],
                    ),
                ),
            )
        )
    return _cluster(
        pb,
        PROCESSOR_CLUSTER,
        uds=processor.uds,
        host=processor.host,
        port=processor.port,
        http2=http2,
        transport_socket=socket,
    )


def _als_cluster(pb: _Modules, target: AccessLogTarget) -> Any:
    return _cluster(pb, ALS_CLUSTER, uds=target.uds, host=target.host, port=target.port, http2=True)


def _overload_manager(pb: _Modules) -> Any:
    # Envoy warns at start-up without a global connection limit; this one is generous.
    return pb.overload.OverloadManager(
        resource_monitors=[
            pb.overload.ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=_any(
                    pb.conns.DownstreamConnectionsConfig(max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)
                ),
            )
        ]
    )


def render_bootstrap(
    *,
    certs: CertPaths,
    cds_path: Path,
    processor: ProcessorAddress,
    transport: Literal["grpc", "http"] = "grpc",
    listen_port: int = 8443,
    admin_port: int = 9901,
    access_log: AccessLogTarget | None = None,
    concurrency: int | None = None,
    listen_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """The static bootstrap as a dict (no policy needed: clusters arrive through ``cds_path``)."""
    if transport not in ("grpc", "http"):
        raise ValueError(f"transport must be 'grpc' or 'http', not {transport!r}")
    pb = _pb()
    cds_path = Path(cds_path)
    clusters = [_processor_cluster(pb, processor, transport, certs)]
    if access_log is not None:
        clusters.append(_als_cluster(pb, access_log))
    bootstrap = pb.bootstrap.Bootstrap(
        node=pb.core.Node(id="cohortgate", cluster="cohortgate"),
        admin=pb.bootstrap.Admin(address=_address(pb, host="127.0.0.1", port=admin_port)),
        static_resources=pb.bootstrap.BootstrapStaticResources(
            listeners=[_listener(pb, certs, transport, listen_address, listen_port, access_log, concurrency)],
            clusters=clusters,
        ),
        dynamic_resources=pb.bootstrap.BootstrapDynamicResources(
            cds_config=pb.core.ConfigSource(
                resource_api_version=pb.core.ApiVersion.V3,
                path_config_source=pb.core.PathConfigSource(
                    path=str(cds_path),
                    watched_directory=pb.core.WatchedDirectory(path=str(cds_path.parent)),
                ),
            )
        ),
        overload_manager=_overload_manager(pb),
    )
    return _to_dict(bootstrap)


def render(
    policy: Policy,
    *,
    certs: CertPaths,
    out_dir: Path,
    processor: ProcessorAddress,
    transport: Literal["grpc", "http"] = "grpc",
    listen_port: int = 8443,
    admin_port: int = 9901,
    access_log: AccessLogTarget | None = None,
    concurrency: int | None = None,
    listen_address: str = "127.0.0.1",
    upstream_ca: str | None = None,
) -> EnvoyFiles:
    """Write ``bootstrap.yaml`` and ``cds.yaml`` into ``out_dir`` and say where they are.

    Paths (certificates, ``out_dir``) are written as given: relative ones resolve against
    Envoy's working directory. ``concurrency`` > 1 balances connections exactly across workers.
    """
    out_dir = Path(out_dir)
    cds = out_dir / CDS_FILE
    bootstrap = out_dir / BOOTSTRAP_FILE
    document = render_bootstrap(
        certs=certs,
        cds_path=cds,
        processor=processor,
        transport=transport,
        listen_port=listen_port,
        admin_port=admin_port,
        access_log=access_log,
        concurrency=concurrency,
        listen_address=listen_address,
    )
    header = (
        "Envoy bootstrap rendered by `cohortgate envoy render` (static: the policy's clusters\n"
        f"arrive through filesystem CDS in {cds}). ext_proc transport: {transport}. Do not edit."
    )
    # cds.yaml first: Envoy must find it when it starts from the bootstrap.
    write_cds(policy, cds, upstream_ca=upstream_ca)
    _write_atomic(bootstrap, _dump(document, header))
    return EnvoyFiles(bootstrap=bootstrap, cds=cds, listen_port=listen_port, admin_port=admin_port)


def cluster_names(clusters: Iterable[dict[str, Any]]) -> set[str]:
    return {c["name"] for c in clusters}


def validate(bootstrap: Path) -> None:
    """``envoy --mode validate`` on a rendered bootstrap and its CDS clusters (see `cohortgate.deploy.envoyproc`)."""
    from cohortgate.deploy.envoyproc import validate as run_validate

    run_validate(bootstrap)


def envoy_binary() -> str:
    """The Envoy binary (see `cohortgate.deploy.envoyproc.envoy_binary`)."""
    from cohortgate.deploy.envoyproc import envoy_binary as find

    return find()
