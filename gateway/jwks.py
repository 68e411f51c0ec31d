"""Where token-verification keys come from, and the in-memory key set the verifier reads.

    KeySource                    a JWKS provider: ``fetch()`` (sync) and ``fetch_async()``
    ├── JwksMemory               a dict held in memory: the embedded default and the test double
    ├── JwksFile                 a local ``jwks.json`` (re-read on demand; cheap)
    └── JwksUrl                  an ``https://`` JWKS endpoint (aiohttp in the background)

    KeySet                       kid -> pyjwt ``PyJWK``; swapped atomically on refresh

The hot path is ``KeySet.get(kid)``: one dict lookup for a known kid, never I/O. An unknown kid
triggers a refresh at most once per ``min_refresh_interval_s`` (PyJWKClient's cooldown idea), so a
stream of made-up kids cannot turn the gateway into a JWKS-fetching amplifier. For a file the refresh
is a synchronous read on that (rare) request; for a URL, the request is refused at once and the
fetch runs as a background task, because the verify path is synchronous and must not block the loop.
A failed refresh keeps the previous keys. Keys are parsed by pyjwt (``PyJWKSet``); symmetric
(``oct``) keys, keys with private members and non-signing keys are dropped, since a JWKS is public.

A URL fetch is bounded: https only, redirects are never followed (a 3xx is a failed fetch that names
where it pointed: https -> http would hand the key set to anyone on the path, and any redirect moves
trust to a host nobody configured), at most ``MAX_JWKS_BYTES`` read (decompressed), and one total
deadline for connecting, the headers and the body, so a server dripping bytes cannot hold it open.
``allowed_hosts`` (the policy's ``jwt.jwks_hosts``) pins which hosts a URL may name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK, PyJWKSet

log = logging.getLogger("cohortgate.jwks")

MAX_JWKS_BYTES = 1 << 20
_CHUNK = 64 * 1024
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JwksError(Exception):
    """A JWKS could not be fetched or holds no usable signing key."""


class KeySource(Protocol):
    """A provider of a JWKS document. ``fetch`` may block; ``fetch_async`` must not."""

    #: True when a synchronous fetch is cheap enough to do on the (rare) unknown-kid request.
    sync_refresh: bool

    def fetch(self) -> Mapping[str, Any]: ...

    async def fetch_async(self) -> Mapping[str, Any]: ...


class JwksMemory:
    """A JWKS held in memory; ``set`` replaces it (what a test or an embedding program uses)."""

    sync_refresh = True

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._jwks = jwks

    def set(self, jwks: Mapping[str, Any]) -> None:
        self._jwks = jwks

    def fetch(self) -> Mapping[str, Any]:
        return self._jwks

    async def fetch_async(self) -> Mapping[str, Any]:
        return self._jwks

    def __repr__(self) -> str:
        return "JwksMemory()"


class JwksFile:
    """A ``jwks.json`` on disk, read whole on each fetch (a few hundred bytes)."""

    sync_refresh = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def fetch(self) -> Mapping[str, Any]:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise JwksError(f"cannot read JWKS file {self.path}: {exc.strerror or exc}") from exc
        return _parse_document(raw, str(self.path))

    async def fetch_async(self) -> Mapping[str, Any]:
        return self.fetch()

    def __repr__(self) -> str:
        return f"JwksFile({str(self.path)!r})"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows 3xx (to http:// too) by default; a JWKS fetch follows none."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # urllib then raises HTTPError(code) for the 3xx itself


class JwksUrl:
    """An ``https://`` JWKS endpoint. The gateway refreshes it in the background with aiohttp."""

    sync_refresh = False

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("a JWKS URL must be an absolute https:// URL")
        if timeout <= 0:
            raise ValueError("the JWKS fetch timeout must be positive")
        self._display = f"https://{parts.netloc.rpartition('@')[2]}{parts.path}"  # no query/userinfo
        if allowed_hosts is not None:
            hosts = {h.lower().rstrip(".") for h in allowed_hosts}
            if parts.hostname.rstrip(".") not in hosts:
                raise ValueError(
                    f"JWKS URL {self._display} names host {parts.hostname!r}, "
                    f"which is not an allowed JWKS host ({', '.join(sorted(hosts)) or 'none'})"
                )
        self.url = url
        self.timeout = timeout
        self._ssl = ssl_context or ssl.create_default_context()
        self._opener = urllib.request.build_opener(_NoRedirects(), urllib.request.HTTPSHandler(context=self._ssl))

    def _redirected(self, status: int, location: str | None) -> JwksError:
        target = urlsplit(location or "")
        where = f"{target.scheme}://{target.netloc.rpartition('@')[2]}" if target.scheme else "a relative URL"
        return JwksError(
            f"JWKS endpoint {self._display} answered a redirect (HTTP {status} to {where}); "
            "redirects are not followed: configure the final https:// URL"
        )

    def fetch(self) -> Mapping[str, Any]:
        """Blocking fetch, for start-up and the CLI; never called on the request path."""
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                chunks: list[bytes] = []
                size = 0
                while size <= MAX_JWKS_BYTES:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no complete answer within {self.timeout:g} s")
                    chunk = resp.read1(_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                raw = b"".join(chunks)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise self._redirected(exc.code, exc.headers.get("Location")) from None
            raise JwksError(f"JWKS endpoint {self._display} answered HTTP {exc.code}") from None
        except OSError as exc:  # URLError, timeouts and TLS errors are all OSErrors
            raise JwksError(f"cannot fetch JWKS from {self._display}: {exc}") from exc
        return _parse_document(raw, self._display)

    async def fetch_async(self) -> Mapping[str, Any]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(
                    self.url, ssl=self._ssl, headers={"Accept": "application/json"}, allow_redirects=False
                ) as resp,
            ):
                if 300 <= resp.status < 400:
                    raise self._redirected(resp.status, resp.headers.get("Location"))
                if resp.status != 200:
                    raise JwksError(f"JWKS endpoint {self._display} answered HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_JWKS_BYTES:
                    raise JwksError(f"JWKS from {self._display} is larger than {MAX_JWKS_BYTES} bytes")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_JWKS_BYTES:
                        break
                raw = b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise JwksError(f"cannot fetch JWKS from {self._display}: {exc!r}") from exc
        return _parse_document(raw, self._display)

    def __repr__(self) -> str:
        return f"JwksUrl({self._display!r}, timeout={self.timeout})"


def _parse_document(raw: bytes, where: str) -> Mapping[str, Any]:
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"JWKS from {where} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise JwksError(f"JWKS from {where} is not JSON") from exc
    if not isinstance(doc, dict):
        raise JwksError(f"JWKS from {where} is not a JSON object")
    return doc


def parse_jwks(doc: Mapping[str, Any]) -> dict[str, PyJWK]:
    """kid -> PyJWK for every public signing key; raises JwksError when none is usable."""
    members = doc.get("keys")
    if not isinstance(members, list):
        raise JwksError("JWKS has no 'keys' list")
    usable = [
        k
        for k in members
        if isinstance(k, dict)
        and isinstance(k.get("kid"), str)
        and k.get("kty") != "oct"
        and k.get("use", "sig") == "sig"
        and not (_PRIVATE_MEMBERS & k.keys())
    ]
    try:
        key_set = PyJWKSet(usable)
    except jwt.PyJWTError as exc:
        raise JwksError(f"JWKS holds no usable public signing key ({len(members)} entries)") from exc
    keys: dict[str, PyJWK] = {}
    for key in key_set.keys:
        if key.key_id is not None:
            keys.setdefault(key.key_id, key)  # first wins: jwks.json lists the newest first
    return keys


class KeySet:
    """The current verification keys, by kid. Refreshes are rate-limited; lookups never block."""

    def __init__(
        self,
        source: KeySource,
        *,
        min_refresh_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        load: bool = True,
    ) -> None:
        if min_refresh_interval_s < 0:
            raise ValueError("min_refresh_interval_s must not be negative")
        self.source = source
        self.min_refresh_interval_s = min_refresh_interval_s
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._last_attempt: float | None = None
        self._pending: asyncio.Task[bool] | None = None
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self.refreshes = 0  # attempts, successful or not (for metrics and tests)
        self.refresh_failures = 0
        if load:
            self._install(parse_jwks(source.fetch()))  # at start-up a broken JWKS is fatal
            self._last_attempt = clock()

    # ---- the hot path

    def get(self, kid: str) -> PyJWK | None:
        """The key for ``kid``; on a miss, refresh if allowed (see the module docstring)."""
        key = self._keys.get(kid)
        if key is not None:
            return key
        if not self._due():
            return None
        if self.source.sync_refresh:
            self.refresh()
        else:
            self._refresh_in_background()
        return self._keys.get(kid)

    # ---- refreshing

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def _due(self) -> bool:
        last = self._last_attempt
        return last is None or self._clock() - last >= self.min_refresh_interval_s

    def subscribe(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call ``listener(removed_kids)`` after each refresh (the verifier drops its cache)."""
        self._listeners.append(listener)

    def _install(self, keys: dict[str, PyJWK]) -> None:
        removed = frozenset(self._keys.keys() - keys.keys())
        self._keys = keys  # one reference swap: readers see the old or the new set, never a mix
        for listener in self._listeners:
            listener(removed)

    def _begin(self) -> None:
        self._last_attempt = self._clock()
        self.refreshes += 1

    def _failed(self, exc: Exception) -> bool:
        self.refresh_failures += 1
        log.warning("JWKS refresh from %r failed, keeping %d keys: %s", self.source, len(self._keys), exc)
        return False

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the source now (blocking) unless rate-limited. True when new keys were installed."""
        if not force and not self._due():
            return False
        self._begin()
        try:
            keys = parse_jwks(self.source.fetch())
        except JwksError as exc:
            return self._failed(exc)
        self._install(keys)
        log.info("JWKS refreshed from %r: %d keys", self.source, len(keys))
        return True

    async def refresh_async(self, *, force: bool = False) -> bool:
        """Like ``refresh`` but awaits the source, for the gateway's event loop."""
        if not force and not self._due():
            return False
        self._begin()
        try:
            keys = parse_jwks(await self.source.fetch_async())
        except JwksError as exc:
            return self._failed(exc)
        self._install(keys)
        log.info("JWKS refreshed from %r: %d keys", self.source, len(keys))
        return True

    def _refresh_in_background(self) -> None:
        if self._pending is not None and not self._pending.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the periodic refresher will pick it up
        self._last_attempt = self._clock()  # rate-limit from now, not from when the task starts
        self._pending = loop.create_task(self.refresh_async(force=True))

    async def wait_pending(self) -> None:
        """Wait for a background refresh started by an unknown kid (tests, shutdown)."""
        if self._pending is not None:
            await asyncio.shield(self._pending)

    async def run_periodic_refresh(self, interval_s: float = 300.0) -> None:
        """Refresh every ``interval_s`` until cancelled; run it as a task beside the gateway."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh_async(force=True)

    def __repr__(self) -> str:
        return f"KeySet({self.source!r}, keys={len(self._keys)})"


def source_from_spec(
    spec: str,
    relative_to: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
    *,
    allowed_hosts: Iterable[str] | None = None,
) -> KeySource:
    """``https://...`` -> JwksUrl (on one of ``allowed_hosts``, when given); anything else is a file
    path, relative to ``relative_to``."""
    if spec.startswith("https://"):
        return JwksUrl(spec, timeout, allowed_hosts=allowed_hosts)
    if "://" in spec:
        raise ValueError(f"JWKS location {spec!r}: only https:// URLs or file paths are accepted")
    path = Path(spec)
    if relative_to is not None and not path.is_absolute():
        path = Path(relative_to) / path
    return JwksFile(path)
