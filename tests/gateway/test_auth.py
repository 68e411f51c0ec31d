"""Bearer-token verification, the token cache, JWKS sources and rotation, and identities."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import ssl
import timeit
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortgate.core.errors import Denial, RequestDenied
from cohortgate.deploy import pki
from gateway.auth import (
    MTLS_ATTRIBUTE,
    URI_SAN_ATTRIBUTE,
    TokenVerifier,
    identity_from_attributes,
    parse_spiffe_id,
    scopes_of,
)
from gateway.jwks import JwksError, JwksFile, JwksMemory, JwksUrl, KeySet, parse_jwks, source_from_spec

ISSUER = pki.DEFAULT_ISSUER
AUDIENCE = pki.DEFAULT_AUDIENCE
NOW = 1_800_000_000.0


class Clock:
    """A hand-moved clock, for both wall time (tokens) and monotonic time (refresh rate limit)."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def certs(tmp_path: Path) -> pki.CertPaths:
    return pki.init_certs(tmp_path / "certs", clients=[])


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_verifier(certs: pki.CertPaths, clock: Clock, **kwargs: Any) -> TokenVerifier:
    keys = KeySet(JwksFile(certs.jwks), clock=clock)
    kwargs.setdefault("algorithms", ["ES256"])
    return TokenVerifier(keys, ISSUER, AUDIENCE, clock=clock, **kwargs)


def token(certs: pki.CertPaths, clock: Clock, **kwargs: Any) -> str:
    kwargs.setdefault("now", clock.now)
    return pki.mint_token(certs, kwargs.pop("sub", "alice"), **kwargs)


def sign(certs: pki.CertPaths, payload: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    """A token with exactly this payload, signed by the current key (kid set unless overridden)."""
    key = pki._load_key(certs.jwt_key)
    hdrs = {"kid": pki.public_jwk(key)["kid"], **(headers or {})}
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    return jwt.encode(payload, key, algorithm="ES256", headers=hdrs)


def claims_now(clock: Clock, **overrides: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": int(clock.now), "exp": int(clock.now) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refused(verifier: TokenVerifier, header: str | None) -> RequestDenied:
    with pytest.raises(RequestDenied) as info:
        verifier.verify(header)
    exc = info.value
    assert exc.denial is Denial.UNAUTHENTICATED and exc.status == 401 and exc.code == "unauthenticated"
    assert exc.message.endswith(".") and exc.message[0].isupper()
    if header and len(header) > 20:
        assert header[-16:] not in exc.message  # the token is never echoed
    return exc


# ------------------------------------------------------------------------------- the happy path


def test_a_valid_token_yields_frozen_claims(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock)
    tok = token(
        certs, clock, residency="eu", scopes=["predict", "admin"], claims={"groups": ["a", "b"], "ctx": {"k": 1}}
    )
    claims = verifier.verify(f"Bearer {tok}")
    assert claims["sub"] == "alice" and claims["residency"] == "eu" and claims["iss"] == ISSUER
    assert scopes_of(claims) == {"predict", "admin"}
    assert claims["groups"] == ("a", "b")
    with pytest.raises(TypeError):
        claims["sub"] = "mallory"  # type: ignore[index]
    with pytest.raises(TypeError):
        claims["ctx"]["k"] = 2  # type: ignore[index]
    assert verifier.verify(f"bearer {tok}")["sub"] == "alice"  # the scheme is case-insensitive


def test_leeway_applies_to_exp_nbf_and_iat(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock, leeway_s=30)
    n = int(clock.now)
    assert verifier.verify("Bearer " + sign(certs, claims_now(clock, exp=n - 29)))
    assert verifier.verify("Bearer " + sign(certs, claims_now(clock, nbf=n + 29, iat=n + 29)))
    refused(verifier, "Bearer " + sign(certs, claims_now(clock, exp=n - 31)))
    refused(verifier, "Bearer " + sign(certs, claims_now(clock, nbf=n + 31)))


# ------------------------------------------------------------------------------------ refusals


def _cases(certs: pki.CertPaths, clock: Clock, tmp_path: Path) -> dict[str, tuple[str | None, str]]:
    n = int(clock.now)
    good = token(certs, clock)
    other = pki.init_certs(tmp_path / "foreign", clients=[])
    foreign = token(other, clock)
    head, body, sig = good.split(".")
    other_sig = token(certs, clock, sub="bob").split(".")[2]
    kid = pki.public_jwk(pki._load_key(certs.jwt_key))["kid"]
    none_token = jwt.encode(claims_now(clock), None, algorithm="none", headers={"kid": kid})
    # The classic confusion attack: HMAC keyed with the verifier's public key.
    public_pem = (
        pki._load_key(certs.jwt_key)
        .public_key()
        .public_bytes(pki.serialization.Encoding.PEM, pki.serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    hs_head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    hs_body = b64(json.dumps(claims_now(clock)).encode())
    hs_sig = b64(hmac.new(public_pem, f"{hs_head}.{hs_body}".encode(), hashlib.sha256).digest())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs_token = jwt.encode(claims_now(clock), rsa_key, algorithm="RS256", headers={"kid": kid})
    big = sign(certs, claims_now(clock, pad="x" * 9000))
    return {
        "missing header": (None, "The request has no Authorization header; send 'Authorization: Bearer <token>'."),
        "basic scheme": ("Basic YWxpY2U6c2VjcmV0", "The Authorization header must use the Bearer scheme."),
        "token without scheme": (good, "The Authorization header must use the Bearer scheme."),
        "empty bearer": ("Bearer ", "The Authorization header holds no bearer token."),
        "over 8 KiB": (f"Bearer {big}", "The bearer token is larger than 8192 bytes."),
        "garbage": ("Bearer not-a-jwt", "The bearer token is malformed."),
        "two segments": (f"Bearer {head}.{body}", "The bearer token is malformed."),
        "non-ascii": (f"Bearer {head}.{body}é.{sig}", "The bearer token is malformed."),
        "unknown kid": (f"Bearer {foreign}", "The bearer token is signed by a key this gateway does not know."),
        "no kid": (
            "Bearer " + sign(certs, claims_now(clock), {"kid": None}),
            "The bearer token has no key id (kid) header.",
        ),
        "bad signature": (f"Bearer {head}.{body}.{other_sig}", "The bearer token's signature does not verify."),
        "alg none": (
            f"Bearer {none_token}",
            "The bearer token's signing algorithm is not allowed (allowed: ES256).",
        ),
        "HS256 with the public key": (
            f"Bearer {hs_head}.{hs_body}.{hs_sig}",
            "The bearer token's signing algorithm is not allowed (allowed: ES256).",
        ),
        "RS256 not allowed": (
            f"Bearer {rs_token}",
            "The bearer token's signing algorithm is not allowed (allowed: ES256).",
        ),
        "wrong issuer": (
            "Bearer " + sign(certs, claims_now(clock, iss="https://evil.example")),
            "The bearer token was not issued by the trusted issuer.",
        ),
        "wrong audience": (
            "Bearer " + sign(certs, claims_now(clock, aud="someone-else")),
            "The bearer token was not issued for this service (wrong audience).",
        ),
        "expired": (
            "Bearer " + sign(certs, claims_now(clock, iat=n - 1000, exp=n - 100)),
            "The bearer token has expired.",
        ),
        "nbf in the future": (
            "Bearer " + sign(certs, claims_now(clock, nbf=n + 100)),
            "The bearer token is not valid yet (its nbf or iat lies in the future).",
        ),
        "iat in the future": (
            "Bearer " + sign(certs, claims_now(clock, iat=n + 100)),
            "The bearer token is not valid yet (its nbf or iat lies in the future).",
        ),
        "no exp": (
            "Bearer " + sign(certs, claims_now(clock, exp=None)),
            "The bearer token lacks the required 'exp' claim.",
        ),
        "no aud": (
            "Bearer " + sign(certs, claims_now(clock, aud=None)),
            "The bearer token lacks the required 'aud' claim.",
        ),
        "exp not a number": (
            "Bearer " + sign(certs, claims_now(clock, exp="tomorrow")),
            "The bearer token's 'exp' claim is not a number.",
        ),
        "exp a boolean": (
            "Bearer " + sign(certs, claims_now(clock, exp=True)),
            "The bearer token's 'exp' claim is not a number.",
        ),
    }


CASE_NAMES = [
    "missing header", "basic scheme", "token without scheme", "empty bearer", "over 8 KiB", "garbage",
    "two segments", "non-ascii", "unknown kid", "no kid", "bad signature", "alg none",
    "HS256 with the public key", "RS256 not allowed", "wrong issuer", "wrong audience", "expired",
    "nbf in the future", "iat in the future", "no exp", "no aud", "exp not a number", "exp a boolean",
]  # fmt: skip


@pytest.mark.parametrize("case", CASE_NAMES)
def test_refusals_carry_unauthenticated_and_a_sentence(
    certs: pki.CertPaths, clock: Clock, tmp_path: Path, case: str
) -> None:
    cases = _cases(certs, clock, tmp_path)
    assert set(cases) == set(CASE_NAMES)
    header, sentence = cases[case]
    verifier = make_verifier(certs, clock)
    assert refused(verifier, header).message == sentence
    assert verifier.cached == 0


def test_an_oversized_token_is_refused_before_any_signature_check(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock, max_token_bytes=400)
    big = sign(certs, claims_now(clock, pad="x" * 400))
    assert refused(verifier, f"Bearer {big}").message == "The bearer token is larger than 400 bytes."
    assert verifier.fresh_verifications == 0


def test_the_key_binds_the_algorithm(certs: pki.CertPaths, clock: Clock) -> None:
    """With ES384 allowed too, a token claiming ES384 under our ES256 key's kid is still refused."""
    verifier = make_verifier(certs, clock, algorithms=["ES256", "ES384"])
    kid = pki.public_jwk(pki._load_key(certs.jwt_key))["kid"]
    p384 = ec.generate_private_key(ec.SECP384R1())
    tok = jwt.encode(claims_now(clock), p384, algorithm="ES384", headers={"kid": kid})
    assert refused(verifier, f"Bearer {tok}").message == (
        "The bearer token's signing algorithm is not accepted for its key."
    )


@pytest.mark.parametrize(
    ("algorithms", "match"),
    [
        (["HS256"], "HMAC"),
        (["ES256", "hs512"], "HMAC"),
        (["none"], "none"),
        (["NONE"], "none"),
        ([], "empty"),
        (["XYZ1"], "not supported"),
    ],
)
def test_dangerous_allow_lists_are_refused_at_construction(
    certs: pki.CertPaths, clock: Clock, algorithms: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_verifier(certs, clock, algorithms=algorithms)


@pytest.mark.parametrize("leeway", [-1, 301, 3600])
def test_leeway_is_bounded(certs: pki.CertPaths, clock: Clock, leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        make_verifier(certs, clock, leeway_s=leeway)


@pytest.fixture(scope="module")
def mutation_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenVerifier, str, Any]:
    certs = pki.init_certs(tmp_path_factory.mktemp("mut"), clients=[])
    clock = Clock()
    verifier = make_verifier(certs, clock, cache_size=0)
    tok = token(certs, clock, residency="eu", scopes=["predict"])
    return verifier, tok, verifier.verify(f"Bearer {tok}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_is_refused_as_unauthenticated(mutation_env: tuple, data: st.DataObject) -> None:
    """Any edit of a valid token's bytes is refused with ``unauthenticated``, never another error.

    The one exception is base64url malleability: flipping only the unused low bits of a segment's
    last character decodes to the same bytes, hence the same token; it must then give equal claims.
    """
    verifier, tok, original = mutation_env
    pos = data.draw(st.integers(0, len(tok) - 1))
    op = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    char = data.draw(st.characters(codec="utf-8", exclude_characters="\x00"))
    if op == "replace":
        mutated = tok[:pos] + char + tok[pos + 1 :]
    elif op == "delete":
        mutated = tok[:pos] + tok[pos + 1 :]
    else:
        mutated = tok[:pos] + char + tok[pos:]
    if mutated == tok:
        return
    try:
        claims = verifier.verify(f"Bearer {mutated}")
    except RequestDenied as exc:
        assert exc.denial is Denial.UNAUTHENTICATED
    else:
        assert dict(claims) == dict(original)
        segments = [base64.urlsafe_b64decode(s + "==") for s in mutated.split(".")]
        assert segments == [base64.urlsafe_b64decode(s + "==") for s in tok.split(".")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.text(), st.text().map(lambda s: "Bearer " + s)))
def test_any_header_value_is_claims_or_unauthenticated(mutation_env: tuple, header: str) -> None:
    verifier, _, _ = mutation_env
    with pytest.raises(RequestDenied) as info:
        verifier.verify(header)
    assert info.value.denial is Denial.UNAUTHENTICATED


# --------------------------------------------------------------------------------------- cache


def count_decodes(verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = verifier._jwt.decode

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(verifier._jwt, "decode", counted)
    return calls


def test_a_cache_hit_returns_the_same_claims_without_verifying(
    certs: pki.CertPaths, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = make_verifier(certs, clock)
    calls = count_decodes(verifier, monkeypatch)
    header = "Bearer " + token(certs, clock)
    first = verifier.verify(header)
    for _ in range(5):
        assert verifier.verify(header) is first
    assert calls == [1] and verifier.fresh_verifications == 1 and verifier.cached == 1


def test_the_cache_honours_expiry(certs: pki.CertPaths, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = make_verifier(certs, clock, leeway_s=10)
    calls = count_decodes(verifier, monkeypatch)
    header = "Bearer " + token(certs, clock, ttl_s=60)
    verifier.verify(header)
    clock.now += 69  # exp + leeway - 1: still good, from the cache
    verifier.verify(header)
    assert calls == [1]
    clock.now += 1  # exp + leeway: expired, whatever the cache held
    assert refused(verifier, header).message == "The bearer token has expired."
    assert calls == [2] and verifier.cached == 0


def test_the_cache_is_bounded(certs: pki.CertPaths, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = make_verifier(certs, clock, cache_size=3)
    calls = count_decodes(verifier, monkeypatch)
    headers = ["Bearer " + token(certs, clock, sub=f"u{i}") for i in range(5)]
    for header in headers:
        verifier.verify(header)
    assert verifier.cached == 3 and calls == [5]
    verifier.verify(headers[4])  # newest: cached
    assert calls == [5]
    verifier.verify(headers[0])  # oldest: evicted, verified again
    assert calls == [6] and verifier.cached == 3


def test_cache_size_zero_disables_the_cache(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock, cache_size=0)
    header = "Bearer " + token(certs, clock)
    verifier.verify(header)
    verifier.verify(header)
    assert verifier.fresh_verifications == 2 and verifier.cached == 0


def test_a_withdrawn_key_empties_the_cache(certs: pki.CertPaths, clock: Clock, tmp_path: Path) -> None:
    source = JwksMemory(json.loads(certs.jwks.read_text()))
    verifier = TokenVerifier(KeySet(source, clock=clock), ISSUER, AUDIENCE, ["ES256"], clock=clock)
    header = "Bearer " + token(certs, clock)
    verifier.verify(header)
    other = pki.init_certs(tmp_path / "other", clients=[])
    source.set(json.loads(other.jwks.read_text()))
    assert verifier.keys.refresh(force=True)
    assert verifier.cached == 0
    assert "does not know" in refused(verifier, header).message


def test_verify_costs_fresh_es256_vs_cache_hit(certs: pki.CertPaths) -> None:
    """Measured and printed (run with -s); only the ratio is asserted, since a busy machine slows both
    alike (absolute costs belong in bench/bench_gateway.py)."""
    verifier = TokenVerifier(KeySet(JwksFile(certs.jwks)), ISSUER, AUDIENCE, ["ES256"])
    header = "Bearer " + pki.mint_token(certs, "alice", residency="eu", scopes=["predict"])
    verifier.verify(header)

    def fresh() -> None:
        verifier.clear_cache()
        verifier.verify(header)

    fresh_s = min(timeit.repeat(fresh, number=100, repeat=5)) / 100
    hit_s = min(timeit.repeat(lambda: verifier.verify(header), number=100_000, repeat=5)) / 100_000
    print(f"\nverify cost: fresh ES256 {fresh_s * 1e6:.1f} us, cache hit {hit_s * 1e9:.0f} ns")
    assert fresh_s > 20 * hit_s


# ---------------------------------------------------------------------------- JWKS and rotation


def test_rotation_unknown_kid_refreshes_the_file_rate_limited(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock)
    keys = verifier.keys
    old = "Bearer " + token(certs, clock)
    verifier.verify(old)
    pki.rotate_jwt_key(certs.dir)
    new = "Bearer " + token(certs, clock, sub="bob")

    clock.now += 10  # within 30 s of the initial load: no refresh allowed
    assert "does not know" in refused(verifier, new).message
    assert keys.refreshes == 0

    clock.now += 21  # 31 s after the load: one refresh, then the new key verifies
    assert verifier.verify(new)["sub"] == "bob"
    assert keys.refreshes == 1
    verifier.clear_cache()
    assert verifier.verify(old)["sub"] == "alice"  # the previous key is still published

    foreign = pki.init_certs(certs.dir.parent / "foreign", clients=[])
    stranger = "Bearer " + token(foreign, clock)
    for _ in range(50):
        refused(verifier, stranger)
    assert keys.refreshes == 1  # a burst of unknown kids costs no refresh for 30 s
    clock.now += 30
    refused(verifier, stranger)
    assert keys.refreshes == 2


def test_a_known_kid_never_touches_the_source(certs: pki.CertPaths, clock: Clock) -> None:
    verifier = make_verifier(certs, clock, cache_size=0)
    header = "Bearer " + token(certs, clock)
    certs.jwks.unlink()  # any read would now fail
    clock.now += 3600
    for _ in range(3):
        refused(verifier, header)  # expired by now, but checked with the key in memory
    header = "Bearer " + token(certs, clock)
    assert verifier.verify(header)["sub"] == "alice"
    assert verifier.keys.refreshes == 0 and verifier.keys.refresh_failures == 0


def test_a_broken_jwks_keeps_the_previous_keys(
    certs: pki.CertPaths, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make_verifier(certs, clock)
    good = "Bearer " + token(certs, clock)
    certs.jwks.write_text("{not json")
    foreign = pki.init_certs(tmp_path / "foreign", clients=[])
    clock.now += 31
    with caplog.at_level(logging.DEBUG, logger="cohortgate"):
        refused(verifier, "Bearer " + token(foreign, clock))
        assert verifier.verify(good)["sub"] == "alice"
    assert verifier.keys.refresh_failures == 1
    assert "JWKS refresh" in caplog.text and "keeping 1 keys" in caplog.text


def test_parse_jwks_drops_symmetric_private_and_encryption_keys(certs: pki.CertPaths) -> None:
    (public,) = json.loads(certs.jwks.read_text())["keys"]
    private = {**public, "kid": "priv", "d": b64(b"\x01" * 32)}
    symmetric = {"kty": "oct", "kid": "hmac", "k": b64(b"secret"), "alg": "HS256"}
    encryption = {**public, "kid": "enc", "use": "enc"}
    nokid = {k: v for k, v in public.items() if k != "kid"}
    keys = parse_jwks({"keys": [symmetric, private, encryption, nokid, public]})
    assert set(keys) == {public["kid"]}
    with pytest.raises(JwksError, match="no usable"):
        parse_jwks({"keys": [symmetric]})
    with pytest.raises(JwksError, match="'keys'"):
        parse_jwks({"nope": []})


def test_a_missing_jwks_file_is_fatal_at_start(tmp_path: Path) -> None:
    with pytest.raises(JwksError, match="cannot read JWKS file"):
        KeySet(JwksFile(tmp_path / "absent.json"))


def test_source_from_spec(tmp_path: Path) -> None:
    source = source_from_spec("certs/jwks.json", relative_to=tmp_path)
    assert isinstance(source, JwksFile) and source.path == tmp_path / "certs" / "jwks.json"
    assert isinstance(source_from_spec("https://idp.example/jwks"), JwksUrl)
    with pytest.raises(ValueError, match="https"):
        source_from_spec("http://idp.example/jwks")


def test_no_token_or_key_in_reprs_or_logs(
    certs: pki.CertPaths, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (jwk,) = json.loads(certs.jwks.read_text())["keys"]
    secret_pem = certs.jwt_key.read_text()
    with caplog.at_level(logging.DEBUG):
        verifier = make_verifier(certs, clock)
        tok = token(certs, clock)
        verifier.verify(f"Bearer {tok}")
        pki.rotate_jwt_key(certs.dir)
        clock.now += 31
        verifier.verify("Bearer " + token(certs, clock))
        refused(verifier, f"Bearer {tok}x")
    texts = [repr(verifier), repr(verifier.keys), repr(verifier.keys.source), caplog.text]
    for text in texts:
        assert tok not in text and tok.split(".")[2] not in text
        assert jwk["x"] not in text and "BEGIN" not in text and secret_pem not in text
    url = JwksUrl("https://user:pw@idp.example/jwks?access_token=s3cret")
    assert "s3cret" not in repr(url) and "pw" not in repr(url)


# ------------------------------------------------------------------------------ JWKS over HTTPS


@pytest.fixture
async def jwks_server(certs: pki.CertPaths):
    """A real HTTPS JWKS endpoint on 127.0.0.1 serving ``certs/jwks.json`` as it is on disk."""
    state: dict[str, Any] = {"hits": 0, "status": 200, "gate": None}

    async def handler(_request: web.Request) -> web.Response:
        state["hits"] += 1
        if state["gate"] is not None:  # an asyncio.Event: hold the answer until the test releases it
            await state["gate"].wait()
        if state["status"] != 200:
            return web.Response(status=state["status"])
        return web.Response(body=certs.jwks.read_bytes(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.envoy_cert, certs.envoy_key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    source = JwksUrl(f"https://localhost:{port}/.well-known/jwks.json", timeout=5, ssl_context=client_ctx)
    yield source, state
    await runner.cleanup()


async def test_jwks_url_unknown_kid_refreshes_in_the_background(
    certs: pki.CertPaths, clock: Clock, jwks_server: tuple[JwksUrl, dict]
) -> None:
    source, state = jwks_server
    keys = KeySet(source, clock=clock, load=False)
    assert await keys.refresh_async(force=True) and state["hits"] == 1
    verifier = TokenVerifier(keys, ISSUER, AUDIENCE, ["ES256"], clock=clock)
    assert verifier.verify("Bearer " + token(certs, clock))["sub"] == "alice"

    pki.rotate_jwt_key(certs.dir)
    new = "Bearer " + token(certs, clock, sub="bob")
    clock.now += 31
    gate = state["gate"] = asyncio.Event()  # the IdP answers only when the test says so
    refused(verifier, new)  # answered at once: the fetch is not on the request path
    refused(verifier, new)  # a second miss does not start a second fetch
    for _ in range(500):  # let the one background fetch reach the server (generous for a busy CI)
        if state["hits"] == 2:
            break
        await asyncio.sleep(0.01)
    assert state["hits"] == 2 and keys.refreshes == 2 and not gate.is_set()
    refused(verifier, new)  # the fetch is in flight and held: requests are still answered, not parked
    gate.set()
    await keys.wait_pending()
    assert state["hits"] == 2 and keys.refreshes == 2  # one fetch for three misses
    assert verifier.verify(new)["sub"] == "bob"

    state["status"] = 503
    clock.now += 31
    assert not await keys.refresh_async()
    assert keys.refresh_failures == 1 and len(keys.kids) == 2


async def test_jwks_url_sync_fetch_for_start_up(jwks_server: tuple[JwksUrl, dict], certs: pki.CertPaths) -> None:
    source, _ = jwks_server
    keys = await asyncio.to_thread(KeySet, source)
    assert keys.kids == {json.loads(certs.jwks.read_text())["keys"][0]["kid"]}


async def test_jwks_url_refuses_an_untrusted_server(
    jwks_server: tuple[JwksUrl, dict], tmp_path: Path, clock: Clock
) -> None:
    source, _ = jwks_server
    other = pki.init_certs(tmp_path / "other", clients=[])
    untrusting = JwksUrl(source.url, ssl_context=ssl.create_default_context(cafile=str(other.ca_cert)))
    keys = KeySet(untrusting, clock=clock, load=False)
    assert not await keys.refresh_async(force=True)
    assert keys.refresh_failures == 1 and keys.kids == frozenset()


def test_jwks_url_must_be_https() -> None:
    with pytest.raises(ValueError, match="https"):
        JwksUrl("http://127.0.0.1/jwks.json")


# ---------------------------------------------------------------------------------- identities

TD = "cohortgate.local"


@pytest.mark.parametrize(
    ("value", "trust_domain", "expected"),
    [
        ("spiffe://cohortgate.local/app-demo", None, "spiffe://cohortgate.local/app-demo"),
        ("spiffe://cohortgate.local/app-demo", TD, "spiffe://cohortgate.local/app-demo"),
        ("spiffe://cohortgate.local/ns/prod/sa/web", TD, "spiffe://cohortgate.local/ns/prod/sa/web"),
        ("spiffe://cohortgate.local/app-demo", "other.local", None),
        ("spiffe://evil.local/app-demo", TD, None),
        ("spiffe://cohortgate.local", None, None),
        ("spiffe://cohortgate.local/", None, None),
        ("spiffe://cohortgate.local/a//b", None, None),
        ("spiffe://cohortgate.local/a/../b", None, None),
        ("spiffe://cohortgate.local/./b", None, None),
        ("spiffe://cohortgate.local/a?x=1", None, None),
        ("spiffe://cohortgate.local/a#f", None, None),
        ("spiffe://cohortgate.local:443/a", None, None),
        ("spiffe://user@cohortgate.local/a", None, None),
        ("spiffe://Cohortgate.local/a", None, None),
        ("SPIFFE://cohortgate.local/a", None, None),
        ("https://cohortgate.local/a", None, None),
        ("spiffe://cohortgate.local/a b", None, None),
        ("spiffe://cohortgate.local/a\n", None, None),
        ("spiffe://cohortgate.local/" + "a" * 2100, None, None),
        ("", None, None),
        (None, None, None),
        (["spiffe://cohortgate.local/a"], None, None),
    ],
)
def test_identity_from_attributes(value: Any, trust_domain: str | None, expected: str | None) -> None:
    assert identity_from_attributes({URI_SAN_ATTRIBUTE: value}, trust_domain) == expected


def test_identity_needs_the_uri_san_attribute_and_mtls() -> None:
    uri = "spiffe://cohortgate.local/app-demo"
    assert identity_from_attributes(None) is None
    assert identity_from_attributes({}) is None
    assert identity_from_attributes({"connection.subject_peer_certificate": "CN=app-demo"}) is None
    assert identity_from_attributes({URI_SAN_ATTRIBUTE: uri, MTLS_ATTRIBUTE: True}) == uri
    assert identity_from_attributes({URI_SAN_ATTRIBUTE: uri, MTLS_ATTRIBUTE: False}) is None


@given(st.text())
def test_identity_is_none_or_a_parseable_spiffe_id(value: str) -> None:
    identity = identity_from_attributes({URI_SAN_ATTRIBUTE: value})
    assert identity is None or (identity == value and parse_spiffe_id(value) is not None)


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"scope": "predict  admin"}, {"predict", "admin"}),
        ({"scp": ["predict", "admin", 3, ""]}, {"predict", "admin"}),
        ({"scp": ("predict",)}, {"predict"}),
        ({"scp": "a b"}, {"a", "b"}),
        ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
        ({"scope": 7}, set()),
        ({}, set()),
    ],
)
def test_scopes_of(claims: dict[str, Any], expected: set[str]) -> None:
    assert scopes_of(claims) == frozenset(expected)
