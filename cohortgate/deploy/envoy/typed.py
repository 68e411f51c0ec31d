"""envoy-data-plane's typed classes, imported once, and the small builders every part of the config uses.

Every message is built from these classes (a misspelt field fails at construction, not inside Envoy)
and only turned into plain dicts (`to_dict`) and YAML text (`dump`) at the end.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import warnings
from pathlib import Path
from typing import Any

import yaml

from cohortgate.deploy.envoy.addresses import is_ip

CONNECT_TIMEOUT = dt.timedelta(seconds=2)
UPSTREAM_IDLE_TIMEOUT = dt.timedelta(seconds=60)

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~10x faster on big CDS files

_MODULES = {
    "accesslog": "envoy_data_plane.envoy.config.accesslog.v3",
    "bootstrap": "envoy_data_plane.envoy.config.bootstrap.v3",
    "cluster": "envoy_data_plane.envoy.config.cluster.v3",
    "mutation": "envoy_data_plane.envoy.config.common.mutation_rules.v3",
    "core": "envoy_data_plane.envoy.config.core.v3",
    "endpoint": "envoy_data_plane.envoy.config.endpoint.v3",
    "listener": "envoy_data_plane.envoy.config.listener.v3",
    "metrics": "envoy_data_plane.envoy.config.metrics.v3",
    "overload": "envoy_data_plane.envoy.config.overload.v3",
    "route": "envoy_data_plane.envoy.config.route.v3",
    "trace": "envoy_data_plane.envoy.config.trace.v3",
    "als": "envoy_data_plane.envoy.extensions.access_loggers.grpc.v3",
    "dns_common": "envoy_data_plane.envoy.extensions.clusters.common.dns.v3",
    "dns": "envoy_data_plane.envoy.extensions.clusters.dns.v3",
    "buffer": "envoy_data_plane.envoy.extensions.filters.http.buffer.v3",
    "ext_proc": "envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3",
    "header_mutation": "envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3",
    "router": "envoy_data_plane.envoy.extensions.filters.http.router.v3",
    "hcm": "envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3",
    "conns": "envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3",
    "tls": "envoy_data_plane.envoy.extensions.transport_sockets.tls.v3",
    "upstream_codec": "envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3",
    "upstream_http": "envoy_data_plane.envoy.extensions.upstreams.http.v3",
    "discovery": "envoy_data_plane.envoy.service.discovery.v3",
    "type_v3": "envoy_data_plane.envoy.type.v3",
    "matcher": "envoy_data_plane.envoy.type.matcher.v3",
}


class Modules:
    """The envoy-data-plane modules by short name (``pb.core.Address`` …)."""

    def __init__(self, **mods: Any) -> None:
        self.__dict__.update(mods)

    def __getattr__(self, name: str) -> Any:  # only for type checkers: every name is set in __init__
        raise AttributeError(name)


@functools.cache
def pb() -> Modules:
    """The envoy-data-plane modules, imported on first use (they take ~1 s to import)."""
    # envoy-data-plane's generated models trip pydantic deprecation warnings at import time;
    # they are the library's business, not our users'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return Modules(**{name: importlib.import_module(module) for name, module in _MODULES.items()})


def pack(message: Any) -> Any:
    """A message as ``google.protobuf.Any`` (every ``typed_config``)."""
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


def to_dict(message: Any) -> dict[str, Any]:
    """Proto JSON with snake_case names, the security-relevant defaults stated."""
    import betterproto2

    return _explicit(message.to_dict(casing=betterproto2.Casing.SNAKE))


def dump(document: dict[str, Any], header: str) -> str:
    """YAML text with ``header`` as a comment block on top."""
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + body


def dump_item(resource: dict[str, Any]) -> str:
    """One item of a top-level block sequence (``- ...``), as `dump` writes a list under a key."""
    return yaml.dump([resource], Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def address(
    *, uds: str | None = None, host: str | None = None, port: int | None = None, mode: int | None = None
) -> Any:
    """A socket address, or a Unix socket (``pipe``) with an optional file mode."""
    m = pb()
    if uds is not None:
        return m.core.Address(pipe=m.core.Pipe(path=uds, mode=mode or 0))
    return m.core.Address(socket_address=m.core.SocketAddress(address=host, port_value=port))


def protocol_options(*, http2: bool, upstream_filters: list[Any] | None = None) -> dict[str, Any]:
    """``typed_extension_protocol_options`` of a cluster: explicit HTTP/1.1 or HTTP/2, 60 s idle.

    ``upstream_filters`` (e.g. a header mutation) run on every request sent to the cluster,
    mirrored copies included; the upstream codec filter, which Envoy requires last, is appended."""
    m = pb()
    explicit = (
        m.upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=m.core.Http2ProtocolOptions())
        if http2
        else m.upstream_http.HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=m.core.Http1ProtocolOptions())
    )
    filters: list[Any] = []
    if upstream_filters:
        codec = m.hcm.HttpFilter(
            name="envoy.filters.http.upstream_codec", typed_config=pack(m.upstream_codec.UpstreamCodec())
        )
        filters = [*upstream_filters, codec]
    options = m.upstream_http.HttpProtocolOptions(
        explicit_http_config=explicit,
        common_http_protocol_options=m.core.HttpProtocolOptions(idle_timeout=UPSTREAM_IDLE_TIMEOUT),
        http_filters=filters,
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(options)}


def single_endpoint_cluster(
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
    m = pb()
    kwargs: dict[str, Any] = {}
    if uds is None and host is not None and not is_ip(host):
        # DNS names resolve through the DnsCluster extension (the Cluster-level DNS fields are
        # deprecated in 1.40); IPv4 first because local upstreams usually bind 127.0.0.1 only.
        kwargs["cluster_type"] = m.cluster.ClusterCustomClusterType(
            name="envoy.clusters.dns",
            typed_config=pack(
                m.dns.DnsCluster(
                    dns_lookup_family=m.dns_common.DnsLookupFamily.V4_PREFERRED,
                    dns_refresh_rate=dt.timedelta(seconds=30),
                )
            ),
        )
    else:
        kwargs["type"] = m.cluster.ClusterDiscoveryType.STATIC
    return m.cluster.Cluster(
        name=name,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=m.endpoint.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                m.endpoint.LocalityLbEndpoints(
                    lb_endpoints=[
                        m.endpoint.LbEndpoint(
                            endpoint=m.endpoint.Endpoint(address=address(uds=uds, host=host, port=port))
                        )
                    ]
                )
            ],
        ),
        typed_extension_protocol_options=protocol_options(http2=http2) if http2 is not None else {},
        transport_socket=transport_socket,
        **kwargs,
    )


def tls_socket(context: Any) -> Any:
    return pb().core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))


def file_source(path: Path | str) -> Any:
    return pb().core.DataSource(filename=str(path))


def tls_params() -> Any:
    m = pb()
    return m.tls.TlsParameters(tls_minimum_protocol_version=m.tls.TlsParametersTlsProtocol.TLSv1_2)


def san(kind: str, value: str) -> Any:
    """Match a peer certificate's subject alternative name of ``kind`` (DNS, IP_ADDRESS, URI) exactly."""
    m = pb()
    return m.tls.SubjectAltNameMatcher(
        san_type=getattr(m.tls.SubjectAltNameMatcherSanType, kind),
        matcher=m.matcher.StringMatcher(exact=value),
    )


def header_value(key: str, value: str) -> Any:
    """Set a header, replacing any value it had."""
    m = pb()
    return m.core.HeaderValueOption(
        header=m.core.HeaderValue(key=key, value=value),
        append_action=m.core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        keep_empty_value=False,
    )
