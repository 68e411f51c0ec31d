"""The ext_proc filter and the processor's cluster: built here once, for the edge and for a mesh's gateway.

The processor sees request headers only (no body, no response) and may set ``x-cohortgate-*``
headers and nothing else; Envoy fails closed (503) when it cannot reach it, and answers with the
same 503 ``unavailable`` when it does not answer within the message timeout (see `replies`).

The message timeout is a product setting: it bounds how long a request waits for the processor's
decision. Too short and a busy host turns ordinary scheduling delays (a GC pause, a CPU hog on a
2-core machine) into 503s; too long and a hung processor holds every request that long before it
fails closed. The default (`MESSAGE_TIMEOUT`, 1 s) is several times a whole request's p99 on a
busy 2-core machine (docs/performance.md) and well under a client's usual timeout; ``cohortgate
envoy render --processor-timeout`` changes it (docs/scaling.md discusses the trade-off).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cohortgate.core.contract import HEADER_PREFIX
from cohortgate.deploy.envoy.addresses import ProcessorAddress, is_ip
from cohortgate.deploy.envoy.typed import (
    address,
    file_source,
    pack,
    pb,
    san,
    single_endpoint_cluster,
    tls_params,
    tls_socket,
)

if TYPE_CHECKING:
    from cohortgate.deploy.pki import CertPaths

PROCESSOR_CLUSTER = "cohortgate_processor"
HTTP_SERVICE_PATH = "/ext_proc"  # where the `http` transport POSTs each ProcessingRequest
TRANSPORTS = ("grpc", "http")
Transport = Literal["grpc", "http"]
MESSAGE_TIMEOUT = dt.timedelta(seconds=1)
REQUEST_ATTRIBUTES = (
    "connection.uri_san_peer_certificate",
    "connection.subject_peer_certificate",
    "connection.mtls",
    "source.address",
    "request.id",
)


@dataclass(frozen=True, slots=True)
class EnvoyTls:
    """The files Envoy reads, as paths in Envoy's file system (nothing here is read while rendering).

    ``server_cert``/``server_key`` answer clients, who must present a certificate from ``ca_cert``.
    ``client_cert``/``client_key`` and ``processor_id`` are needed only for an mTLS processor hop (TCP).
    """

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str | None = None
    client_key: str | None = None
    processor_id: str | None = None  # the processor certificate's SPIFFE id

    @classmethod
    def from_certs(cls, certs: CertPaths) -> EnvoyTls:
        """The layout `cohortgate certs init` writes."""
        return cls(
            ca_cert=str(certs.ca_cert),
            server_cert=str(certs.envoy_cert),
            server_key=str(certs.envoy_key),
            client_cert=str(certs.envoy_client_cert),
            client_key=str(certs.envoy_client_key),
            processor_id=certs.spiffe_id("gateway"),
        )


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be 'grpc' or 'http', not {transport!r}")


def ext_proc_filter(
    transport: str = "grpc", *, cluster: str = PROCESSOR_CLUSTER, message_timeout: dt.timedelta = MESSAGE_TIMEOUT
) -> Any:
    """The ext_proc HTTP filter (typed), calling the processor at ``cluster`` over ``transport``."""
    check_transport(transport)
    m = pb()
    send, skip = m.ext_proc.ProcessingModeHeaderSendMode.SEND, m.ext_proc.ProcessingModeHeaderSendMode.SKIP
    none = m.ext_proc.ProcessingModeBodySendMode.NONE
    service: dict[str, Any]
    if transport == "grpc":
        service = {"grpc_service": m.core.GrpcService(envoy_grpc=m.core.GrpcServiceEnvoyGrpc(cluster_name=cluster))}
    else:
        service = {
            "http_service": m.ext_proc.ExtProcHttpService(
                http_service=m.core.HttpService(
                    http_uri=m.core.HttpUri(
                        uri=f"http://{cluster}{HTTP_SERVICE_PATH}", cluster=cluster, timeout=message_timeout
                    )
                )
            )
        }
    config = m.ext_proc.ExternalProcessor(
        **service,
        failure_mode_allow=False,
        status_on_error=m.type_v3.HttpStatus(code=m.type_v3.StatusCode.ServiceUnavailable),
        processing_mode=m.ext_proc.ProcessingMode(
            request_header_mode=send,
            response_header_mode=skip,
            request_body_mode=none,
            response_body_mode=none,
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
        request_attributes=list(REQUEST_ATTRIBUTES),
        message_timeout=message_timeout,
        # The processor names the cluster in a header; the route must be re-resolved after it.
        route_cache_action=m.ext_proc.ExternalProcessorRouteCacheAction.CLEAR,
        mutation_rules=m.mutation.HeaderMutationRules(
            allow_expression=m.matcher.RegexMatcher(regex=HEADER_PREFIX + "[a-z0-9-]+"),
            disallow_system=True,  # pseudo-headers and host stay as the client sent them
            allow_envoy=False,
        ),
        stat_prefix="cohortgate",
    )
    return m.hcm.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=pack(config))


def processor_cluster(processor: ProcessorAddress, transport: str, tls: EnvoyTls) -> Any:
    """The cluster Envoy reaches the processor through: a Unix socket, or TCP (mTLS off loopback)."""
    m = pb()
    http2 = transport == "grpc"
    socket = None
    if processor.tls:
        assert processor.host is not None
        if not (tls.client_cert and tls.client_key and tls.processor_id):
            raise ValueError("an mTLS processor hop needs Envoy's client certificate and the processor's id")
        socket = tls_socket(
            m.tls.UpstreamTlsContext(
                sni="" if is_ip(processor.host) else processor.host,
                common_tls_context=m.tls.CommonTlsContext(
                    tls_params=tls_params(),
                    alpn_protocols=["h2"] if http2 else ["http/1.1"],
                    tls_certificates=[
                        m.tls.TlsCertificate(
                            certificate_chain=file_source(tls.client_cert), private_key=file_source(tls.client_key)
                        )
                    ],
                    validation_context=m.tls.CertificateValidationContext(
                        trusted_ca=file_source(tls.ca_cert),
                        match_typed_subject_alt_names=[san("URI", tls.processor_id)],
                    ),
                ),
            )
        )
    cluster = single_endpoint_cluster(
        PROCESSOR_CLUSTER,
        uds=processor.uds,
        host=processor.host,
        port=processor.port,
        http2=http2,
        transport_socket=socket,
    )
    if processor.workers > 1:
        _balance_workers(cluster, processor)
    return cluster


def _balance_workers(cluster: Any, processor: ProcessorAddress) -> None:
    """One endpoint per processor worker socket, least-request balanced per ext_proc stream.

    A worker that stops (killed, restarting) refuses connections: local-origin outlier detection
    ejects it after one failure, for 1 s at a time, so the next streams go to the others (the
    stream that met the refusal fails closed, 503, as with one worker)."""
    m = pb()
    cluster.load_assignment.endpoints = [
        m.endpoint.LocalityLbEndpoints(
            lb_endpoints=[m.endpoint.LbEndpoint(endpoint=m.endpoint.Endpoint(address=address(uds=path)))
                          for path in processor.sockets]
        )
    ]  # fmt: skip
    cluster.lb_policy = m.cluster.ClusterLbPolicy.LEAST_REQUEST
    cluster.outlier_detection = m.cluster.OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1,
        enforcing_consecutive_local_origin_failure=100,
        interval=dt.timedelta(seconds=1),
        base_ejection_time=dt.timedelta(seconds=1),
        max_ejection_time=dt.timedelta(seconds=5),
        max_ejection_percent=100,
    )
