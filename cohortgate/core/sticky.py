"""The sticky assignment: a signed note of a unit's arm that the client echoes, so the unit keeps it.

A bandit route's weights move every few seconds; a hash layout alone would then move units between
arms whenever an arm shrinks. The gateway therefore answers each request on such a route with
``x-cohortgate-assignment: 1.VARIANT.TAG`` and honours the note when the client sends it back:
the unit keeps VARIANT while the note is intact and VARIANT is live (a rolled-back arm's units go
back to the layout, safety first). Stateless on the server, like the exposure token: no store and no
per-request round trip, every gateway agrees, and a check costs one keyed BLAKE2b (~1 µs).

TAG is a 128-bit keyed BLAKE2b (base64url) over the route, its cohort salt, the raw unit and the
variant, under a key derived from ``$COHORTGATE_EXPOSURE_KEY`` (comma-separated: the first signs,
all verify). The unit is in the MAC, not in the note: a note proves nothing for another unit and
says nothing about whose it is. The salt is in the MAC: a new salt starts a new experiment, and
every old note stops counting. A note is deterministic (the same unit, arm and salt give the same
note), so echoing the latest one or an older one is the same. Pure: standard library only.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence

VERSION = "1"
TAG_BYTES = 16
_PERSON = b"cg-sticky-v1"
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG = re.compile(r"[0-9a-zA-Z_-]{22}")
_URLSAFE = bytes.maketrans(b"+/", b"-_")
MAX_LENGTH = 100


def sticky_key(mac_key: bytes) -> bytes:
    """The signing key for assignment notes, derived from an exposure MAC key (one secret, two uses)."""
    return hashlib.blake2b(mac_key, digest_size=32, person=_PERSON).digest()


def _tag(key: bytes, route: str, salt: str, unit: str, variant: str) -> str:
    message = "\0".join((route, salt, unit, variant)).encode()
    raw = hashlib.blake2b(message, key=key, digest_size=TAG_BYTES).digest()
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def mint(key: bytes, route: str, salt: str, unit: str, variant: str) -> str:
    """The note that pins ``unit`` to ``variant`` on ``route`` under ``salt``."""
    return f"{VERSION}.{variant}.{_tag(key, route, salt, unit, variant)}"


def verify(note: str | None, keys: Sequence[bytes], route: str, salt: str, unit: str) -> str | None:
    """The variant a note pins this unit to, or None (absent, malformed, another unit/route/salt, forged)."""
    if not note or not keys or len(note) > MAX_LENGTH:
        return None
    parts = note.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not _LABEL.fullmatch(parts[1]) or not _TAG.fullmatch(parts[2]):
        return None
    ok = False
    for key in keys:  # every key is tried: the time taken does not say which one matched
        ok |= hmac.compare_digest(_tag(key, route, salt, unit, parts[1]), parts[2])
    return parts[1] if ok else None
