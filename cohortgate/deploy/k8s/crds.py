"""Typed models of the custom resources cohortgate renders (the ``kubernetes`` client has none).

Each model names only the fields cohortgate sets, spelled as the CRD's published schema spells
them, and refuses any other (``extra="forbid"``), so a misspelt field fails at construction. The
versions read (see docs/scaling.md, "Existing meshes"):

- cert-manager ``cert-manager.io/v1`` Issuer, Certificate (cert-manager 1.x);
- Envoy Gateway ``gateway.envoyproxy.io/v1alpha1`` EnvoyExtensionPolicy, HTTPRouteFilter, Backend
  (api/v1alpha1 and the generated API reference of the main branch, Gateway API 1.5 era: ``targetRefs``,
  ``extProc[].backendRefs``, ``processingMode.request.attributes``);
- Gateway API ``gateway.networking.k8s.io/v1`` HTTPRoute and BackendTLSPolicy (v1 since 1.4);
- Istio ``networking.istio.io/v1alpha3`` EnvoyFilter, ``networking.istio.io/v1`` VirtualService and
  DestinationRule (istio/api ``kubernetes/customresourcedefinitions.gen.yaml``).

Envoy's own messages inside an EnvoyFilter patch are plain dicts rendered from envoy-data-plane's
typed classes (see `cohortgate.deploy.k8s.mesh`), as Istio reads them with protojson.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Meta(_M):
    name: str
    namespace: str
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _Resource(_M):
    api_version: str
    kind: str
    metadata: Meta


# ------------------------------------------------------------------------------- cert-manager


class IssuerRef(_M):
    name: str
    kind: Literal["Issuer", "ClusterIssuer"]
    group: Literal["cert-manager.io"] = "cert-manager.io"


class CAIssuer(_M):
    secret_name: str


class IssuerSpec(_M):
    ca: CAIssuer


class Issuer(_Resource):
    api_version: Literal["cert-manager.io/v1"] = "cert-manager.io/v1"
    kind: Literal["Issuer"] = "Issuer"
    spec: IssuerSpec


class PrivateKey(_M):
    algorithm: Literal["ECDSA", "RSA", "Ed25519"] = "ECDSA"
    size: int = 256
    rotation_policy: Literal["Always", "Never"] = "Always"


class CertificateSpec(_M):
    secret_name: str
    issuer_ref: IssuerRef
    common_name: str | None = None
    dns_names: list[str] | None = None
    uris: list[str] | None = None
    usages: list[Literal["server auth", "client auth", "digital signature", "key encipherment"]]
    duration: str = "2160h"
    renew_before: str = "360h"
    private_key: PrivateKey = PrivateKey()


class Certificate(_Resource):
    api_version: Literal["cert-manager.io/v1"] = "cert-manager.io/v1"
    kind: Literal["Certificate"] = "Certificate"
    spec: CertificateSpec


# -------------------------------------------------------------------- Gateway API / Envoy Gateway


class ParentRef(_M):
    group: Literal["gateway.networking.k8s.io"] = "gateway.networking.k8s.io"
    kind: Literal["Gateway"] = "Gateway"
    namespace: str
    name: str


class TargetRef(_M):
    """LocalPolicyTargetReference(WithSectionName)."""

    group: str
    kind: str
    name: str


class BackendRef(_M):
    group: str | None = None  # "" (core) when omitted
    kind: str | None = None  # Service when omitted
    name: str
    namespace: str | None = None
    port: int | None = None


class ProcessingModeOptions(_M):
    body: Literal["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"] | None = None
    attributes: list[str] | None = None


class ExtProcProcessingMode(_M):
    request: ProcessingModeOptions | None = None  # present: request headers are sent
    response: ProcessingModeOptions | None = None  # absent: response headers are not
    allow_mode_override: bool | None = None


class ExtProc(_M):
    backend_refs: list[BackendRef]
    message_timeout: str | None = None
    fail_open: bool | None = None
    processing_mode: ExtProcProcessingMode | None = None


class EnvoyExtensionPolicySpec(_M):
    target_refs: list[TargetRef]
    ext_proc: list[ExtProc]


class EnvoyExtensionPolicy(_Resource):
    api_version: Literal["gateway.envoyproxy.io/v1alpha1"] = "gateway.envoyproxy.io/v1alpha1"
    kind: Literal["EnvoyExtensionPolicy"] = "EnvoyExtensionPolicy"
    spec: EnvoyExtensionPolicySpec


class HeaderMatch(_M):
    type: Literal["Exact"] = "Exact"
    name: str
    value: str


class PathMatch(_M):
    type: Literal["PathPrefix", "Exact"] = "PathPrefix"
    value: str = "/"


class RouteMatch(_M):
    path: PathMatch = PathMatch()
    headers: list[HeaderMatch] | None = None


class RequestMirror(_M):
    backend_ref: BackendRef


class LocalObjectReference(_M):
    group: str
    kind: str
    name: str


class HeaderModifier(_M):
    remove: list[str]


class RouteFilter(_M):
    type: Literal["RequestHeaderModifier", "RequestMirror", "ExtensionRef"]
    request_header_modifier: HeaderModifier | None = None
    request_mirror: RequestMirror | None = None
    extension_ref: LocalObjectReference | None = None


class HTTPBackendRef(_M):
    group: str | None = None
    kind: str | None = None
    name: str
    port: int | None = None


class RouteRule(_M):
    name: str | None = None  # Gateway API 1.2+ (sectionName for policies)
    matches: list[RouteMatch]
    filters: list[RouteFilter] | None = None
    backend_refs: list[HTTPBackendRef] | None = None


class HTTPRouteSpec(_M):
    parent_refs: list[ParentRef]
    hostnames: list[str] | None = None
    rules: list[RouteRule]


class HTTPRoute(_Resource):
    api_version: Literal["gateway.networking.k8s.io/v1"] = "gateway.networking.k8s.io/v1"
    kind: Literal["HTTPRoute"] = "HTTPRoute"
    spec: HTTPRouteSpec


class CustomResponseBody(_M):
    type: Literal["Inline", "ValueRef"] = "Inline"
    inline: str


class DirectResponse(_M):
    content_type: str
    status_code: int
    body: CustomResponseBody


class HTTPRouteFilterSpec(_M):
    direct_response: DirectResponse


class HTTPRouteFilter(_Resource):
    api_version: Literal["gateway.envoyproxy.io/v1alpha1"] = "gateway.envoyproxy.io/v1alpha1"
    kind: Literal["HTTPRouteFilter"] = "HTTPRouteFilter"
    spec: HTTPRouteFilterSpec


class FQDNEndpoint(_M):
    hostname: str
    port: int


class IPEndpoint(_M):
    address: str
    port: int


class BackendEndpoint(_M):
    fqdn: FQDNEndpoint | None = None
    ip: IPEndpoint | None = None


class BackendSpec(_M):
    endpoints: list[BackendEndpoint]


class Backend(_Resource):
    api_version: Literal["gateway.envoyproxy.io/v1alpha1"] = "gateway.envoyproxy.io/v1alpha1"
    kind: Literal["Backend"] = "Backend"
    spec: BackendSpec


class SubjectAltName(_M):
    type: Literal["Hostname", "URI"]
    hostname: str | None = None
    uri: str | None = None


class TLSValidation(_M):
    hostname: str
    ca_certificate_refs: list[LocalObjectReference] | None = None
    well_known_ca_certificates: Literal["System"] | None = None
    subject_alt_names: list[SubjectAltName] | None = None


class BackendTLSPolicySpec(_M):
    target_refs: list[TargetRef]
    validation: TLSValidation


class BackendTLSPolicy(_Resource):
    api_version: Literal["gateway.networking.k8s.io/v1"] = "gateway.networking.k8s.io/v1"
    kind: Literal["BackendTLSPolicy"] = "BackendTLSPolicy"
    spec: BackendTLSPolicySpec


# ------------------------------------------------------------------------------------------ Istio


class SubFilterMatch(_M):
    name: str


class FilterMatch(_M):
    name: str
    sub_filter: SubFilterMatch | None = None


class FilterChainMatch(_M):
    filter: FilterMatch


class ListenerMatch(_M):
    filter_chain: FilterChainMatch


class RouteNameMatch(_M):
    name: str


class VirtualHostMatch(_M):
    route: RouteNameMatch


class RouteConfigurationMatch(_M):
    vhost: VirtualHostMatch


class EnvoyConfigObjectMatch(_M):
    context: Literal["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"]
    listener: ListenerMatch | None = None
    route_configuration: RouteConfigurationMatch | None = None


class Patch(_M):
    operation: Literal["MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"]
    value: dict[str, Any]


class EnvoyConfigObjectPatch(_M):
    apply_to: Literal["LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
                      "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP"]
    match: EnvoyConfigObjectMatch
    patch: Patch


class WorkloadSelector(_M):
    labels: dict[str, str]


class EnvoyFilterSpec(_M):
    workload_selector: WorkloadSelector
    config_patches: list[EnvoyConfigObjectPatch]


class EnvoyFilter(_Resource):
    api_version: Literal["networking.istio.io/v1alpha3"] = "networking.istio.io/v1alpha3"
    kind: Literal["EnvoyFilter"] = "EnvoyFilter"
    spec: EnvoyFilterSpec


class StringMatch(_M):
    prefix: str


class HTTPMatchRequest(_M):
    uri: StringMatch


class PortSelector(_M):
    number: int


class Destination(_M):
    host: str
    port: PortSelector


class HTTPRouteDestination(_M):
    destination: Destination


class IstioHTTPRoute(_M):
    name: str
    match: list[HTTPMatchRequest]
    route: list[HTTPRouteDestination]


class VirtualServiceSpec(_M):
    hosts: list[str]
    gateways: list[str]
    http: list[IstioHTTPRoute]


class VirtualService(_Resource):
    api_version: Literal["networking.istio.io/v1"] = "networking.istio.io/v1"
    kind: Literal["VirtualService"] = "VirtualService"
    spec: VirtualServiceSpec


class ClientTLSSettings(_M):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
    credential_name: str | None = None
    sni: str | None = None
    subject_alt_names: list[str] | None = None


class TrafficPolicy(_M):
    tls: ClientTLSSettings


class DestinationRuleSpec(_M):
    host: str
    traffic_policy: TrafficPolicy


class DestinationRule(_Resource):
    api_version: Literal["networking.istio.io/v1"] = "networking.istio.io/v1"
    kind: Literal["DestinationRule"] = "DestinationRule"
    spec: DestinationRuleSpec
