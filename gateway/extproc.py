"""The ext_proc processor: request headers + peer-certificate attributes in, routing headers or a
JSON denial out. Transport-free: gRPC, the HTTP ``http_service`` and the fast HTTP/2 server all
call the same `Processor`.

Per request (Envoy sends request headers only, one message per stream):

1. strip: every client-sent ``x-cohortgate-*`` and ``x-forwarded-client-cert`` header is removed
   (Envoy honours a client's cluster or mirror header unless the processor removes it); a header
   sent twice is read as its values joined by commas, so two ``authorization`` headers never verify;
2. authenticate: the bearer JWT (cached verification) and the SPIFFE ID of the client certificate;
3. refuse bodies over the size limit by ``content-length`` (413);
4. ``decide(policy, facts)``, memoised for a returning caller where the policy samples no shadows and
   signs no assignment notes (`Processor._decide`: the key is what `decide` reads);
5. answer: allowed -> a header mutation (cluster, shadow slots, variant/route, hashed unit, region,
   and the exposure token when ``$COHORTGATE_EXPOSURE_KEY`` is set: Envoy copies it to the response)
   with ``clear_route_cache``; denied -> an immediate JSON response with the denial's status.

Anything unexpected is logged, counted and answered with an immediate 503 (``unavailable``):
never a pass-through, never a stack trace.

Why bytes: building a ``ProcessingResponse`` with six headers through the protobuf API costs
~10 µs; concatenating cached, pre-encoded header options and parsing the result costs ~1.5 µs.
The same cache holds each option's JSON form for the ``http_service`` transport, whose request is
read with orjson (~3 µs) rather than ``json_format`` (~90 µs). Only the headers the policy can
read are decoded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from cohortgate.core.contract import (
    EXPOSURE_KEY_ENV,
    GRPC_CONTENT_TYPE,
    HEADER_ASSIGNMENT,
    HEADER_CLUSTER,
    HEADER_ENTITY,
    HEADER_EXPOSURE,
    HEADER_OUTCOMES,
    HEADER_PREFIX,
    HEADER_REGION,
    HEADER_ROUTE,
    HEADER_SEGMENT,
    HEADER_SHADOWS,
    HEADER_UNIT,
    HEADER_VARIANT,
    MAX_REQUEST_BYTES,
)
from cohortgate.core.decide import Decision, Facts, decide
from cohortgate.core.errors import Denial, RequestDenied
from cohortgate.core.exposure import exposure_id, parse_keys
from cohortgate.core.exposure import mint as mint_exposure
from cohortgate.core.policy import Features, Policy, Quality
from cohortgate.core.sticky import sticky_key
from cohortgate.support.tracing import TRACE_HEADERS, TRACEPARENT, trace_id
from gateway.audit import AuditEntry
from gateway.auth import MTLS_ATTRIBUTE, URI_SAN_ATTRIBUTE, identity_from_attributes

if TYPE_CHECKING:
    from cohortgate.support.tracing import Tracing

_new_tuple = tuple.__new__  # see AuditEntry

log = logging.getLogger("cohortgate.extproc")

XFCC_HEADER = "x-forwarded-client-cert"
CONTENT_TYPE = "content-type"  # application/grpc*: the caller is a gRPC client, denied with a gRPC status
REQUEST_ID_HEADER = "x-request-id"
STRIPPED_EXACT = frozenset({XFCC_HEADER})
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
WWW_AUTHENTICATE = 'Bearer error="invalid_token"'
DEFAULT_MAX_BODY_BYTES = MAX_REQUEST_BYTES

_BASE_HEADERS = frozenset({":method", ":path", "authorization", "content-length", CONTENT_TYPE, REQUEST_ID_HEADER})
_OVERWRITE = 2  # HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CACHE_LIMIT = 65_536
_DECISIONS_LIMIT = 16_384  # each entry keeps one token's frozen claims alive until the memo is cleared


class PolicySource(Protocol):
    """Anything with a current ``policy`` (the service's holder swaps it atomically)."""

    policy: Policy


class Verifier(Protocol):
    def verify(self, authorization: str | None) -> Mapping[str, Any]: ...


class AuditSink(Protocol):
    def record(self, entry: AuditEntry) -> None: ...


def exposure_key_from_env() -> bytes | None:
    """The MAC key exposure tokens are minted under: the first of ``$COHORTGATE_EXPOSURE_KEY``, None when
    unset (then no token is minted and nothing changes for users who do not report outcomes)."""
    text = os.environ.get(EXPOSURE_KEY_ENV, "")
    return parse_keys(text)[0] if text.strip() else None


def sticky_keys_from_env() -> tuple[bytes, ...]:
    """The keys of bandit routes' assignment notes (core.sticky), derived from every exposure key (the
    first signs, all verify); none when ``$COHORTGATE_EXPOSURE_KEY`` is unset (then nothing is pinned)."""
    text = os.environ.get(EXPOSURE_KEY_ENV, "")
    return tuple(sticky_key(k) for k in parse_keys(text)) if text.strip() else ()


@dataclass(frozen=True, slots=True)
class ProcessorSettings:
    """What the processor needs besides the policy and the verifier."""

    unit_salt: bytes = field(repr=False)  # HMAC key for x-cohortgate-unit and the audit's subject
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    trust_domain: str | None = None  # accept SPIFFE IDs from this trust domain only
    # MAC key (core.exposure.mac_key) for x-cohortgate-exposure; read from the environment at start
    exposure_key: bytes | None = field(default_factory=exposure_key_from_env, repr=False)
    sticky_keys: tuple[bytes, ...] = field(default_factory=sticky_keys_from_env, repr=False)


@dataclass(slots=True)
class Stats:
    """Plain counters (the telemetry module exports them)."""

    requests: int = 0
    allowed: int = 0
    routed: dict[str, int] = field(default_factory=dict)  # allowed requests by cluster (cg.ROUTE.VARIANT.N)
    mirrored: dict[str, int] = field(default_factory=dict)  # mirror copies requested, by shadow cluster
    denied: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    other_messages: int = 0


# ------------------------------------------------------------------------------ wire encoding


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field; ``tag`` is the pre-shifted key byte."""
    n = len(payload)
    if n < 0x80:
        return bytes((tag, n)) + payload
    if n < 0x4000:  # the answers' outer fields: a two-byte varint without the loop
        return bytes((tag, (n & 0x7F) | 0x80, n >> 7)) + payload
    return bytes((tag,)) + _varint(n) + payload


def _proto_set(name: str, raw: bytes) -> bytes:
    """One ``HeaderMutation.set_headers`` entry as protobuf field bytes."""
    header = _ld(0x0A, name.encode()) + _ld(0x1A, raw)  # HeaderValue{key=1, raw_value=3}
    option = _ld(0x0A, header) + bytes((0x18, _OVERWRITE))  # HeaderValueOption{header=1, append_action=3}
    return _ld(0x0A, option)  # HeaderMutation.set_headers = 1


def _set_option(name: str, value: str) -> tuple[bytes, bytes]:
    """One ``HeaderMutation.set_headers`` entry: (protobuf field bytes, JSON object bytes)."""
    raw = value.encode()
    as_json = orjson.dumps(
        {
            "header": {"key": name, "raw_value": base64.b64encode(raw).decode()},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    )
    return _proto_set(name, raw), as_json


def _remove_option(name: str) -> tuple[bytes, bytes]:
    return _ld(0x12, name.encode()), orjson.dumps(name)  # HeaderMutation.remove_headers = 2


class _Options:
    """Encoded header options, cached by (name, value): every cached value comes from the policy
    (clusters, variants, routes, regions), so the cache stays small; it is cleared if it ever grows."""

    __slots__ = ("_removes", "_sets")

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._removes: dict[str, tuple[bytes, bytes]] = {}

    def set(self, name: str, value: str) -> tuple[bytes, bytes]:
        key = (name, value)
        option = self._sets.get(key)
        if option is None:
            if len(self._sets) >= _CACHE_LIMIT:
                self._sets.clear()
            option = self._sets[key] = _set_option(name, value)
        return option

    def remove(self, name: str) -> tuple[bytes, bytes]:
        option = self._removes.get(name)
        if option is None:
            if len(self._removes) >= _CACHE_LIMIT:
                self._removes.clear()
            option = self._removes[name] = _remove_option(name)
        return option


def _proto_allowed(options: list[tuple[bytes, bytes]]) -> bytes:
    mutation = b"".join([o[0] for o in options])
    common = _ld(0x12, mutation) + b"\x28\x01"  # CommonResponse{header_mutation=2, clear_route_cache=5}
    return _ld(0x0A, _ld(0x0A, common))  # ProcessingResponse{request_headers=1{response=1}}


def _json_allowed(sets: list[tuple[bytes, bytes]], removes: list[tuple[bytes, bytes]]) -> bytes:
    body = b'{"request_headers":{"response":{"header_mutation":{"set_headers":[' + b",".join([o[1] for o in sets])
    if removes:
        body += b'],"remove_headers":[' + b",".join([o[1] for o in removes])
    return body + b']},"clear_route_cache":true}}}'


# ------------------------------------------------------------------------------ answers


class _Allowed:
    __slots__ = ("decision", "exposure", "removes", "sets")

    def __init__(
        self,
        sets: list[tuple[bytes, bytes]],
        removes: list[tuple[bytes, bytes]],
        decision: Any = None,
        exposure: str | None = None,
    ) -> None:
        self.sets = sets
        self.removes = removes
        self.decision = decision  # for the trace span: route, variant
        self.exposure = exposure  # this request's token: encoded by the transport that answers (never cached)


class _Denied:
    __slots__ = ("denial", "message", "request_id", "route")

    def __init__(self, denial: Denial, message: str, request_id: str, route: str | None = None) -> None:
        self.denial = denial
        self.message = message
        self.request_id = request_id
        self.route = route


def error_body(denial: Denial, message: str | None = None) -> bytes:
    """The JSON body every denial carries: ``{"error": {"code": ..., "message": ...}}``."""
    return orjson.dumps({"error": {"code": denial.code, "message": message or denial.default_message}})


def _denial_headers(denied: _Denied) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json")]
    if denied.denial is Denial.UNAUTHENTICATED:
        headers.append(("www-authenticate", WWW_AUTHENTICATE))
    if denied.request_id:
        headers.append((REQUEST_ID_HEADER, denied.request_id))
    return headers


def _is_grpc(headers: Mapping[str, str]) -> bool:
    """A gRPC caller (``application/grpc``, ``+proto``, ``+json``...), which reads a status, not a body."""
    return headers.get(CONTENT_TYPE, "").startswith(GRPC_CONTENT_TYPE)


def _grpc_headers(denied: _Denied) -> list[tuple[str, str]]:
    return [(n, v) for n, v in _denial_headers(denied) if n != CONTENT_TYPE]


def _proto_denied(denied: _Denied, grpc: bool = False) -> pb.ProcessingResponse:
    """The immediate response of a denial: a JSON body, or for a gRPC caller the denial's gRPC status
    with the same sentence (Envoy sends it as ``grpc-message`` in a trailers-only answer)."""
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = denied.denial.status
    for name, value in _grpc_headers(denied) if grpc else _denial_headers(denied):
        immediate.headers.set_headers.add(append_action=_OVERWRITE).header.CopyFrom(_header_value(name, value))
    if grpc:
        immediate.grpc_status.status = denied.denial.grpc_status
        immediate.body = denied.message.encode()
    else:
        immediate.body = error_body(denied.denial, denied.message)
    immediate.details = "cohortgate_" + denied.denial.code
    return response


def _header_value(name: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=name, raw_value=value.encode())


def _json_denied(denied: _Denied, grpc: bool = False) -> bytes:
    """`_proto_denied` for the ``http_service`` transport."""
    body = denied.message.encode() if grpc else error_body(denied.denial, denied.message)
    immediate: dict[str, Any] = {
        "status": {"code": denied.denial.status},
        "headers": {
            "set_headers": [
                {
                    "header": {"key": n, "raw_value": base64.b64encode(v.encode()).decode()},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
                for n, v in (_grpc_headers(denied) if grpc else _denial_headers(denied))
            ]
        },
        "body": base64.b64encode(body).decode(),
        "details": "cohortgate_" + denied.denial.code,
    }
    if grpc:
        immediate["grpc_status"] = {"status": denied.denial.grpc_status}
    return orjson.dumps({"immediate_response": immediate})


_UNAVAILABLE = _Denied(Denial.UNAVAILABLE, Denial.UNAVAILABLE.default_message, "")


# ------------------------------------------------------------------------------ the engine


def policy_headers(policy: Policy) -> frozenset[str]:
    """Every request header `decide` can read under this policy, plus the ones the processor reads."""
    return _BASE_HEADERS | _route_headers(policy)


def _route_headers(policy: Policy) -> frozenset[str]:
    """The request headers the policy's routes name (units, residency, eligibility, entities, segments of
    quality and of allocation, host)."""
    names: set[str] = set()
    if policy.by_host:  # routes matched by `match.host` (gRPC clients, KServe's way) read the authority
        names.add(":authority")
    for route in policy.routes:
        if route.unit_source == "header":
            names.add(route.unit_key)
        if route.residency_source == "header":
            names.add(route.residency_key)
        names.update(rule.key for rule in route.eligibility if rule.source == "header")
        if route.features is not None and route.features.entity_source == "header":
            names.add(route.features.entity_key)
        if route.quality is not None:
            names.update(s.key for s in route.quality.segments if s.source == "header")
        if route.allocation is not None:  # a bandit's per-segment weights
            names.update(s.key for s in route.allocation.segment_defs if s.source == "header" and s.key)
    return frozenset(names)


#: headers the processor reads that no decision depends on, unless a route names them: each request's own
_PER_REQUEST_HEADERS = frozenset({REQUEST_ID_HEADER, "content-length", "authorization", *TRACE_HEADERS})


def _memo_names(policy: Policy, wanted: frozenset[str], sticky: bool) -> tuple[str, ...] | None:
    """The headers a decision is memoised on (`Processor._decide`), or None where a decision depends on
    more than the read headers, the identity and the claims: a route that samples shadows by request id,
    or signed assignment notes (bandit routes with sticky keys)."""
    if sticky or any(route.shadows for route in policy.routes):
        return None
    return tuple(sorted((wanted - _PER_REQUEST_HEADERS) | (_route_headers(policy) - {"authorization"})))


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class Processor:
    """The ext_proc processor, one per gateway process: authenticates, decides and answers each request.

    Shared by every stream (`new_processor` gives each stream its own `StreamProcessor`); reads the
    current policy and verifier on each request, so a reload needs no restart."""

    def __init__(
        self,
        policies: PolicySource,
        verifier: Verifier,
        settings: ProcessorSettings,
        audit: AuditSink | None = None,
        *,
        clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> None:
        self.policies = policies
        self.tracing = tracing  # None (the default): no span, no header read, opentelemetry never imported
        self.verifier = verifier  # replaced by the service when the policy's jwt settings change
        self.settings = settings
        self.audit = audit
        self.stats = Stats()
        self._clock = clock
        self._options = _Options()
        self._units: dict[str, tuple[tuple[bytes, bytes], str]] = {}  # unit -> (header option, its hash)
        self._outcome_routes: frozenset[str] = frozenset()
        self._feature_routes: dict[str, Features] = {}  # routes whose sidecars join online features
        self._segment_routes: dict[str, Quality] = {}  # routes judged per segment (policy `quality.segments`)
        self._model_digests: dict[str, str] = {}  # cluster -> routed model digest, for the audit line
        self._sticky = False  # some route allocates adaptively and notes can be signed
        self._identities: dict[tuple[str, bool], str | None] = {}
        # decisions by (id of the claims, identity, the memo headers' values): see `_decide`
        self._decisions: dict[tuple[Any, ...], tuple[Mapping[str, Any] | None, Decision]] = {}
        self._memo: tuple[str, ...] | None = None
        self._policy: Policy | None = None
        self._wanted: frozenset[str] = _BASE_HEADERS

    def new_processor(self, trace: Mapping[str, str] | None = None) -> StreamProcessor:
        """One per ext_proc stream (the factory every transport is given). ``trace``: the stream's
        own W3C trace metadata, where Envoy puts its trace context when it started the trace."""
        return StreamProcessor(self, trace)

    # ---- transport entry points

    def handle_proto(
        self, request: pb.ProcessingRequest, stream_trace: Mapping[str, str] | None = None
    ) -> pb.ProcessingResponse:
        """Request-headers message in, response out (never raises). ``stream_trace``: the gRPC
        stream's trace metadata, the span's parent when the request carries no traceparent."""
        answer = self._answer_proto(request, stream_trace)
        return pb.ProcessingResponse.FromString(answer) if isinstance(answer, bytes) else answer

    def encode_proto(self, request: pb.ProcessingRequest, stream_trace: Mapping[str, str] | None = None) -> bytes:
        """`handle_proto`'s answer, serialised: for a transport that sends bytes (the fast server), an
        allowed answer is never parsed into a message only to be serialised again (~1.5 µs)."""
        answer = self._answer_proto(request, stream_trace)
        return answer if isinstance(answer, bytes) else answer.SerializeToString()

    def _answer_proto(
        self, request: pb.ProcessingRequest, stream_trace: Mapping[str, str] | None
    ) -> bytes | pb.ProcessingResponse:
        """An allowed answer as its encoded bytes, a denial as a message."""
        t0 = time.time_ns() if self.tracing is not None else 0
        try:
            policy = self._current()
            wanted = self._wanted
            headers: dict[str, str] = {}
            strip: list[str] = []
            for h in request.request_headers.headers.headers:
                key = h.key
                if key in wanted:
                    raw = h.raw_value  # one read: each protobuf field access builds a new object
                    value = raw.decode("utf-8", "replace") if raw else h.value
                    headers[key] = headers[key] + "," + value if key in headers else value
                elif key.startswith(HEADER_PREFIX) or key in STRIPPED_EXACT:
                    strip.append(key)
            uri, mtls = None, None
            struct = request.attributes.get(ATTRIBUTES_KEY) if request.attributes else None
            if struct is not None:
                fields = struct.fields  # .get: one map lookup each, and never inserts a missing key
                if (attr := fields.get(URI_SAN_ATTRIBUTE)) is not None:
                    uri = attr.string_value
                if (attr := fields.get(MTLS_ATTRIBUTE)) is not None:
                    mtls = attr.bool_value
            answer = self._evaluate(policy, headers, strip, uri, mtls)
            if self.tracing is not None:
                self._trace(headers if TRACEPARENT in headers or not stream_trace else stream_trace, t0, answer)
            if type(answer) is _Allowed:
                options = answer.sets + answer.removes
                if answer.exposure is not None:  # protobuf only: the JSON form would cost ~2 µs more
                    options.append((_proto_set(HEADER_EXPOSURE, answer.exposure.encode()), b""))
                return _proto_allowed(options)
            return _proto_denied(answer, _is_grpc(headers))  # type: ignore[arg-type]
        except Exception:
            self._internal_error()
            return _proto_denied(_UNAVAILABLE)

    def handle_json(self, body: bytes) -> bytes:
        """A JSON ``ProcessingRequest`` (as Envoy's ``http_service`` posts it) in, JSON out."""
        t0 = time.time_ns() if self.tracing is not None else 0
        try:
            policy = self._current()
            doc = orjson.loads(body)
            phase = doc.get("request_headers") or doc.get("requestHeaders")
            if phase is None:
                return self._json_other(doc)
            wanted = self._wanted
            headers: dict[str, str] = {}
            strip: list[str] = []
            for h in (phase.get("headers") or {}).get("headers") or ():
                key = h["key"]
                if key in wanted:
                    raw = h.get("raw_value") or h.get("rawValue")
                    value = _decode(base64.b64decode(raw)) if raw else h.get("value", "")
                    headers[key] = headers[key] + "," + value if key in headers else value
                elif key.startswith(HEADER_PREFIX) or key in STRIPPED_EXACT:
                    strip.append(key)
            uri, mtls = None, None
            attrs = (doc.get("attributes") or {}).get(ATTRIBUTES_KEY)
            if attrs:
                uri = attrs.get(URI_SAN_ATTRIBUTE)
                mtls = attrs.get(MTLS_ATTRIBUTE)
            answer = self._evaluate(policy, headers, strip, uri, mtls)
            if self.tracing is not None:
                self._trace(headers, t0, answer)
            if type(answer) is _Allowed:
                sets = answer.sets
                if answer.exposure is not None:
                    sets = [*sets, _set_option(HEADER_EXPOSURE, answer.exposure)]
                return _json_allowed(sets, answer.removes)
            return _json_denied(answer, _is_grpc(headers))  # type: ignore[arg-type]
        except Exception:
            self._internal_error()
            return _json_denied(_UNAVAILABLE)

    # ---- the shared logic

    def _current(self) -> Policy:
        policy = self.policies.policy
        if policy is not self._policy:
            self._wanted = policy_headers(policy) | (TRACE_HEADERS if self.tracing is not None else frozenset())
            self._outcome_routes = frozenset(r.name for r in policy.routes if r.kind == "outcomes")
            self._feature_routes = {r.name: r.features for r in policy.routes if r.features is not None}
            self._segment_routes = {r.name: r.quality for r in policy.routes if r.quality and r.quality.segments}
            self._model_digests = dict(policy.model_digests)  # a plain dict: ~half a mappingproxy's .get
            self._sticky = bool(self.settings.sticky_keys) and any(r.allocation for r in policy.routes)
            if self._sticky:  # bandit routes read the client's echoed assignment note
                self._wanted |= {HEADER_ASSIGNMENT}
            self._memo = _memo_names(policy, self._wanted, self._sticky)
            self._decisions = {}
            self._policy = policy
        return policy

    def _identity(self, uri: str | None, mtls: bool | None) -> str | None:
        if not uri:
            return None
        key = (uri, mtls is not False)
        try:
            return self._identities[key]
        except KeyError:
            pass
        attrs: dict[str, Any] = {URI_SAN_ATTRIBUTE: uri}
        if mtls is not None:
            attrs[MTLS_ATTRIBUTE] = bool(mtls)
        identity = identity_from_attributes(attrs, self.settings.trust_domain)
        if len(self._identities) >= _CACHE_LIMIT:
            self._identities.clear()
        self._identities[key] = identity
        return identity

    def _unit_option(self, unit: str) -> tuple[tuple[bytes, bytes], str]:
        """The x-cohortgate-unit option for a raw unit, and the keyed hash it carries (cached)."""
        cached = self._units.get(unit)
        if cached is None:
            if len(self._units) >= _CACHE_LIMIT:
                self._units.clear()
            hashed = hash_unit(self.settings.unit_salt, unit)
            cached = self._units[unit] = (_set_option(HEADER_UNIT, hashed), hashed)
        return cached

    def _mint(self, key: bytes, decision: Any, unit: str, request_id: str) -> str:
        """The exposure token for this answer (a few microseconds: one keyed BLAKE2b)."""
        eid = exposure_id(request_id) if request_id else None
        return mint_exposure(key, decision.route, decision.variant, unit, self._clock(), eid, decision.segment)

    def _decide(
        self,
        policy: Policy,
        headers: dict[str, str],
        path: str,
        identity: str | None,
        claims: Mapping[str, Any] | None,
        request_id: str,
    ) -> Decision:
        """``decide(policy, facts)``, memoised where the policy allows (`_memo_names`).

        `decide` is pure, and without shadows or assignment notes its facts are the read headers,
        the identity and the claims, so a returning caller's decision is a dictionary hit (~1 µs for
        ~6 µs of `decide` and its frozen `Facts`). The key holds the claims' ``id``; the value holds
        the claims themselves, so that id cannot be reused while the entry lives, and a hit checks
        that the verifier handed back that very object (it does from its cache: ``verify`` freezes
        each token's claims once). Bounded: cleared when full, and on every policy change."""
        names = self._memo
        if names is None:
            if self._sticky:
                note, keys = headers.get(HEADER_ASSIGNMENT), self.settings.sticky_keys
                return decide(
                    policy, Facts(headers.get(":method", ""), path, headers, identity, claims, request_id, note, keys)
                )
            return decide(policy, Facts(headers.get(":method", ""), path, headers, identity, claims, request_id))
        key = (id(claims), identity, tuple(map(headers.get, names)))
        memo = self._decisions
        hit = memo.get(key)
        if hit is not None and hit[0] is claims:
            return hit[1]
        decision = decide(policy, Facts(headers.get(":method", ""), path, headers, identity, claims, request_id))
        if len(memo) >= _DECISIONS_LIMIT:
            memo.clear()
        memo[key] = (claims, decision)
        return decision

    def _evaluate(
        self,
        policy: Policy,
        headers: dict[str, str],
        strip: list[str],
        uri: str | None,
        mtls: bool | None,
    ) -> _Allowed | _Denied:
        stats = self.stats
        stats.requests += 1
        request_id = headers.get(REQUEST_ID_HEADER, "")
        identity = self._identity(uri, mtls)
        claims: Mapping[str, Any] | None = None
        try:
            authorization = headers.get("authorization")
            if authorization is not None or policy.jwt.required:
                claims = self.verifier.verify(authorization)
            limit = self.settings.max_body_bytes
            length = headers.get("content-length")
            if limit is not None and length is not None and length.isdigit() and int(length) > limit:
                raise RequestDenied(Denial.PAYLOAD_TOO_LARGE, f"The request body is larger than {limit} bytes.")
        except RequestDenied as exc:
            return self._denied(exc.denial, exc.message, request_id, identity, claims, None, self._trace_id(headers))

        path = headers.get(":path", "")
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        decision = self._decide(policy, headers, path, identity, claims, request_id)
        if decision.denial is not None:
            return self._denied(
                decision.denial, decision.message, request_id, identity, claims, decision.route, self._trace_id(headers)
            )

        options = self._options
        sets = [options.set(HEADER_CLUSTER, decision.cluster)]  # type: ignore[arg-type]
        for i, cluster in enumerate(decision.shadows):
            sets.append(options.set(HEADER_SHADOWS[i], cluster))
        if policy.response_headers:
            sets.append(options.set(HEADER_VARIANT, decision.variant))  # type: ignore[arg-type]
            sets.append(options.set(HEADER_ROUTE, decision.route))  # type: ignore[arg-type]
        minted: str | None = None
        key = self.settings.exposure_key
        hashed = None
        if decision.unit is not None:
            unit_option, hashed = self._unit_option(decision.unit)
            sets.append(unit_option)
        outcomes = decision.route in self._outcome_routes
        if outcomes:
            # The mark Envoy routes on (path rewritten to the controller's /outcomes) is also the gateway's
            # pass there: a token minted for the outcomes route itself, which no response ever carries.
            mark = "unkeyed" if key is None else self._mint(key, decision, hashed or "gateway", request_id)
            sets.append(_set_option(HEADER_OUTCOMES, mark))
        elif key is not None and hashed is not None:  # Envoy copies this request header to the response
            minted = self._mint(key, decision, hashed, request_id)
        sets.append(options.set(HEADER_REGION, decision.region))  # type: ignore[arg-type]
        if decision.sticky:  # Envoy copies this request header to the response, like the exposure token
            sets.append(_set_option(HEADER_ASSIGNMENT, decision.sticky))
        elif self._sticky and HEADER_ASSIGNMENT in headers:
            strip.append(HEADER_ASSIGNMENT)  # read, not honoured here: never forwarded upstream
        entity = None
        if self._feature_routes:
            features = self._feature_routes.get(decision.route)  # type: ignore[arg-type]
            if features is not None:
                entity = _entity(features, headers, claims)
                if entity is not None:  # never cached: one option per user would flush the policy's ones
                    sets.append(_set_option(HEADER_ENTITY, entity))
        segmented = False
        if self._segment_routes:
            quality = self._segment_routes.get(decision.route)  # type: ignore[arg-type]
            if quality is not None:  # declared values only: the options cache stays bounded
                sets.append(options.set(HEADER_SEGMENT, quality.label(decision.region, headers, claims)))
                segmented = True
        removes = []
        if strip:  # remove what the client sent unless one of ours overwrites it
            ours = {HEADER_CLUSTER, HEADER_REGION, *HEADER_SHADOWS[: len(decision.shadows)]}
            if policy.response_headers:
                ours.update((HEADER_VARIANT, HEADER_ROUTE))
            if decision.unit is not None:
                ours.add(HEADER_UNIT)
            if minted is not None:
                ours.add(HEADER_EXPOSURE)
            if decision.sticky:
                ours.add(HEADER_ASSIGNMENT)
            if outcomes:
                ours.add(HEADER_OUTCOMES)
            if entity is not None:
                ours.add(HEADER_ENTITY)
            if segmented:
                ours.add(HEADER_SEGMENT)
            removes = [options.remove(name) for name in strip if name not in ours]
        stats.allowed += 1
        routed = stats.routed
        routed[decision.cluster] = routed.get(decision.cluster, 0) + 1  # type: ignore[index, arg-type]
        if decision.shadows:
            mirrored = stats.mirrored
            for cluster in decision.shadows:
                mirrored[cluster] = mirrored.get(cluster, 0) + 1
        if self.audit is not None:
            self.audit.record(
                _new_tuple(
                    AuditEntry,
                    (
                        self._clock(),
                        request_id,
                        identity,
                        claims.get("sub") if claims is not None else None,
                        decision.route,
                        decision.variant,
                        decision.region,
                        "allow",
                        decision.assignment + ("+fallback" if decision.fallback else ""),
                        200,
                        decision.shadow_names,
                        self._trace_id(headers) if self.tracing is not None else None,  # the line's trace.id
                        self._model_digests.get(decision.cluster),  # type: ignore[arg-type]  # routed model
                    ),
                )
            )
        return _Allowed(sets, removes, decision, minted)

    def _denied(
        self,
        denial: Denial,
        message: str,
        request_id: str,
        identity: str | None,
        claims: Mapping[str, Any] | None,
        route: str | None,
        trace: str | None = None,
    ) -> _Denied:
        denied = self.stats.denied
        denied[denial.code] = denied.get(denial.code, 0) + 1
        if self.audit is not None:
            sub = claims.get("sub") if claims is not None else None
            self.audit.record(
                _new_tuple(
                    AuditEntry,
                    (
                        self._clock(),
                        request_id,
                        identity,
                        sub,
                        route,
                        None,
                        None,
                        "deny",
                        denial.code,
                        denial.status,
                        (),
                        trace,
                    ),
                )
            )
        return _Denied(denial, message, request_id, route)

    def _trace_id(self, headers: Mapping[str, str]) -> str | None:
        """The request's W3C trace id for its audit line, when tracing is on."""
        return trace_id(headers.get(TRACEPARENT)) if self.tracing is not None else None

    def _trace(self, headers: Mapping[str, str], t0: int, answer: _Allowed | _Denied) -> None:
        """One span for this decision, child of the request's traceparent; never fails the request.
        Only the trace headers reach the tracer, never the token."""
        try:
            if not self.tracing.sampled(headers.get("traceparent")):  # type: ignore[union-attr]
                return
            carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
            if type(answer) is _Allowed:
                d = answer.decision
                attributes = {
                    "cohortgate.decision": "allow",
                    "cohortgate.route": d.route,
                    "cohortgate.variant": d.variant,
                }
                if d.shadows:
                    attributes["cohortgate.shadows"] = list(d.shadow_names)
            else:
                denied: _Denied = answer  # type: ignore[assignment]
                attributes = {
                    "cohortgate.decision": "deny" if denied.denial is not Denial.UNAVAILABLE else "error",
                    "cohortgate.denial_code": denied.denial.code,
                    "http.response.status_code": denied.denial.status,
                }
                if denied.route is not None:
                    attributes["cohortgate.route"] = denied.route
            self.tracing.span("cohortgate.decide", carrier, t0, time.time_ns(), attributes)  # type: ignore[union-attr]
        except Exception:  # tracing must never turn an answer into an error
            log.debug("cannot record a trace span", exc_info=True)

    def _internal_error(self) -> None:
        stats = self.stats
        stats.errors += 1
        n = stats.errors
        if n <= 10 or n & (n - 1) == 0:  # the first ten, then at powers of two
            log.exception("internal error in the processor (%d so far); answered 503", n)
        if self.audit is not None:
            with contextlib.suppress(Exception):  # the audit must never turn a 503 into a crash
                self.audit.record(
                    AuditEntry(self._clock(), "", None, None, None, None, None, "error", "internal_error", 503, ())
                )

    def _json_other(self, doc: Mapping[str, Any]) -> bytes:
        """Any phase other than request headers (not configured, but answered so Envoy continues)."""
        self.stats.other_messages += 1
        for phase in ("response_headers", "request_trailers", "response_trailers"):
            if phase in doc:
                return orjson.dumps({phase: {}})
        for phase in ("request_body", "response_body"):
            if phase in doc:
                return orjson.dumps({phase: {}})
        raise ValueError("a ProcessingRequest without a known phase")


class StreamProcessor:
    """One ext_proc stream. Envoy sends request headers only, so this is one message long."""

    __slots__ = ("_engine", "_trace")

    def __init__(self, engine: Processor, trace: Mapping[str, str] | None = None) -> None:
        self._engine = engine
        self._trace = trace

    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        """The answer to one message, or None when Envoy expects none (observability mode)."""
        if request.HasField("request_headers"):
            return self._engine.handle_proto(request, self._trace)
        if request.observability_mode:
            return None
        return _continue(self._engine, request)

    def handle_encoded(self, request: pb.ProcessingRequest) -> bytes | None:
        """`handle`'s answer serialised (`Processor.encode_proto`), for a transport that sends bytes."""
        if request.HasField("request_headers"):
            return self._engine.encode_proto(request, self._trace)
        if request.observability_mode:
            return None
        return _continue(self._engine, request).SerializeToString()  # type: ignore[no-any-return]


def _continue(engine: Processor, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    engine.stats.other_messages += 1
    kind = request.WhichOneof("request")
    response = pb.ProcessingResponse()
    if kind in ("response_headers", "request_body", "response_body", "request_trailers", "response_trailers"):
        getattr(response, kind).SetInParent()
        return response
    engine.stats.errors += 1
    return _proto_denied(_UNAVAILABLE)


def _entity(features: Features, headers: Mapping[str, str], claims: Mapping[str, Any] | None) -> str | None:
    """The feature-store entity id the policy names (a verified claim or a header), when it is one a
    header can carry: printable ASCII, at most 256 characters. Otherwise none is sent, and the sidecar
    serves its fallback (reason ``no_entity``)."""
    if features.entity_source == "claim":
        raw = claims.get(features.entity_key) if claims is not None else None
        value = str(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else None
    else:
        value = headers.get(features.entity_key)
    if not value or len(value) > 256 or not (value.isascii() and value.isprintable()):
        return None
    return value


def hash_unit(salt: bytes, unit: str) -> str:
    """The cohort unit as it may leave the process: HMAC-SHA256 under a secret salt, 64 bits in hex."""
    return hmac.new(salt, unit.encode(), hashlib.sha256).hexdigest()[:16]
