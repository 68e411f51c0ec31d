"""Who is calling: bearer-token verification (cached) and the mTLS identity from Envoy's attributes.

``TokenVerifier.verify`` turns an ``Authorization`` header into immutable claims or raises
``RequestDenied(Denial.UNAUTHENTICATED, sentence)``. pyjwt does the cryptography and the ``iss`` /
``aud`` checks; ``exp``, ``nbf`` and ``iat`` are checked here against an injectable clock with a
bounded leeway. Every pyjwt exception is translated to a sentence in one place, ``_denial_for``.

Algorithms: an explicit allow-list of asymmetric algorithms. ``none`` and every HMAC algorithm are
refused when the verifier is built, so a public key can never be used as an HMAC secret; keys are
pyjwt ``PyJWK`` objects bound to their own algorithm, so a token cannot pick another one.

Cache: verified claims are kept, keyed by the raw header value, until the token's ``exp`` (plus the
leeway a fresh check would grant). A hit is a dict lookup and one comparison. The cache is bounded
and evicts the oldest insertion first; it is cleared when a key disappears from the JWKS, so a
withdrawn key stops working at the next refresh rather than when its tokens expire.

Tokens and keys never appear in a repr, a log line or a denial message.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jwt

from cohortgate.core.errors import Denial, RequestDenied
from gateway.jwks import KeySet

MAX_LEEWAY_S = 300.0
ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

#: Envoy attribute names (``request_attributes`` of the ext_proc filter) for the peer certificate.
URI_SAN_ATTRIBUTE = "connection.uri_san_peer_certificate"
SUBJECT_ATTRIBUTE = "connection.subject_peer_certificate"
MTLS_ATTRIBUTE = "connection.mtls"
PEER_CERT_ATTRIBUTES = (URI_SAN_ATTRIBUTE, SUBJECT_ATTRIBUTE, MTLS_ATTRIBUTE)


class _Refusal(jwt.InvalidTokenError):
    """A check made here rather than in pyjwt; carries the sentence the client will read."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


def _deny(sentence: str) -> RequestDenied:
    return RequestDenied(Denial.UNAUTHENTICATED, sentence)


def _denial_for(exc: jwt.PyJWTError) -> RequestDenied:
    """The one place where pyjwt's exceptions become user-facing sentences."""
    if isinstance(exc, _Refusal):
        return _deny(exc.sentence)
    if isinstance(exc, jwt.ExpiredSignatureError):
        return _deny("The bearer token has expired.")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return _deny("The bearer token is not valid yet (its nbf or iat lies in the future).")
    if isinstance(exc, jwt.InvalidAudienceError):
        return _deny("The bearer token was not issued for this service (wrong audience).")
    if isinstance(exc, jwt.InvalidIssuerError):
        return _deny("The bearer token was not issued by the trusted issuer.")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _deny(f"The bearer token lacks the required {exc.claim!r} claim.")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return _deny("The bearer token's signing algorithm is not accepted for its key.")
    if isinstance(exc, jwt.InvalidSignatureError):  # a DecodeError subclass: test it first
        return _deny("The bearer token's signature does not verify.")
    if isinstance(exc, jwt.DecodeError):
        return _deny("The bearer token is malformed.")
    return _deny("The bearer token is invalid.")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a finite float. JSON parsers accept ``NaN``, ``Infinity`` and
    ``1e400`` (inf); every comparison with NaN is false and inf never passes, so such an ``exp``
    would never expire: refused, like an integer too large for a float."""
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refusal(f"The bearer token's {name!r} claim is not a number.")
    try:
        moment = float(value)
    except OverflowError:
        moment = math.inf
    if not math.isfinite(moment):
        raise _Refusal(f"The bearer token's {name!r} claim is not a finite number of seconds.")
    return moment


class TokenVerifier:
    """Verifies bearer JWTs against a ``KeySet`` and caches the results until they expire."""

    def __init__(
        self,
        keys: KeySet,
        issuer: str | Sequence[str],
        audience: str | Sequence[str],
        algorithms: Iterable[str],
        leeway_s: float = 30,
        max_token_bytes: int = 8192,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algs = tuple(dict.fromkeys(algorithms))
        if not algs:
            raise ValueError("the algorithm allow-list is empty")
        for alg in algs:
            if alg.lower() == "none":
                raise ValueError("the 'none' algorithm can never be allowed")
            if alg.upper().startswith("HS"):
                raise ValueError(f"HMAC algorithm {alg!r} refused: a verifier holds public keys only")
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"algorithm {alg!r} is not supported; use one of {sorted(ASYMMETRIC_ALGORITHMS)}")
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be between 0 and {MAX_LEEWAY_S:g} seconds")
        if max_token_bytes <= 0 or cache_size < 0:
            raise ValueError("max_token_bytes must be positive and cache_size not negative")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algs
        self.leeway_s = float(leeway_s)
        self.max_token_bytes = max_token_bytes
        self.cache_size = cache_size
        self._clock = clock
        self._bad_alg_sentence = f"The bearer token's signing algorithm is not allowed (allowed: {', '.join(algs)})."
        self._jwt = jwt.PyJWT()
        # exp/nbf/iat are checked here, against self._clock; pyjwt checks presence, iss and aud.
        self._options: Any = {
            "require": ["exp", "iss", "aud"],
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        self._cache: OrderedDict[str, tuple[float, Mapping[str, Any]]] = OrderedDict()
        self.fresh_verifications = 0  # full signature checks performed (cache misses that got far)
        keys.subscribe(self._keys_changed)

    # ---- the hot path

    def verify(self, authorization: str | None) -> Mapping[str, Any]:
        """Claims of a valid bearer token, or ``RequestDenied(UNAUTHENTICATED, sentence)``."""
        if authorization is not None:
            hit = self._cache.get(authorization)
            if hit is not None and self._clock() < hit[0]:
                return hit[1]
        return self._verify_fresh(authorization)

    # ---- the slow path

    def _verify_fresh(self, authorization: str | None) -> Mapping[str, Any]:
        if authorization is None:
            raise _deny("The request has no Authorization header; send 'Authorization: Bearer <token>'.")
        self._cache.pop(authorization, None)  # an expired entry, if any
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise _deny("The Authorization header must use the Bearer scheme.")
        token = token.strip(" ")
        if len(token) > self.max_token_bytes:
            raise _deny(f"The bearer token is larger than {self.max_token_bytes} bytes.")
        if not token:
            raise _deny("The Authorization header holds no bearer token.")
        try:
            expires_at, claims = self._check(token)
        except jwt.PyJWTError as exc:
            raise _denial_for(exc) from None
        frozen: Mapping[str, Any] = _freeze(claims)
        if self.cache_size:
            if len(self._cache) >= self.cache_size:
                self._cache.popitem(last=False)
            self._cache[authorization] = (expires_at, frozen)
        return frozen

    def _check(self, token: str) -> tuple[float, dict[str, Any]]:
        if not token.isascii():
            raise jwt.DecodeError("non-ASCII token")
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise _Refusal(self._bad_alg_sentence)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Refusal("The bearer token has no key id (kid) header.")
        key = self.keys.get(kid)
        if key is None:
            raise _Refusal("The bearer token is signed by a key this gateway does not know.")
        self.fresh_verifications += 1
        claims = self._jwt.decode(
            token,
            key=key,
            algorithms=list(self.algorithms),
            audience=self.audience,
            issuer=self.issuer,
            options=self._options,
        )
        now = self._clock()
        leeway = self.leeway_s
        exp = _number(claims, "exp")
        assert exp is not None  # required above
        if now >= exp + leeway:
            raise jwt.ExpiredSignatureError("expired")
        for name in ("nbf", "iat"):
            moment = _number(claims, name)
            if moment is not None and moment > now + leeway:
                raise jwt.ImmatureSignatureError(name)
        return exp + leeway, claims

    # ---- housekeeping

    def _keys_changed(self, removed: frozenset[str]) -> None:
        if removed:
            self._cache.clear()

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cached(self) -> int:
        return len(self._cache)

    def __repr__(self) -> str:
        return (
            f"TokenVerifier(issuer={self.issuer!r}, audience={self.audience!r}, "
            f"algorithms={list(self.algorithms)}, cached={len(self._cache)})"
        )


# ------------------------------------------------------------------------------------- identity

_SPIFFE_RE = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)+)")


def parse_spiffe_id(value: str) -> tuple[str, str] | None:
    """``(trust_domain, path)`` of a well-formed SPIFFE ID with a workload path, else None."""
    if len(value) > 2048:
        return None
    match = _SPIFFE_RE.fullmatch(value)
    if match is None:
        return None
    trust_domain, path = match.groups()
    if any(segment in {".", ".."} for segment in path.split("/")):
        return None
    return trust_domain, path


def identity_from_attributes(attrs: Mapping[str, Any] | None, trust_domain: str | None = None) -> str | None:
    """The caller's SPIFFE ID from Envoy's peer-certificate attributes, or None.

    Envoy reports the first URI SAN as ``connection.uri_san_peer_certificate``. Anything that is not
    a well-formed ``spiffe://TD/path`` (or is from another trust domain, when one is given) is None:
    an identity we cannot parse is no identity.
    """
    if not attrs or attrs.get(MTLS_ATTRIBUTE, True) is not True:
        return None
    value = attrs.get(URI_SAN_ATTRIBUTE)
    if not isinstance(value, str):
        return None
    parsed = parse_spiffe_id(value)
    if parsed is None or (trust_domain is not None and parsed[0] != trust_domain):
        return None
    return value


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The token's scopes: a space-separated ``scope`` string and/or an ``scp`` list (or string)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list | tuple):
            found.update(s for s in value if isinstance(s, str) and s)
    return frozenset(found)
