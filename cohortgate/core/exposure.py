"""The exposure token: proof that a variant served a unit, so an outcome can be attributed later.

The gateway mints one per allowed response (header ``x-cohortgate-exposure``); a client echoes it
with an outcome (``{"exposure": TOKEN, "metric": "conversion", "value": 1}``) and the controller
verifies it -- no per-request state anywhere. Layout (URL-safe, about 70 characters)::

    1.ROUTE.VARIANT.UNIT.TIME.EID.MAC

On a segmented bandit route (docs/bandits.md) the layout is version ``2``, with the request's
allocation segment before the MAC, so an outcome's reward counts for the segment it was served in
and a client cannot move it to another: ``2.ROUTE.VARIANT.UNIT.TIME.EID.SEGMENT.MAC``.

``1`` the layout version; ROUTE and VARIANT are policy names (DNS labels: no dots); UNIT the keyed
unit hash the processor already computes (never the raw id); TIME the issue time, Unix seconds in
hex; EID 48 bits naming this exposure (a hash of the request id when the gateway has one, so the
access log and label imports by request id meet the same exposure; random otherwise); MAC a
128-bit keyed BLAKE2b (RFC 7693 §2.9, its MAC mode; half the cost of HMAC-SHA256 here) over
everything before it, base64url without padding, under a key only gateways and the controller hold
(``$COHORTGATE_EXPOSURE_KEY``; comma-separated for rotation: the first mints, all verify).

`verify` refuses with a stable `Refusal`: ``malformed`` (not a token), ``forged`` (the MAC does not
match: forged, altered, or minted under a retired key), ``expired`` (older than the attribution
window), ``not_yet_valid`` (issued in the future beyond the clock skew). MACs are compared in
constant time (`hmac.compare_digest`). Pure: standard library only.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cohortgate.core.errors import CohortgateError

VERSION = "1"
SEGMENTED = "2"  # the layout with an allocation segment
MAC_BYTES = 16  # 128-bit tag: forging one is a 2^-128 guess
EID_BYTES = 6
MIN_KEY_BYTES = 16
DEFAULT_SKEW_S = 60  # a token may be issued this far in the controller's future (clock skew)
_PARTS = 7
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_UNIT = re.compile(r"[0-9a-zA-Z_-]{1,64}")
_EID = re.compile(r"[0-9a-zA-Z_-]{8}")
_TAG = re.compile(r"[0-9a-zA-Z_-]{22}")  # base64url of 16 bytes, unpadded
_SEGMENT = re.compile(r"[a-z0-9_-]{1,128}")  # declared values (labels) joined by "_"


class Refusal(enum.Enum):
    """Why a token was refused: a stable code (counted, shown to the client) and an HTTP status."""

    MALFORMED = ("malformed", 400)
    FORGED = ("forged", 403)
    EXPIRED = ("expired", 403)
    NOT_YET_VALID = ("not_yet_valid", 403)

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


class ExposureRefused(CohortgateError):
    """An outcome's exposure token is refused (`reason` says why, with a stable code and status)."""

    def __init__(self, reason: Refusal, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"exposure token refused: {reason.code}" + (f" ({detail})" if detail else ""))

    @property
    def code(self) -> str:
        return self.reason.code

    @property
    def status(self) -> int:
        return self.reason.status


@dataclass(frozen=True, slots=True)
class Exposure:
    """What a verified token says: ``variant`` served ``unit`` on ``route`` at ``issued_at``."""

    route: str
    variant: str
    unit: str
    issued_at: int  # Unix seconds
    eid: str  # names this exposure: the deduplication key with the metric
    segment: str = ""  # a segmented bandit route: the allocation segment it was served in

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The exposure's identity (one response): route, variant, unit, eid."""
        return (self.route, self.variant, self.unit, self.eid)


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(raw: bytes) -> str:
    """base64url without padding (binascii directly: a third cheaper than base64.urlsafe_b64encode)."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def exposure_id(request_id: str) -> str:
    """48 bits of BLAKE2b of the request id: the EID the gateway puts in the token for that request."""
    return _b64(hashlib.blake2b(request_id.encode(), digest_size=EID_BYTES).digest())


def random_id() -> str:
    """A random EID, for responses without a request id."""
    return _b64(os.urandom(EID_BYTES))


def mac_key(secret: bytes) -> bytes:
    """The MAC key for a secret: 32 bytes of personalised BLAKE2b (any length in, BLAKE2's key size out)."""
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"an exposure key must be at least {MIN_KEY_BYTES} bytes")
    return hashlib.blake2b(secret, digest_size=32, person=b"cg-exposure-v1").digest()


def parse_keys(text: str) -> tuple[bytes, ...]:
    """``$COHORTGATE_EXPOSURE_KEY``: comma-separated secrets (>= 16 bytes each) -> MAC keys, the first mints."""
    secrets = [k.strip().encode() for k in text.split(",") if k.strip()]
    if not secrets:
        raise ValueError("no exposure key given")
    return tuple(mac_key(s) for s in secrets)


def _mac(key: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(payload, key=key, digest_size=MAC_BYTES).digest()


def mint(key: bytes, route: str, variant: str, unit: str, now: float, eid: str | None = None, segment: str = "") -> str:
    """The token for one response (on the request path: a few microseconds, see bench_outcomes).

    ``key`` is a MAC key (`parse_keys` / `mac_key`), not the raw secret. ``eid`` from `exposure_id`
    (the request id) when the gateway has one; random otherwise. Names are trusted here (they come
    from the compiled policy and the processor's own unit hash). ``segment``: version 2, which carries it.
    """
    payload = f"{VERSION}.{route}.{variant}.{unit}.{int(now):x}.{eid or random_id()}"
    if segment:
        payload = f"{SEGMENTED}{payload[1:]}.{segment}"
    return f"{payload}.{_b64(_mac(key, payload.encode()))}"


def verify(
    token: str,
    keys: Sequence[bytes],
    now: float,
    max_age_s: float,
    skew_s: float = DEFAULT_SKEW_S,
) -> Exposure:
    """The exposure a token proves, or `ExposureRefused` (malformed, forged, expired, not_yet_valid).

    ``max_age_s`` is the attribution window: an outcome reported later than that after the
    response is not attributed. The shape is checked before the MAC, the MAC before the time, so a
    refusal never says more about a forged token than "forged".
    """
    if not isinstance(token, str) or len(token) > 512:
        raise ExposureRefused(Refusal.MALFORMED, "not a string of at most 512 characters")
    payload, _, tag = token.rpartition(".")
    parts = payload.split(".")
    segment = ""
    if parts[0] == SEGMENTED and len(parts) == _PARTS and _SEGMENT.fullmatch(parts[-1]):
        segment = parts.pop()
    elif parts[0] != VERSION:
        parts = []
    if len(parts) != _PARTS - 1 or not _TAG.fullmatch(tag):
        raise ExposureRefused(Refusal.MALFORMED, "not a version-1 or version-2 exposure token")
    _, route, variant, unit, t_hex, eid = parts
    if not (
        _LABEL.fullmatch(route)
        and _LABEL.fullmatch(variant)
        and _UNIT.fullmatch(unit)
        and _EID.fullmatch(eid)
        and 0 < len(t_hex) <= 12
        and all(c in "0123456789abcdef" for c in t_hex)
    ):
        raise ExposureRefused(Refusal.MALFORMED, "a field has the wrong shape")
    message = payload.encode()
    ok = False
    for key in keys:  # every key is tried: the time taken does not say which one matched
        # The encodings are compared, not the decoded bytes: base64 of 16 bytes leaves 4 bits of the
        # last character unused, and decoding would accept 16 spellings of one tag.
        ok |= hmac.compare_digest(_b64(_mac(key, message)), tag)
    if not ok:
        raise ExposureRefused(Refusal.FORGED)
    issued = int(t_hex, 16)
    if issued > now + skew_s:
        raise ExposureRefused(Refusal.NOT_YET_VALID, f"issued {issued - now:.0f} s in the future")
    if now - issued > max_age_s:
        raise ExposureRefused(Refusal.EXPIRED, f"issued {now - issued:.0f} s ago, window {max_age_s:g} s")
    return Exposure(route=route, variant=variant, unit=unit, issued_at=issued, eid=eid, segment=segment)
