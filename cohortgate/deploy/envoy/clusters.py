"""The policy's clusters (filesystem CDS): one per variant and shadow backend, rendered once per backend.

One renderer: each cluster becomes a resource dict (`cluster_resources`, what Istio's EnvoyFilter
embeds) and, from that same dict, a YAML item and a sorted-JSON fingerprint (`_cluster_text`, both
cached). `cds_text` joins the items under a ``DiscoveryResponse`` header whose ``version_info`` hashes
the fingerprints, so a live edit of a 1 000-cluster policy costs a join and a hash (~ms), not a
full dump (~0.2 s), and an edit that changes no cluster renders the same version.

Two forms of the same document, chosen by the file's suffix as Envoy does (`cds_form`): YAML, and
JSON (one resource a line: the fingerprints themselves). Envoy reads a YAML file through yaml-cpp
and then JSON; a 4 000-cluster union took it ~6-8 s on 2 busy cores, the JSON file ~0.6 s.

Every backend cluster removes the client's ``Authorization`` header before the upstream (an
upstream header-mutation filter, so mirrored copies lose it too) unless its route sets
``forward_authorization``; shadow clusters never get it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from cohortgate.deploy.envoy.addresses import is_ip
from cohortgate.deploy.envoy.typed import (
    dump,
    dump_item,
    file_source,
    pack,
    pb,
    protocol_options,
    san,
    single_endpoint_cluster,
    tls_params,
    tls_socket,
    to_dict,
)

if TYPE_CHECKING:
    from cohortgate.core.policy import Backend

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
AUTHORIZATION = "authorization"  # HTTP's own header (RFC 9110), not a cohortgate name


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


def _backend_cluster(name: str, scheme: str, host: str, port: int, upstream_ca: str | None, http2: bool = False) -> Any:
    m = pb()
    socket = None
    if scheme == "https":
        # Verify the backend's certificate against the CA bundle and its own host name, and send
        # SNI for DNS names; no client certificate (backends authenticate the gateway otherwise).
        ip = is_ip(host)
        socket = tls_socket(
            m.tls.UpstreamTlsContext(
                sni="" if ip else host,
                common_tls_context=m.tls.CommonTlsContext(
                    tls_params=tls_params(),
                    alpn_protocols=["h2"] if http2 else ["http/1.1"],
                    validation_context=m.tls.CertificateValidationContext(
                        trusted_ca=file_source(upstream_ca or default_upstream_ca()),
                        match_typed_subject_alt_names=[san("IP_ADDRESS" if ip else "DNS", host)],
                    ),
                ),
            )
        )
    return single_endpoint_cluster(name, host=host, port=port, http2=None, transport_socket=socket)


def _remove_authorization() -> Any:
    m = pb()
    config = m.header_mutation.HeaderMutation(
        mutations=m.header_mutation.Mutations(request_mutations=[m.mutation.HeaderMutation(remove=AUTHORIZATION)])
    )
    return m.hcm.HttpFilter(name="envoy.filters.http.header_mutation", typed_config=pack(config))


@functools.cache
def _upstream_protocol_options(forward_authorization: bool, http2: bool = False) -> dict[str, Any]:
    """The protocol options every backend cluster shares (two forms), converted to dicts once;
    explicit HTTP/2 for a ``protocol: grpc`` backend (gRPC needs it end to end), else HTTP/1.1."""
    filters = None if forward_authorization else [_remove_authorization()]
    cluster = pb().cluster.Cluster(
        typed_extension_protocol_options=protocol_options(http2=http2, upstream_filters=filters)
    )
    return to_dict(cluster)["typed_extension_protocol_options"]


def _typed_resource(
    name: str,
    scheme: str,
    host: str,
    port: int,
    upstream_ca: str | None,
    forward_authorization: bool,
    http2: bool = False,
) -> dict[str, Any]:
    """One backend's CDS resource, built typed then converted: the reference (~20-30 ms a cluster)."""
    typed = _backend_cluster(name, scheme, host, port, upstream_ca, http2)
    return {
        "@type": CLUSTER_TYPE_URL,
        **to_dict(typed),
        "typed_extension_protocol_options": _upstream_protocol_options(forward_authorization, http2),
    }


# Placeholders of a cluster "shape" (everything but name, host and port): rendered once per shape.
_NAME = "cohortgate-placeholder-cluster"
_DNS_HOST = "cohortgate-placeholder.invalid"
_IP_HOST = "203.0.113.77"  # TEST-NET-3 (RFC 5737): never a real backend
_PORT = 54321


@dataclass(frozen=True, slots=True)
class _Shape:
    """One shape rendered with placeholders: as JSON (key order kept), sorted JSON, and a YAML item."""

    json: str
    sorted_json: str
    yaml_item: str
    host: str  # the host placeholder this shape uses


@functools.cache
def _shape(scheme: str, ip: bool, upstream_ca: str | None, forward_authorization: bool, http2: bool = False) -> _Shape:
    host = _IP_HOST if ip else _DNS_HOST
    resource = _typed_resource(_NAME, scheme, host, _PORT, upstream_ca, forward_authorization, http2)
    return _Shape(json.dumps(resource), json.dumps(resource, sort_keys=True), dump_item(resource), host)


def _fill(text: str, shape: _Shape, name: str, host: str, port: int, quote: Callable[[str], str]) -> str:
    return (
        text.replace(_NAME, quote(name))
        .replace(shape.host, quote(host))
        .replace(f": {_PORT}\n", f": {port}\n")
        .replace(f": {_PORT},", f": {port},")
        .replace(f": {_PORT}}}", f": {port}}}")
    )


def _json_inner(value: str) -> str:
    return json.dumps(value)[1:-1]


@functools.lru_cache(maxsize=16384)
def _cluster_resource(
    name: str,
    scheme: str,
    host: str,
    port: int,
    upstream_ca: str | None,
    forward_authorization: bool,
    http2: bool = False,
) -> dict[str, Any]:
    """One backend's CDS resource (shared: never mutate it): its shape with the placeholders filled in.

    The typed build and ``to_dict`` cost ~20-30 ms a cluster (a 2 000-cluster policy: tens of
    seconds of GIL, which starved the processor's event loop into 504s); filling a cached shape
    costs ~0.05 ms. tests/gateway/test_reload.py proves both give the same resource."""
    shape = _shape(scheme, is_ip(host), upstream_ca, forward_authorization, http2)
    return json.loads(_fill(shape.json, shape, name, host, port, _json_inner))


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESOLVER = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"


def _plain(value: str) -> bool:
    """Would PyYAML write ``value`` as a plain scalar, like the placeholders it replaces?"""
    return bool(_PLAIN.fullmatch(value)) and _RESOLVER.resolve(yaml.ScalarNode, value, (True, False)) == _STR_TAG


_Key = tuple[str, str, str, int, str | None, bool, bool]


def _key(b: Backend, upstream_ca: str | None) -> _Key:
    return (b.cluster, b.scheme, b.host, b.port, upstream_ca, b.forward_authorization, b.protocol == "grpc")


def unique_backends(backends: Iterable[Backend]) -> list[Backend]:
    """One backend per cluster name, the first seen, in order."""
    seen: dict[str, Backend] = {}
    for b in backends:
        seen.setdefault(b.cluster, b)
    return list(seen.values())


def cluster_resources(backends: Iterable[Backend], *, upstream_ca: str | None = None) -> list[dict[str, Any]]:
    """The CDS resources for these backends as dicts, each with its ``@type`` (fresh copies).

    ``upstream_ca`` verifies https backends (default: the system trust store)."""
    import copy

    return [copy.deepcopy(_cluster_resource(*_key(b, upstream_ca))) for b in unique_backends(backends)]


@functools.lru_cache(maxsize=16384)
def _cluster_text(key: _Key | tuple[str, str, str, int, str | None, bool]) -> tuple[str, str]:
    """One cluster as (sorted JSON, an item of the ``resources:`` block sequence), made once and cached.

    PyYAML writes a sequence under a mapping key without indentation, so ``resources:`` followed by
    these items is exactly how `dump` writes the whole list. Both are the shape's texts with the
    placeholders replaced (PyYAML costs ~0.6 ms a cluster); unusual names go through PyYAML."""
    name, scheme, host, port, upstream_ca, forward_authorization, *grpc = key  # (a 6-tuple: HTTP/1.1)
    http2 = bool(grpc and grpc[0])
    shape = _shape(scheme, is_ip(host), upstream_ca, forward_authorization, http2)
    fingerprint = _fill(shape.sorted_json, shape, name, host, port, _json_inner)
    if _plain(name) and _plain(host):
        return fingerprint, _fill(shape.yaml_item, shape, name, host, port, str)
    return fingerprint, dump_item(_cluster_resource(*key))


def _header(source: str) -> str:
    return (
        f"Envoy clusters (filesystem CDS) rendered by `cohortgate envoy render` from {source}.\n"
        "Replaced atomically whenever the policy's clusters change; do not edit."
    )


CDS_FORMS = ("yaml", "json")


def cds_form(path: str | os.PathLike[str]) -> str:
    """The form Envoy expects in a CDS file: JSON for ``*.json``, else YAML (Envoy's own rule)."""
    return "json" if os.fspath(path).endswith(".json") else "yaml"


def cds_text(
    backends: Iterable[Backend], *, upstream_ca: str | None = None, source: str = "a policy", form: str = "yaml"
) -> tuple[str, str]:
    """(version, CDS file text in ``form``, see `CDS_FORMS`) for these backends' clusters; the
    version names the content, whatever the form."""
    if form not in CDS_FORMS:
        raise ValueError(f"unknown CDS form {form!r}: one of {', '.join(CDS_FORMS)}")
    parts = [_cluster_text(_key(b, upstream_ca)) for b in unique_backends(backends)]
    version = hashlib.sha256(("[" + ", ".join(j for j, _ in parts) + "]").encode()).hexdigest()[:16]
    if form == "json":
        # JSON has no comments: the header's facts go nowhere; version_info leads (`text_version`).
        head = f'{{"version_info": "{version}", "type_url": "{CLUSTER_TYPE_URL}", "resources": ['
        return version, head + ("\n" + ",\n".join(j for j, _ in parts) + "\n" if parts else "") + "]}\n"
    envelope = to_dict(pb().discovery.DiscoveryResponse(version_info=version, type_url=CLUSTER_TYPE_URL))
    head = dump(envelope, _header(source))
    return version, head + ("resources:\n" + "".join(y for _, y in parts) if parts else "resources: []\n")


_JSON_VERSION = re.compile(r'^\{"version_info": "([^"]*)"')


def text_version(text: str) -> str | None:
    """The ``version_info`` of a CDS text `cds_text` made, either form (Envoy reports the one it accepted)."""
    found = _JSON_VERSION.match(text)
    if found:
        return found[1]
    for line in text.splitlines()[:20]:
        if line.startswith("version_info:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return None
