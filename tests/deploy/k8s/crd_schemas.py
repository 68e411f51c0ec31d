"""JSON Schemas for the custom resources cohortgate renders, trimmed to the fields it uses.

Transcribed from the published CRD schemas (no network here, so the full CRDs cannot be loaded):
Envoy Gateway's API reference (main branch, Gateway API 1.5 era) for EnvoyExtensionPolicy,
HTTPRouteFilter and Backend; Gateway API v1 HTTPRoute and BackendTLSPolicy; istio/api's
customresourcedefinitions.gen.yaml for EnvoyFilter, VirtualService and DestinationRule;
cert-manager v1 for Issuer and Certificate. Objects are closed (``additionalProperties: false``)
wherever cohortgate's use covers the field list, so a misspelt field fails the test; Envoy's own
messages inside an EnvoyFilter patch are left open (Envoy validates those).
"""

from __future__ import annotations

from typing import Any


def obj(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def arr(items: dict[str, Any], min_items: int = 0, max_items: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": items, "minItems": min_items}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
DNS = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}  # Gateway API Duration
META = obj(["name", "namespace"], name=DNS, namespace=DNS, labels=LABELS, annotations=LABELS)


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return obj(
        ["apiVersion", "kind", "metadata", "spec"],
        apiVersion={"const": api_version},
        kind={"const": kind},
        metadata=META,
        spec=spec,
    )


BACKEND_REF = obj(["name"], group=STR, kind=STR, name=STR, namespace=DNS, port=PORT, weight=INT)
TARGET_REF = obj(["group", "kind", "name"], group=STR, kind=STR, name=STR, sectionName=STR)
LOCAL_REF = obj(["group", "kind", "name"], group=STR, kind=STR, name=STR)
BODY_MODE = {"enum": ["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"]}
PROCESSING_OPTIONS = obj(body=BODY_MODE, attributes=arr(STR))

ENVOY_EXTENSION_POLICY = resource(
    "gateway.envoyproxy.io/v1alpha1",
    "EnvoyExtensionPolicy",
    obj(
        targetRefs=arr(TARGET_REF, 1, 16),
        extProc=arr(
            obj(
                ["backendRefs"],
                backendRefs=arr(BACKEND_REF, 1, 16),
                backendSettings={"type": "object"},
                messageTimeout=DURATION,
                failOpen=BOOL,
                processingMode=obj(request=PROCESSING_OPTIONS, response=PROCESSING_OPTIONS, allowModeOverride=BOOL),
                metadata=obj(accessibleNamespaces=arr(STR), writableNamespaces=arr(STR)),
            ),
            1,
            16,
        ),
    ),
)

HEADER_MATCH = obj(["name", "value"], type={"enum": ["Exact", "RegularExpression"]}, name=STR, value=STR)
HTTP_ROUTE = resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    obj(
        ["rules"],
        parentRefs=arr(
            obj(["name"], group=STR, kind=STR, namespace=DNS, name=STR, sectionName=STR, port=PORT), 1, 32
        ),
        hostnames=arr(STR, 0, 16),
        rules=arr(
            obj(
                name=STR,
                matches=arr(
                    obj(
                        path=obj(type={"enum": ["Exact", "PathPrefix", "RegularExpression"]}, value=STR),
                        headers=arr(HEADER_MATCH, 0, 16),
                        method=STR,
                    ),
                    0,
                    64,
                ),
                filters=arr(
                    obj(
                        ["type"],
                        type={"enum": ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
                                       "RequestRedirect", "URLRewrite", "ExtensionRef", "CORS"]},
                        requestHeaderModifier=obj(remove=arr(STR, 0, 16)),
                        requestMirror=obj(["backendRef"], backendRef=BACKEND_REF),
                        extensionRef=LOCAL_REF,
                    ),
                    0,
                    16,
                ),
                backendRefs=arr(BACKEND_REF, 0, 16),
            ),
            1,
            16,
        ),
    ),
)

HTTP_ROUTE_FILTER = resource(
    "gateway.envoyproxy.io/v1alpha1",
    "HTTPRouteFilter",
    obj(
        directResponse=obj(
            contentType=STR,
            statusCode={"type": "integer", "minimum": 200, "maximum": 599},
            body=obj(["type"], type={"enum": ["Inline", "ValueRef"]}, inline=STR, valueRef=LOCAL_REF),
        )
    ),
)

BACKEND = resource(
    "gateway.envoyproxy.io/v1alpha1",
    "Backend",
    obj(
        ["endpoints"],
        endpoints=arr(
            obj(
                fqdn=obj(["hostname", "port"], hostname=STR, port=PORT),
                ip=obj(["address", "port"], address=STR, port=PORT),
                unix=obj(["path"], path=STR),
            ),
            1,
            64,
        ),
    ),
)

BACKEND_TLS_POLICY = resource(
    "gateway.networking.k8s.io/v1",
    "BackendTLSPolicy",
    obj(
        ["targetRefs", "validation"],
        targetRefs=arr(TARGET_REF, 1, 16),
        validation=obj(
            ["hostname"],
            caCertificateRefs=arr(LOCAL_REF, 0, 8),
            wellKnownCACertificates={"enum": ["System"]},
            hostname=STR,
            subjectAltNames=arr(obj(["type"], type={"enum": ["Hostname", "URI"]}, hostname=STR, uri=STR), 0, 5),
        ),
    ),
)

ISTIO_PATCH = obj(
    ["applyTo", "match", "patch"],
    applyTo={"enum": ["INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
                      "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"]},
    match=obj(
        context={"enum": ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"]},
        proxy=obj(proxyVersion=STR, metadata=LABELS),
        listener=obj(
            portNumber=INT,
            name=STR,
            filterChain=obj(
                name=STR,
                sni=STR,
                transportProtocol=STR,
                applicationProtocols=STR,
                destinationPort=INT,
                filter=obj(name=STR, subFilter=obj(name=STR)),
            ),
        ),
        routeConfiguration=obj(
            portNumber=INT,
            portName=STR,
            gateway=STR,
            name=STR,
            vhost=obj(name=STR, domainName=STR, route=obj(name=STR, action={"enum": ["ANY", "ROUTE", "REDIRECT",
                                                                                      "DIRECT_RESPONSE"]})),
        ),
        cluster=obj(portNumber=INT, service=STR, subset=STR, name=STR),
    ),
    patch=obj(
        ["operation"],
        operation={"enum": ["INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST",
                            "REPLACE"]},
        value={"type": "object"},  # an Envoy message: Envoy's own schema applies
        filterClass={"enum": ["UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"]},
    ),
)

ENVOY_FILTER = resource(
    "networking.istio.io/v1alpha3",
    "EnvoyFilter",
    obj(
        workloadSelector=obj(labels=LABELS),
        targetRefs=arr(obj(["kind", "name"], group=STR, kind=STR, name=STR, namespace=STR)),
        configPatches=arr(ISTIO_PATCH, 1),
        priority=INT,
    ),
)

VIRTUAL_SERVICE = resource(
    "networking.istio.io/v1",
    "VirtualService",
    obj(
        hosts=arr(STR),
        gateways=arr(STR),
        http=arr(
            obj(
                name=STR,
                match=arr(obj(uri=obj(exact=STR, prefix=STR, regex=STR), headers={"type": "object"})),
                route=arr(obj(["destination"], destination=obj(["host"], host=STR, subset=STR,
                                                               port=obj(number=PORT)), weight=INT)),
            )
        ),
    ),
)

DESTINATION_RULE = resource(
    "networking.istio.io/v1",
    "DestinationRule",
    obj(
        ["host"],
        host=STR,
        trafficPolicy=obj(
            tls=obj(
                mode={"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
                clientCertificate=STR,
                privateKey=STR,
                caCertificates=STR,
                credentialName=STR,
                subjectAltNames=arr(STR),
                sni=STR,
                insecureSkipVerify=BOOL,
            )
        ),
    ),
)

ISSUER_REF = obj(["name"], name=STR, kind={"enum": ["Issuer", "ClusterIssuer"]}, group=STR)
CERTIFICATE = resource(
    "cert-manager.io/v1",
    "Certificate",
    obj(
        ["secretName", "issuerRef"],
        secretName=DNS,
        issuerRef=ISSUER_REF,
        commonName=STR,
        dnsNames=arr(STR),
        uris=arr(STR),
        usages=arr({"enum": ["signing", "digital signature", "content commitment", "key encipherment",
                             "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                             "decipher only", "any", "server auth", "client auth", "code signing", "email protection",
                             "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping",
                             "ocsp signing", "microsoft sgc", "netscape sgc"]}),
        duration=STR,
        renewBefore=STR,
        privateKey=obj(
            algorithm={"enum": ["RSA", "ECDSA", "Ed25519"]},
            size=INT,
            rotationPolicy={"enum": ["Never", "Always"]},
            encoding={"enum": ["PKCS1", "PKCS8"]},
        ),
    ),
)

ISSUER = resource("cert-manager.io/v1", "Issuer", obj(ca=obj(["secretName"], secretName=DNS)))

KUSTOMIZATION = obj(
    ["apiVersion", "kind", "resources"],
    apiVersion={"const": "kustomize.config.k8s.io/v1beta1"},
    kind={"const": "Kustomization"},
    resources=arr({"type": "string", "pattern": r"^[a-z0-9-]+\.yaml$"}, 1),
)

BY_KIND: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): ENVOY_EXTENSION_POLICY,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("gateway.envoyproxy.io/v1alpha1", "HTTPRouteFilter"): HTTP_ROUTE_FILTER,
    ("gateway.envoyproxy.io/v1alpha1", "Backend"): BACKEND,
    ("gateway.networking.k8s.io/v1", "BackendTLSPolicy"): BACKEND_TLS_POLICY,
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): ENVOY_FILTER,
    ("networking.istio.io/v1", "VirtualService"): VIRTUAL_SERVICE,
    ("networking.istio.io/v1", "DestinationRule"): DESTINATION_RULE,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): KUSTOMIZATION,
}
