"""Certificates (cert-manager) and the hook-up into an existing mesh (Envoy Gateway or Istio).

With a mesh, the mesh's own gateway Envoy terminates the clients' mTLS and calls cohortgate's gRPC
processor (the same ``ExternalProcessor`` service the edge uses) over mTLS on TCP; routing to the
variant the processor chose works the way it does at the edge, by the ``x-cohortgate-cluster``
header that only the processor sets:

- **Envoy Gateway**: an ``EnvoyExtensionPolicy`` adds ext_proc to cohortgate's HTTPRoutes; each
  HTTPRoute rule matches one cluster header (plus the shadow-slot headers of each mirror set the
  processor can choose) and forwards to that backend's Service, mirroring with ``RequestMirror``.
  The first rule matches no cohortgate header and answers 503 itself (fail closed): it is what a
  request matches before the processor has run, and the processor's answer clears the route cache.
- **Istio**: an ``EnvoyFilter`` inserts ext_proc before the router, adds one cluster per backend
  (the clusters `cohortgate.deploy.envoy` renders for the edge) and turns a named VirtualService route
  into ``cluster_header`` routing with the edge's mirror slots. The VirtualService's placeholder
  destination does not exist, so a gateway without the EnvoyFilter answers 503, never an unchecked
  pass-through.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Iterator
from typing import Any

from cohortgate.core.contract import HEADER_CLUSTER, HEADER_SHADOWS
from cohortgate.deploy.envoy.addresses import is_ip
from cohortgate.deploy.envoy.clusters import AUTHORIZATION, cluster_resources
from cohortgate.deploy.envoy.extproc import REQUEST_ATTRIBUTES
from cohortgate.deploy.k8s import crds
from cohortgate.deploy.k8s.objects import (
    EDGE,
    ENVOY_TLS_SECRET,
    GATEWAY,
    PROCESSOR_PORT,
    PROCESSOR_TLS_SECRET,
    SYSTEM_CA,
    labels,
)
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import SIDECAR_PORT, Plan, PlanError

MESH_CLIENT_SECRET = "cohortgate-mesh-client-tls"
CA_CONFIGMAP = "cohortgate-ca"  # key ca.crt: the CA that signed the processor's certificate (public)
UNROUTED = "cohortgate-unrouted"
MAX_RULES = 16  # Gateway API: rules per HTTPRoute
UNROUTED_BODY = json.dumps(
    {"error": {"code": "unavailable", "message": "The request was not routed by cohortgate; try again."}},
    separators=(",", ":"),
)


def _meta(name: str, namespace: str, component: str) -> crds.Meta:
    return crds.Meta(name=name, namespace=namespace, labels=labels(component))


# ------------------------------------------------------------------------------------ certificates


def certificates(options: RenderOptions) -> list[crds._Resource]:
    """The certificates cohortgate serves with, issued by cert-manager into Secrets (never rendered)."""
    kind, name = options.issuer
    issuer = crds.IssuerRef(name=name, kind=kind)
    out: list[crds._Resource] = []
    if kind == "Issuer":
        # A CA issuer backed by the operator's CA key pair, created once as Secret `cohortgate-ca`.
        out.append(
            crds.Issuer(metadata=_meta(name, options.namespace, "certificates"),
                        spec=crds.IssuerSpec(ca=crds.CAIssuer(secret_name="cohortgate-ca")))
        )  # fmt: skip
    if options.mesh is None:
        svc = EDGE
        out.append(
            crds.Certificate(
                metadata=_meta("cohortgate-envoy", options.namespace, "certificates"),
                spec=crds.CertificateSpec(
                    secret_name=ENVOY_TLS_SECRET,
                    issuer_ref=issuer,
                    dns_names=[*_service_names(svc, options), *options.hosts],
                    usages=["server auth", "digital signature"],
                ),
            )
        )
        return out
    out.append(
        crds.Certificate(
            metadata=_meta("cohortgate-processor", options.namespace, "certificates"),
            spec=crds.CertificateSpec(
                secret_name=PROCESSOR_TLS_SECRET,
                issuer_ref=issuer,
                dns_names=_service_names(GATEWAY, options),
                uris=[f"spiffe://{options.trust_domain}/gateway"],
                usages=["server auth", "digital signature"],
            ),
        )
    )
    # The mesh's Envoy authenticates to the processor with this one (spiffe://TD/envoy), from a
    # Secret in the mesh gateway's namespace, where Istio's credentialName / the EnvoyProxy reads it.
    out.append(
        crds.Certificate(
            metadata=_meta("cohortgate-mesh-client", options.mesh_gateway_ref[0], "certificates"),
            spec=crds.CertificateSpec(
                secret_name=MESH_CLIENT_SECRET,
                issuer_ref=issuer,
                uris=[f"spiffe://{options.trust_domain}/envoy"],
                usages=["client auth", "digital signature"],
            ),
        )
    )
    return out


def _service_names(svc: str, options: RenderOptions) -> list[str]:
    ns = options.namespace
    return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{options.cluster_domain}"]


# ------------------------------------------------------------------------------- route enumeration


def mirror_sets(plan: Plan) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """Every (route, primary cluster, shadow clusters by slot) the processor can answer with.

    `cohortgate.core.decide` mirrors each sampled shadow to one of its backends in the request's region,
    in policy order, filling slots 0, 1, … in turn: so for a primary in region R the choices are
    every ordered pick of at most one in-region backend per shadow.
    """
    for route in plan.policy.routes:
        for variant in route.variants:
            for primary in variant.backends:
                options = [[None, *shadow.by_region.get(primary.region, ())] for shadow in route.shadows]
                for pick in itertools.product(*options) if options else [()]:
                    yield route.name, primary.cluster, tuple(b.cluster for b in pick if b is not None)


def _backend_refs(plan: Plan) -> dict[str, crds.HTTPBackendRef]:
    """cluster -> where the mesh sends it: the sidecar's Service, or an EG Backend for a URL."""
    refs = {s.cluster: crds.HTTPBackendRef(name=s.name, port=SIDECAR_PORT) for s in plan.sidecars}
    for b in plan.external:
        refs[b.cluster] = crds.HTTPBackendRef(group="gateway.envoyproxy.io", kind="Backend", name=_external_name(b))
    return refs


def _external_name(backend: Any) -> str:
    from cohortgate.deploy.k8s.plan import dns_name

    return dns_name("cg", *backend.cluster.split(".")[1:], "ext")


# ---------------------------------------------------------------------------------- Envoy Gateway


def envoy_gateway(plan: Plan, options: RenderOptions) -> list[crds._Resource]:
    ns = options.namespace
    gw_ns, gw_name = options.mesh_gateway_ref
    refs = _backend_refs(plan)
    rules: list[crds.RouteRule] = []
    keeps = {b.cluster for b in plan.policy.backends if b.forward_authorization}
    # The edge removes Authorization per cluster; here a rule's RequestHeaderModifier does, and a
    # RequestMirror copies the request as forwarded, so a token kept for a variant would reach its
    # shadows too: refused rather than rendered.
    for route in plan.policy.routes:
        if route.shadows and any(b.cluster in keeps for v in route.variants for b in v.backends):
            raise PlanError(
                f"route {route.name}: forward_authorization with shadows is not possible with Envoy Gateway "
                "(its mirrors copy the forwarded request, token included); drop one of them or use --mesh istio"
            )
    strip = crds.RouteFilter(
        type="RequestHeaderModifier", request_header_modifier=crds.HeaderModifier(remove=[AUTHORIZATION])
    )
    for _route, primary, shadows in mirror_sets(plan):
        headers = [crds.HeaderMatch(name=HEADER_CLUSTER, value=primary)]
        headers += [crds.HeaderMatch(name=HEADER_SHADOWS[i], value=c) for i, c in enumerate(shadows)]
        mirrors = [] if primary in keeps else [strip]
        mirrors += [
            crds.RouteFilter(
                type="RequestMirror",
                request_mirror=crds.RequestMirror(backend_ref=crds.BackendRef(**refs[c].model_dump(exclude_none=True))),
            )
            for c in shadows
        ]
        rules.append(
            crds.RouteRule(
                matches=[crds.RouteMatch(headers=headers)],
                filters=mirrors or None,
                backend_refs=[refs[primary]],
            )
        )
    unrouted = crds.RouteRule(
        matches=[crds.RouteMatch()],
        filters=[
            crds.RouteFilter(
                type="ExtensionRef",
                extension_ref=crds.LocalObjectReference(
                    group="gateway.envoyproxy.io", kind="HTTPRouteFilter", name=UNROUTED
                ),
            )
        ],
    )
    chunks = [[unrouted, *rules[: MAX_RULES - 1]]]
    rest = rules[MAX_RULES - 1 :]
    chunks += [rest[i : i + MAX_RULES] for i in range(0, len(rest), MAX_RULES)]
    names = ["cohortgate" if i == 0 else f"cohortgate-{i + 1}" for i in range(len(chunks))]
    routes = [
        crds.HTTPRoute(
            metadata=_meta(name, ns, "mesh"),
            spec=crds.HTTPRouteSpec(
                parent_refs=[crds.ParentRef(namespace=gw_ns, name=gw_name)],
                hostnames=list(options.hosts) or None,
                rules=chunk,
            ),
        )
        for name, chunk in zip(names, chunks, strict=True)
    ]
    policy = crds.EnvoyExtensionPolicy(
        metadata=_meta("cohortgate", ns, "mesh"),
        spec=crds.EnvoyExtensionPolicySpec(
            target_refs=[crds.TargetRef(group="gateway.networking.k8s.io", kind="HTTPRoute", name=n) for n in names],
            ext_proc=[
                crds.ExtProc(
                    backend_refs=[crds.BackendRef(name=GATEWAY, port=PROCESSOR_PORT)],
                    message_timeout=f"{round(options.processor_timeout_s * 1000)}ms",
                    fail_open=False,
                    # Request headers only (no body, no response): what the edge's filter sends.
                    processing_mode=crds.ExtProcProcessingMode(
                        request=crds.ProcessingModeOptions(attributes=list(REQUEST_ATTRIBUTES))
                    ),
                )
            ],
        ),
    )
    unrouted_filter = crds.HTTPRouteFilter(
        metadata=_meta(UNROUTED, ns, "mesh"),
        spec=crds.HTTPRouteFilterSpec(
            direct_response=crds.DirectResponse(
                content_type="application/json",
                status_code=503,
                body=crds.CustomResponseBody(inline=UNROUTED_BODY),
            )
        ),
    )
    processor_tls = crds.BackendTLSPolicy(
        metadata=_meta("cohortgate-gateway", ns, "mesh"),
        spec=crds.BackendTLSPolicySpec(
            target_refs=[crds.TargetRef(group="", kind="Service", name=GATEWAY)],
            validation=crds.TLSValidation(
                hostname=options.service_host(GATEWAY),
                ca_certificate_refs=[crds.LocalObjectReference(group="", kind="ConfigMap", name=CA_CONFIGMAP)],
                subject_alt_names=[crds.SubjectAltName(type="URI", uri=f"spiffe://{options.trust_domain}/gateway")],
            ),
        ),
    )
    out: list[crds._Resource] = [policy, *routes, unrouted_filter, processor_tls]
    for b in plan.external:
        name = _external_name(b)
        endpoint = (
            crds.BackendEndpoint(ip=crds.IPEndpoint(address=b.host, port=b.port))
            if is_ip(b.host)
            else crds.BackendEndpoint(fqdn=crds.FQDNEndpoint(hostname=b.host, port=b.port))
        )
        out.append(crds.Backend(metadata=_meta(name, ns, "mesh"), spec=crds.BackendSpec(endpoints=[endpoint])))
        if b.scheme == "https":
            out.append(
                crds.BackendTLSPolicy(
                    metadata=_meta(name, ns, "mesh"),
                    spec=crds.BackendTLSPolicySpec(
                        target_refs=[crds.TargetRef(group="gateway.envoyproxy.io", kind="Backend", name=name)],
                        validation=crds.TLSValidation(hostname=b.host, well_known_ca_certificates="System"),
                    ),
                )
            )
    return out


# ------------------------------------------------------------------------------------------ Istio


def ext_proc_filter(cluster_name: str, message_timeout: dt.timedelta) -> dict[str, Any]:
    """The edge's own ext_proc filter (`cohortgate.deploy.envoy.extproc`), pointed at ``cluster_name``."""
    from cohortgate.deploy.envoy.extproc import ext_proc_filter as build
    from cohortgate.deploy.envoy.typed import to_dict

    return to_dict(build("grpc", cluster=cluster_name, message_timeout=message_timeout))


def route_patch() -> dict[str, Any]:
    """The edge's cluster-header routing and mirror slots (`cohortgate.deploy.envoy.routing`), as an
    HTTP_ROUTE merge value."""
    from cohortgate.deploy.envoy.routing import response_headers, route_action
    from cohortgate.deploy.envoy.typed import pb, to_dict

    return to_dict(pb().route.Route(route=route_action(), response_headers_to_add=response_headers()))


def istio(plan: Plan, options: RenderOptions) -> list[crds._Resource]:
    ns = options.namespace
    gw_ns, gw_name = options.mesh_gateway_ref
    route_name = f"cohortgate-{ns}"
    gateway_host = options.service_host(GATEWAY)
    processor_cluster = f"outbound|{PROCESSOR_PORT}||{gateway_host}"
    clusters = cluster_resources(plan.policy.backends, upstream_ca=SYSTEM_CA)
    patches = [
        crds.EnvoyConfigObjectPatch(
            apply_to="HTTP_FILTER",
            match=crds.EnvoyConfigObjectMatch(
                context="GATEWAY",
                listener=crds.ListenerMatch(
                    filter_chain=crds.FilterChainMatch(
                        filter=crds.FilterMatch(
                            name="envoy.filters.network.http_connection_manager",
                            sub_filter=crds.SubFilterMatch(name="envoy.filters.http.router"),
                        )
                    )
                ),
            ),
            patch=crds.Patch(
                operation="INSERT_BEFORE",
                value=ext_proc_filter(processor_cluster, dt.timedelta(seconds=options.processor_timeout_s)),
            ),
        ),
        *(
            crds.EnvoyConfigObjectPatch(
                apply_to="CLUSTER",
                match=crds.EnvoyConfigObjectMatch(context="GATEWAY"),
                patch=crds.Patch(operation="ADD", value={k: v for k, v in c.items() if k != "@type"}),
            )
            for c in clusters
        ),
        crds.EnvoyConfigObjectPatch(
            apply_to="HTTP_ROUTE",
            match=crds.EnvoyConfigObjectMatch(
                context="GATEWAY",
                route_configuration=crds.RouteConfigurationMatch(
                    vhost=crds.VirtualHostMatch(route=crds.RouteNameMatch(name=route_name))
                ),
            ),
            patch=crds.Patch(operation="MERGE", value=route_patch()),
        ),
    ]
    envoy_filter = crds.EnvoyFilter(
        metadata=_meta("cohortgate", gw_ns, "mesh"),
        spec=crds.EnvoyFilterSpec(
            workload_selector=crds.WorkloadSelector(labels=dict(options.istio_selector)),
            config_patches=patches,
        ),
    )
    virtual_service = crds.VirtualService(
        metadata=_meta("cohortgate", ns, "mesh"),
        spec=crds.VirtualServiceSpec(
            hosts=list(options.hosts) or ["*"],
            gateways=[f"{gw_ns}/{gw_name}"],
            http=[
                crds.IstioHTTPRoute(
                    name=route_name,
                    match=[crds.HTTPMatchRequest(uri=crds.StringMatch(prefix="/"))],
                    # Deliberately absent: without the EnvoyFilter the gateway answers 503.
                    route=[
                        crds.HTTPRouteDestination(
                            destination=crds.Destination(
                                host=options.service_host(UNROUTED), port=crds.PortSelector(number=SIDECAR_PORT)
                            )
                        )
                    ],
                )
            ],
        ),
    )
    destination_rule = crds.DestinationRule(
        metadata=_meta("cohortgate-gateway", ns, "mesh"),
        spec=crds.DestinationRuleSpec(
            host=gateway_host,
            traffic_policy=crds.TrafficPolicy(
                tls=crds.ClientTLSSettings(
                    mode="MUTUAL",
                    credential_name=MESH_CLIENT_SECRET,
                    sni=gateway_host,
                    subject_alt_names=[f"spiffe://{options.trust_domain}/gateway"],
                )
            ),
        ),
    )
    return [envoy_filter, virtual_service, destination_rule]


def mesh_resources(plan: Plan, options: RenderOptions) -> list[crds._Resource]:
    if options.mesh is Mesh.ENVOY_GATEWAY:
        return envoy_gateway(plan, options)
    if options.mesh is Mesh.ISTIO:
        return istio(plan, options)
    return []
