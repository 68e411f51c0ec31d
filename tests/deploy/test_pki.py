"""The local PKI: files, modes, idempotency, SANs, chains (webpki policy) and real TLS handshakes."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cohortgate.deploy import pki
from gateway.auth import URI_SAN_ATTRIBUTE, identity_from_attributes


@pytest.fixture
def certs(tmp_path: Path) -> pki.CertPaths:
    return pki.init_certs(tmp_path / "certs")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path: Path) -> x509.SubjectAlternativeName:
    return _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _all_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _store(certs: pki.CertPaths) -> Store:
    return Store([_cert(certs.ca_cert)])


# ------------------------------------------------------------------------------------ the files


def test_init_creates_every_piece_with_private_keys_0600(certs: pki.CertPaths) -> None:
    keys = [certs.ca_key, certs.envoy_key, certs.processor_key, certs.envoy_client_key, certs.jwt_key]
    keys += [key for _, key in certs.clients.values()]
    assert set(certs.clients) == {"app-demo", "qa"}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for cert in [certs.ca_cert, certs.envoy_cert, certs.processor_cert, certs.envoy_client_cert]:
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert pki.load_cert_paths(certs.dir) == certs
    assert not list(certs.dir.rglob(".*.tmp")), "temporary files left behind"


def test_cert_paths_are_frozen(certs: pki.CertPaths) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        certs.ca_cert = Path("elsewhere")  # type: ignore[misc]
    with pytest.raises(TypeError):
        certs.clients["evil"] = (Path("a"), Path("b"))  # type: ignore[index]


def test_init_is_idempotent(certs: pki.CertPaths) -> None:
    before = _all_files(certs.dir)
    written: list[Path] = []
    again = pki.init_certs(certs.dir, on_write=written.append)
    assert written == []
    assert again == certs
    assert _all_files(certs.dir) == before


def test_force_regenerates_everything(certs: pki.CertPaths) -> None:
    before = _all_files(certs.dir)
    pki.init_certs(certs.dir, force=True)
    after = _all_files(certs.dir)
    assert before.keys() == after.keys()
    assert all(before[name] != after[name] for name in before), "some file was kept under --force"
    assert len(json.loads(certs.jwks.read_text())["keys"]) == 1  # --force starts a fresh JWKS


def test_a_missing_piece_is_filled_in_and_the_rest_kept(certs: pki.CertPaths) -> None:
    before = _all_files(certs.dir)
    certs.clients["qa"][1].unlink()
    written: list[Path] = []
    pki.init_certs(certs.dir, clients=["app-demo", "qa", "new-app"], on_write=written.append)
    assert {p.name for p in written} == {"qa.crt", "qa.key", "new-app.crt", "new-app.key"}
    after = _all_files(certs.dir)
    for name, data in before.items():
        if not name.startswith("clients/qa."):
            assert after[name] == data, name
    verify_client(certs, certs.dir / "clients" / "new-app.crt")


def test_a_missing_ca_reissues_everything_it_signed(certs: pki.CertPaths) -> None:
    old_envoy = certs.envoy_cert.read_bytes()
    certs.ca_key.unlink()
    pki.init_certs(certs.dir, clients=["app-demo"])
    assert certs.envoy_cert.read_bytes() != old_envoy
    for name, (cert, _) in certs.clients.items():  # qa was not asked for, yet is re-issued too
        verify_client(certs, cert)
        assert name in pki.load_cert_paths(certs.dir).clients


def test_a_missing_jwt_key_is_added_to_the_jwks_without_dropping_the_old_one(certs: pki.CertPaths) -> None:
    old_kid = json.loads(certs.jwks.read_text())["keys"][0]["kid"]
    certs.jwt_key.unlink()
    pki.init_certs(certs.dir)
    kids = [k["kid"] for k in json.loads(certs.jwks.read_text())["keys"]]
    assert len(kids) == 2 and kids[1] == old_kid and kids[0] != old_kid


def test_another_trust_domain_is_refused_unless_forced(certs: pki.CertPaths) -> None:
    with pytest.raises(ValueError, match=r"trust domain 'cohortgate\.local'"):
        pki.init_certs(certs.dir, trust_domain="example.org")
    forced = pki.init_certs(certs.dir, trust_domain="example.org", force=True)
    assert forced.trust_domain == "example.org"
    assert "spiffe://example.org/app-demo" in _sans(forced.clients["app-demo"][0]).get_values_for_type(
        x509.UniformResourceIdentifier
    )


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "..", "x" * 65, "sp ace", "ünï", "app\n"])
def test_invalid_client_names_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="client name"):
        pki.init_certs(tmp_path / "c", clients=[name])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("domain", ["", "UPPER.case", "has space", "td:443", ".leading", "a/b", "td\n"])
def test_invalid_trust_domains_are_refused(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        pki.init_certs(tmp_path / "c", trust_domain=domain)


def test_load_cert_paths_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.crt is missing; run `cohortgate certs init"):
        pki.load_cert_paths(tmp_path)


# ------------------------------------------------------------------------------------ contents


def test_sans_and_spiffe_ids(certs: pki.CertPaths) -> None:
    envoy = _sans(certs.envoy_cert)
    assert envoy.get_values_for_type(x509.DNSName) == ["localhost"]
    assert envoy.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert envoy.get_values_for_type(x509.UniformResourceIdentifier) == []

    processor = _sans(certs.processor_cert)
    assert processor.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cohortgate.local/gateway"]
    assert processor.get_values_for_type(x509.DNSName) == ["localhost"]
    assert _sans(certs.envoy_client_cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cohortgate.local/envoy"
    ]
    for name, (cert, _) in certs.clients.items():
        assert _sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://cohortgate.local/{name}"]


def test_key_usages(certs: pki.CertPaths) -> None:
    def eku(path: Path) -> set[x509.ObjectIdentifier]:
        return set(_cert(path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert eku(certs.envoy_cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert eku(certs.processor_cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert eku(certs.envoy_client_cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert eku(certs.clients["app-demo"][0]) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    ca = _cert(certs.ca_cert).extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca.critical and ca.value.ca and ca.value.path_length == 0


def verify_client(certs: pki.CertPaths, cert: Path) -> list[str]:
    verified = PolicyBuilder().store(_store(certs)).build_client_verifier().verify(_cert(cert), [])
    assert verified.chain[-1] == _cert(certs.ca_cert)
    return [
        uri for san in verified.subjects or [] if isinstance(san, x509.UniformResourceIdentifier) for uri in [san.value]
    ]


def test_chains_verify_under_the_webpki_policy(certs: pki.CertPaths) -> None:
    builder = PolicyBuilder().store(_store(certs))
    for subject in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        for server in (certs.envoy_cert, certs.processor_cert):
            chain = builder.build_server_verifier(subject).verify(_cert(server), [])
            assert chain[0] == _cert(server) and chain[-1] == _cert(certs.ca_cert)
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("example.com")).verify(_cert(certs.envoy_cert), [])
    assert verify_client(certs, certs.envoy_client_cert) == ["spiffe://cohortgate.local/envoy"]
    assert verify_client(certs, certs.clients["app-demo"][0]) == ["spiffe://cohortgate.local/app-demo"]


def test_a_client_certificate_is_not_a_server_certificate(certs: pki.CertPaths) -> None:
    verifier = PolicyBuilder().store(_store(certs)).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        verifier.verify(_cert(certs.clients["app-demo"][0]), [])


def test_a_foreign_client_claims_our_identity_but_does_not_chain(certs: pki.CertPaths) -> None:
    foreign = pki.mint_foreign_client(certs.dir)
    assert _sans(foreign.cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cohortgate.local/app-demo"
    ]
    assert stat.S_IMODE(foreign.key.stat().st_mode) == 0o600
    with pytest.raises(VerificationError):
        verify_client(certs, foreign.cert)
    assert "app-demo" in pki.load_cert_paths(certs.dir).clients  # foreign/ is not a client


# --------------------------------------------------------------------------------------- JWKS


def test_jwks_is_public_with_an_rfc7638_kid(certs: pki.CertPaths) -> None:
    (jwk,) = json.loads(certs.jwks.read_text())["keys"]
    assert jwk.keys() == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert jwk["kid"] == pki.jwk_thumbprint(jwk)


def test_thumbprint_matches_the_rfc7638_example() -> None:
    # RFC 7638, section 3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKR"
        "XjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAt"
        "aSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPk"
        "sINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert pki.jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rotation_publishes_the_new_key_first_and_keeps_the_previous(certs: pki.CertPaths) -> None:
    first = json.loads(certs.jwks.read_text())["keys"][0]["kid"]
    second = pki.rotate_jwt_key(certs.dir)
    third = pki.rotate_jwt_key(certs.dir)
    kids = [k["kid"] for k in json.loads(certs.jwks.read_text())["keys"]]
    assert kids == [third, second]  # keep=2: the oldest one is gone
    assert first not in kids
    assert pki.public_jwk(pki._load_key(certs.jwt_key))["kid"] == third
    assert stat.S_IMODE(certs.jwt_key.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------- real TLS handshakes


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> dict:
    """One TLS connection over 127.0.0.1; what each side saw."""
    result: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            result["server_error"] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            result["client_read"] = tls.recv(2)  # TLS 1.3: a refused client cert shows up here
    except (ssl.SSLError, OSError) as exc:
        result["client_error"] = exc
    thread.join(5)
    assert not thread.is_alive()
    return result


def _server_ctx(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _peer_uri(peer: dict) -> str:
    (uri,) = [value for kind, value in peer["subjectAltName"] if kind == "URI"]
    return uri


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_envoy_listener_accepts_a_client_signed_by_the_ca(certs: pki.CertPaths, hostname: str) -> None:
    cert, key = certs.clients["app-demo"]
    seen = _handshake(
        _server_ctx(certs.envoy_cert, certs.envoy_key, certs.ca_cert),
        _client_ctx(certs.ca_cert, cert, key),
        hostname,
    )
    assert seen.get("client_read") == b"ok", seen
    uri = _peer_uri(seen["peer"])
    assert uri == "spiffe://cohortgate.local/app-demo"
    # What Envoy would report as an attribute is what the gateway accepts as the identity.
    assert identity_from_attributes({URI_SAN_ATTRIBUTE: uri}, "cohortgate.local") == uri


def test_envoy_listener_rejects_a_foreign_ca_client(certs: pki.CertPaths) -> None:
    foreign = pki.mint_foreign_client(certs.dir)
    seen = _handshake(
        _server_ctx(certs.envoy_cert, certs.envoy_key, certs.ca_cert),
        _client_ctx(certs.ca_cert, foreign.cert, foreign.key),
        "localhost",
    )
    assert "peer" not in seen and seen.get("client_read") != b"ok", seen
    assert isinstance(seen["server_error"], ssl.SSLError)
    assert "certificate verify failed" in str(seen["server_error"])


def test_envoy_listener_rejects_a_client_without_a_certificate(certs: pki.CertPaths) -> None:
    seen = _handshake(
        _server_ctx(certs.envoy_cert, certs.envoy_key, certs.ca_cert),
        _client_ctx(certs.ca_cert),
        "localhost",
    )
    assert "peer" not in seen and seen.get("client_read") != b"ok", seen
    assert "certificate" in str(seen["server_error"]).lower()


def test_client_refuses_a_server_from_another_ca(tmp_path: Path, certs: pki.CertPaths) -> None:
    other = pki.init_certs(tmp_path / "other", clients=[])
    cert, key = certs.clients["app-demo"]
    seen = _handshake(
        _server_ctx(other.envoy_cert, other.envoy_key, other.ca_cert),
        _client_ctx(certs.ca_cert, cert, key),
        "localhost",
    )
    assert "certificate verify failed" in str(seen["client_error"])


def test_envoy_to_processor_hop_is_mutual(certs: pki.CertPaths) -> None:
    seen = _handshake(
        _server_ctx(certs.processor_cert, certs.processor_key, certs.ca_cert),
        _client_ctx(certs.ca_cert, certs.envoy_client_cert, certs.envoy_client_key),
        "localhost",
    )
    assert seen.get("client_read") == b"ok", seen
    assert _peer_uri(seen["peer"]) == "spiffe://cohortgate.local/envoy"
