"""Envoy's bootstrap: static for the life of the process, so a policy edit never needs a restart.

The mTLS listener (its HTTP connection manager: ext_proc, the body-size limit, the router, access
logs, JSON local replies), the processor and access-log clusters, admin, and the source through
which the policy's clusters arrive: a filesystem-CDS file (`clusters`), or, with ``xds_socket``,
delta CDS over gRPC served by the gateway on that Unix socket (``gateway.xds``; `cohortgate up`).
`render_bootstrap` returns the document; `bootstrap_text` the YAML a caller writes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cohortgate.core.contract import (
    ACCESS_LOG_HEADERS,
    ACCESS_LOG_NAME,
    ACCESS_LOG_RESPONSE_HEADERS,
    ACCESS_LOG_RESPONSE_TRAILERS,
    MAX_REQUEST_BYTES,
    XDS_CLUSTER,
)
from cohortgate.deploy.envoy import bodylimit
from cohortgate.deploy.envoy.addresses import AccessLogTarget, ProcessorAddress, TraceCollector
from cohortgate.deploy.envoy.extproc import (
    MESSAGE_TIMEOUT,
    EnvoyTls,
    check_transport,
    ext_proc_filter,
    processor_cluster,
)
from cohortgate.deploy.envoy.replies import local_reply_config
from cohortgate.deploy.envoy.routing import BUFFER_FILTER, route_config
from cohortgate.deploy.envoy.telemetry import collector_cluster, hcm_tracing, stats_config
from cohortgate.deploy.envoy.typed import (
    address,
    dump,
    file_source,
    pack,
    pb,
    single_endpoint_cluster,
    tls_params,
    tls_socket,
    to_dict,
)

ALS_CLUSTER = "cohortgate_als"
LISTENER_NAME = "cohortgate_https"
STREAM_IDLE_TIMEOUT = dt.timedelta(seconds=60)
REQUEST_TIMEOUT = dt.timedelta(seconds=60)
REQUEST_HEADERS_TIMEOUT = dt.timedelta(seconds=10)
MAX_DOWNSTREAM_CONNECTIONS = 10_000
ADMIN_SOCKET_MODE = 0o600  # admin can stop Envoy (/quitquitquit): only its own user may talk to it


def _access_logs(access_log: AccessLogTarget | None) -> list[Any]:
    if access_log is None:
        return []
    m = pb()
    config = m.als.HttpGrpcAccessLogConfig(
        common_config=m.als.CommonGrpcAccessLogConfig(
            log_name=ACCESS_LOG_NAME,
            grpc_service=m.core.GrpcService(envoy_grpc=m.core.GrpcServiceEnvoyGrpc(cluster_name=ALS_CLUSTER)),
            transport_api_version=m.core.ApiVersion.V3,
            buffer_flush_interval=dt.timedelta(milliseconds=200),
            buffer_size_bytes=16384,
        ),
        additional_request_headers_to_log=list(ACCESS_LOG_HEADERS),
        additional_response_headers_to_log=list(ACCESS_LOG_RESPONSE_HEADERS),  # which model answered
        additional_response_trailers_to_log=list(ACCESS_LOG_RESPONSE_TRAILERS),  # how a gRPC answer ended
    )
    return [m.accesslog.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=pack(config))]


def body_size_limit_filter(max_request_bytes: int) -> Any:
    """Envoy's streaming body limit: 413 once a body passes ``max_request_bytes``, whatever its framing
    (``content-length``, chunked, HTTP/2 DATA frames), without buffering it."""
    m = pb()
    config = bodylimit.message_class()(max_request_bytes=max_request_bytes)
    return m.hcm.HttpFilter(name=bodylimit.FILTER_NAME, typed_config=pack(config))


def _body_limit_filters(max_request_bytes: int) -> list[Any]:
    """After ext_proc, so an oversized ``content-length`` still gets the processor's own 413 (and its
    audit line). The streaming limit refuses any body that passes the limit; the buffer filter, on the
    route for requests without ``content-length`` only (see `routing.route_config`), holds such a
    body until it is whole, so a backend or shadow never sees a request that is then cut off."""
    m = pb()
    buffer = m.buffer.Buffer(max_request_bytes=max_request_bytes)
    return [
        body_size_limit_filter(max_request_bytes),
        m.hcm.HttpFilter(name=BUFFER_FILTER, typed_config=pack(buffer)),
    ]


def _http_connection_manager(
    transport: str,
    access_log: AccessLogTarget | None,
    message_timeout: dt.timedelta,
    max_request_bytes: int | None,
    tracing: TraceCollector | None = None,
) -> Any:
    m = pb()
    return m.hcm.HttpConnectionManager(
        stat_prefix="cohortgate",
        tracing=hcm_tracing(tracing) if tracing is not None else None,
        codec_type=m.hcm.HttpConnectionManagerCodecType.AUTO,
        route_config=route_config(buffer_unsized=max_request_bytes is not None),
        http_filters=[
            ext_proc_filter(transport, message_timeout=message_timeout),
            *(_body_limit_filters(max_request_bytes) if max_request_bytes is not None else []),
            m.hcm.HttpFilter(
                name="envoy.filters.http.router",
                typed_config=pack(m.router.Router(suppress_envoy_headers=True)),
            ),
        ],
        access_log=_access_logs(access_log),
        local_reply_config=local_reply_config(),
        # Identity comes from the TLS handshake only: drop any client-sent XFCC.
        forward_client_cert_details=m.hcm.HttpConnectionManagerForwardClientCertDetails.SANITIZE,
        # Every request gets a fresh id (no client is trusted to bring one), and every response
        # carries it, local replies such as the processor's denials included.
        generate_request_id=True,
        preserve_external_request_id=False,
        always_set_request_id_in_response=True,
        use_remote_address=True,
        # No client is "internal", so Envoy strips client-sent x-envoy-* headers (retries,
        # timeouts) and replaces any client x-request-id. An empty config is not enough: Envoy
        # 1.40 then still trusts RFC 1918 and loopback peers, so name one range nobody comes from.
        internal_address_config=m.hcm.HttpConnectionManagerInternalAddressConfig(
            unix_sockets=False,
            cidr_ranges=[m.core.CidrRange(address_prefix="0.0.0.0", prefix_len=32)],
        ),
        stream_idle_timeout=STREAM_IDLE_TIMEOUT,
        request_timeout=REQUEST_TIMEOUT,
        request_headers_timeout=REQUEST_HEADERS_TIMEOUT,
        common_http_protocol_options=m.core.HttpProtocolOptions(
            idle_timeout=dt.timedelta(seconds=300),
            headers_with_underscores_action=m.core.HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
        ),
        # The processor matches routes on the path Envoy forwards: normalise it once, here.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=m.hcm.HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        server_header_transformation=m.hcm.HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH,
    )


def _listener(
    tls: EnvoyTls,
    transport: str,
    listen_address: str,
    listen_port: int,
    access_log: AccessLogTarget | None,
    concurrency: int | None,
    message_timeout: dt.timedelta,
    max_request_bytes: int | None,
    tracing: TraceCollector | None = None,
) -> Any:
    m = pb()
    hcm = _http_connection_manager(transport, access_log, message_timeout, max_request_bytes, tracing)
    downstream_tls = m.tls.DownstreamTlsContext(
        require_client_certificate=True,
        common_tls_context=m.tls.CommonTlsContext(
            tls_params=tls_params(),
            alpn_protocols=["h2", "http/1.1"],
            tls_certificates=[
                m.tls.TlsCertificate(
                    certificate_chain=file_source(tls.server_cert), private_key=file_source(tls.server_key)
                )
            ],
            validation_context=m.tls.CertificateValidationContext(trusted_ca=file_source(tls.ca_cert)),
        ),
    )
    balance = (
        m.listener.ListenerConnectionBalanceConfig(
            exact_balance=m.listener.ListenerConnectionBalanceConfigExactBalance()
        )
        if concurrency and concurrency > 1
        else None
    )
    return m.listener.Listener(
        name=LISTENER_NAME,
        address=address(host=listen_address, port=listen_port),
        connection_balance_config=balance,
        filter_chains=[
            m.listener.FilterChain(
                filters=[
                    m.listener.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
                ],
                transport_socket=tls_socket(downstream_tls),
            )
        ],
    )


def _overload_manager() -> Any:
    m = pb()
    # Envoy warns at start-up without a global connection limit; this one is generous.
    return m.overload.OverloadManager(
        resource_monitors=[
            m.overload.ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=pack(
                    m.conns.DownstreamConnectionsConfig(max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)
                ),
            )
        ]
    )


def _cds_source(cds_path: Path, xds_socket: str | None) -> Any:
    """Where the policy's clusters come from: the gateway's delta CDS (only what changed travels, and
    Envoy's ACK is the confirmation), or the file ``cds_path`` Envoy re-reads whole on each change."""
    m = pb()
    if xds_socket is None:
        return m.core.ConfigSource(
            resource_api_version=m.core.ApiVersion.V3,
            path_config_source=m.core.PathConfigSource(
                path=str(cds_path), watched_directory=m.core.WatchedDirectory(path=str(cds_path.parent))
            ),
        )
    return m.core.ConfigSource(
        resource_api_version=m.core.ApiVersion.V3,
        api_config_source=m.core.ApiConfigSource(
            api_type=m.core.ApiConfigSourceApiType.DELTA_GRPC,
            transport_api_version=m.core.ApiVersion.V3,
            grpc_services=[m.core.GrpcService(envoy_grpc=m.core.GrpcServiceEnvoyGrpc(cluster_name=XDS_CLUSTER))],
        ),
    )


def render_bootstrap(
    *,
    tls: EnvoyTls,
    cds_path: Path | str,
    processor: ProcessorAddress,
    transport: str = "grpc",
    listen_port: int = 8443,
    admin_port: int | None = 9901,
    admin_socket: str | None = None,
    access_log: AccessLogTarget | None = None,
    concurrency: int | None = None,
    listen_address: str = "127.0.0.1",
    message_timeout: dt.timedelta = MESSAGE_TIMEOUT,
    max_request_bytes: int | None = MAX_REQUEST_BYTES,
    tracing: TraceCollector | None = None,
    deferred_stats: bool = False,
    xds_socket: str | None = None,
) -> dict[str, Any]:
    """The static bootstrap as a document (no policy needed: clusters arrive through ``cds_path``, or
    with ``xds_socket`` through delta CDS from the gateway on that socket, `XDS_CLUSTER`, HTTP/2).

    ``deferred_stats`` has Envoy create a cluster's traffic stats (``upstream_rq_*``, ``upstream_cx_*``…)
    at its first request, not when the cluster arrives: adding 2 000 clusters took ~3 s with them,
    ~1.6 s without, on 2 busy cores. A cluster that never got a request then has none of these stats.

    Admin listens on ``admin_socket`` (a Unix socket only Envoy's user can use) when given, else on
    127.0.0.1:``admin_port``. ``concurrency`` > 1 balances connections exactly across workers.
    ``tracing`` turns Envoy's OpenTelemetry tracer on (`telemetry`; off by default).
    """
    check_transport(transport)
    if (admin_port is None) == (admin_socket is None):
        raise ValueError("give exactly one of admin_port and admin_socket")
    m = pb()
    cds_path = Path(cds_path)
    clusters = [processor_cluster(processor, transport, tls)]
    if access_log is not None:
        clusters.append(
            single_endpoint_cluster(
                ALS_CLUSTER, uds=access_log.uds, host=access_log.host, port=access_log.port, http2=True
            )
        )
    if tracing is not None:
        clusters.append(collector_cluster(tracing))
    if xds_socket is not None:
        clusters.append(single_endpoint_cluster(XDS_CLUSTER, uds=xds_socket, http2=True))
    admin = (
        address(uds=admin_socket, mode=ADMIN_SOCKET_MODE)
        if admin_socket is not None
        else address(host="127.0.0.1", port=admin_port)
    )
    bootstrap = m.bootstrap.Bootstrap(
        node=m.core.Node(id="cohortgate", cluster="cohortgate"),
        admin=m.bootstrap.Admin(address=admin),
        static_resources=m.bootstrap.BootstrapStaticResources(
            listeners=[
                _listener(
                    tls,
                    transport,
                    listen_address,
                    listen_port,
                    access_log,
                    concurrency,
                    message_timeout,
                    max_request_bytes,
                    tracing,
                )
            ],
            clusters=clusters,
        ),
        dynamic_resources=m.bootstrap.BootstrapDynamicResources(cds_config=_cds_source(cds_path, xds_socket)),
        overload_manager=_overload_manager(),
        stats_config=stats_config(),
    )
    if deferred_stats:
        bootstrap.deferred_stat_options = m.bootstrap.BootstrapDeferredStatOptions(enable_deferred_creation_stats=True)
    return to_dict(bootstrap)


def bootstrap_text(document: dict[str, Any], header: str) -> str:
    """The bootstrap as YAML under a comment ``header``."""
    return dump(document, header)
