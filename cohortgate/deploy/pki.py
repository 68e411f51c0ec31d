"""A small local PKI: the CA, TLS certificates, and the JWT signing key with its JWKS.

Everything a local deployment needs to run the zero-trust path without an outside CA or identity
provider, minted with ``cryptography`` (EC P-256 throughout):

    certs/
      ca.crt  ca.key                        the CA every mTLS peer trusts
      envoy.crt  envoy.key                  Envoy's listener (DNS localhost, IP 127.0.0.1)
      processor.crt  processor.key          the ext_proc server (spiffe://TD/gateway, localhost)
      envoy-client.crt  envoy-client.key    Envoy's client cert on that hop (spiffe://TD/envoy)
      clients/NAME.crt  clients/NAME.key    one per app (spiffe://TD/NAME)
      jwt-signing.key                       the current ES256 signing key
      jwks.json                             public keys, newest first, with RFC 7638 ``kid``

Private keys are written 0600, atomically. Existing files are kept, so ``init`` is idempotent and
fills in only what is missing; a missing CA re-issues everything it signed. This is a developer
and test tool, not a production CA: the gateway itself only ever reads ``jwks.json``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cohortgate.support.files import write_atomic

DEFAULT_TRUST_DOMAIN = "cohortgate.local"
DEFAULT_CLIENTS = ("app-demo", "qa")
DEFAULT_ISSUER = "https://auth.cohortgate.local"
DEFAULT_AUDIENCE = "cohortgate"
JWT_ALGORITHM = "ES256"

_CA_DAYS = 3650
_LEAF_DAYS = 825
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between peers
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]{1,255}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

Writer = Callable[[Path], None]


@dataclasses.dataclass(frozen=True, slots=True)
class CertPaths:
    """Where every piece of the local PKI lives. ``clients`` maps NAME to ``(cert, key)``."""

    dir: Path
    trust_domain: str
    ca_cert: Path
    ca_key: Path
    envoy_cert: Path
    envoy_key: Path
    processor_cert: Path
    processor_key: Path
    envoy_client_cert: Path
    envoy_client_key: Path
    jwt_key: Path
    jwks: Path
    clients: Mapping[str, tuple[Path, Path]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", MappingProxyType(dict(self.clients)))

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class ForeignClient:
    """A client certificate from a CA the gateway does not trust (for negative tests)."""

    ca_cert: Path
    cert: Path
    key: Path


def _layout(directory: Path, trust_domain: str) -> CertPaths:
    d = directory
    return CertPaths(
        dir=d,
        trust_domain=trust_domain,
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        envoy_cert=d / "envoy.crt",
        envoy_key=d / "envoy.key",
        processor_cert=d / "processor.crt",
        processor_key=d / "processor.key",
        envoy_client_cert=d / "envoy-client.crt",
        envoy_client_key=d / "envoy-client.key",
        jwt_key=d / "jwt-signing.key",
        jwks=d / "jwks.json",
    )


def _client_pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / "clients" / f"{name}.crt", directory / "clients" / f"{name}.key"


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain) or trust_domain.strip(".") != trust_domain:
        raise ValueError(f"trust domain {trust_domain!r} is not valid: use lowercase letters, digits, '.', '-' and '_'")
    return trust_domain


def validate_client_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"client name {name!r} is not valid: use 1-64 letters, digits, '.', '-' and '_' "
            "(it becomes a SPIFFE path segment and a file name)"
        )
    return name


# ---------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode, dir_mode=0o700)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---------------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cohortgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    subject = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    sans: Iterable[x509.GeneralName],
    server: bool,
    client: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=_LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


_LOCALHOST_SANS = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def _uri(spiffe_id: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(spiffe_id)


def trust_domain_of(cert_path: Path) -> str | None:
    """The trust domain of the first SPIFFE URI SAN in a certificate, or None."""
    try:
        sans = _load_cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    for uri in sans.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://") :].split("/", 1)[0]
    return None


# ------------------------------------------------------------------------------------------- JWK


def public_jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The public JWK of an ES256 key, with ``kid`` (RFC 7638 thumbprint), ``alg`` and ``use``."""
    from jwt.algorithms import ECAlgorithm

    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    jwk = {k: v for k, v in jwk.items() if k in {"kty", "crv", "x", "y"}}
    return {**jwk, "kid": jwk_thumbprint(jwk), "alg": JWT_ALGORITHM, "use": "sig"}


_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, no whitespace, base64url unpadded."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"no thumbprint rule for key type {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _read_jwks(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    keys = data.get("keys") if isinstance(data, dict) else None
    return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []


def _write_jwks(path: Path, keys: list[dict[str, Any]]) -> None:
    _write_atomic(path, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), 0o644)


def _publish(path: Path, jwk: dict[str, Any], keep: int) -> None:
    """Put ``jwk`` first in the JWKS, keeping at most ``keep`` keys (older ones still verify)."""
    others = [k for k in _read_jwks(path) if k.get("kid") != jwk["kid"]]
    _write_jwks(path, [jwk, *others][: max(1, keep)])


# ---------------------------------------------------------------------------------------- public


def init_certs(
    dir: str | os.PathLike[str] = "certs",
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    clients: Iterable[str] = DEFAULT_CLIENTS,
    force: bool = False,
    *,
    on_write: Writer | None = None,
) -> CertPaths:
    """Mint whatever is missing in ``dir`` (everything, with ``force``) and return the paths.

    ``on_write`` is told each file written (the CLI prints them). Existing certificates made for
    another trust domain are an error unless ``force``: mixing two would fail at handshake time.
    """
    directory = Path(dir)
    validate_trust_domain(trust_domain)
    names = [validate_client_name(n) for n in clients]
    paths = _layout(directory, trust_domain)
    wrote = on_write or (lambda _p: None)

    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    if not force and paths.envoy_client_cert.exists():
        existing = trust_domain_of(paths.envoy_client_cert)
        if existing not in (None, trust_domain):
            raise ValueError(
                f"{directory} holds certificates for trust domain {existing!r}, not {trust_domain!r}; "
                "use --force to regenerate them"
            )

    def missing(*files: Path) -> bool:
        return force or not all(f.exists() for f in files)

    reissue_all = missing(paths.ca_cert, paths.ca_key)
    if reissue_all:
        ca_cert, ca_key = _make_ca(f"cohortgate CA ({trust_domain})")
        _write_key(paths.ca_key, ca_key)
        _write_cert(paths.ca_cert, ca_cert)
        wrote(paths.ca_key)
        wrote(paths.ca_cert)
    else:
        ca_cert, ca_key = _load_cert(paths.ca_cert), _load_key(paths.ca_key)

    leaves: list[tuple[Path, Path, str, tuple[x509.GeneralName, ...], bool, bool]] = [
        (paths.envoy_cert, paths.envoy_key, "envoy", _LOCALHOST_SANS, True, False),
        (
            paths.processor_cert,
            paths.processor_key,
            "cohortgate processor",
            (_uri(paths.spiffe_id("gateway")), *_LOCALHOST_SANS),
            True,
            False,
        ),
        (
            paths.envoy_client_cert,
            paths.envoy_client_key,
            "envoy client",
            (_uri(paths.spiffe_id("envoy")),),
            False,
            True,
        ),
    ]
    # Clients already in the directory are re-issued with the CA too, so none is left orphaned.
    all_names = dict.fromkeys([*names, *(_existing_clients(directory) if reissue_all else [])])
    for name in all_names:
        cert_path, key_path = _client_pair(directory, name)
        leaves.append((cert_path, key_path, name, (_uri(paths.spiffe_id(name)),), False, True))

    for cert_path, key_path, cn, sans, server, client in leaves:
        if reissue_all or missing(cert_path, key_path):
            cert, key = _make_leaf(ca_cert, ca_key, cn, sans=sans, server=server, client=client)
            _write_key(key_path, key)
            _write_cert(cert_path, cert)
            wrote(key_path)
            wrote(cert_path)

    if missing(paths.jwt_key):
        key = _new_key()
        # Publish before the key can sign anything, so verifiers never see an unknown kid from us.
        if force:
            _write_jwks(paths.jwks, [public_jwk(key)])
        else:
            _publish(paths.jwks, public_jwk(key), keep=2)
        _write_key(paths.jwt_key, key)
        wrote(paths.jwks)
        wrote(paths.jwt_key)
    else:
        jwk = public_jwk(_load_key(paths.jwt_key))
        if jwk["kid"] not in {k.get("kid") for k in _read_jwks(paths.jwks)}:
            _publish(paths.jwks, jwk, keep=2)
            wrote(paths.jwks)

    return load_cert_paths(directory)


def _existing_clients(directory: Path) -> list[str]:
    folder = directory / "clients"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.crt") if p.with_suffix(".key").exists())


def load_cert_paths(dir: str | os.PathLike[str] = "certs") -> CertPaths:
    """The paths of an initialised directory; FileNotFoundError names the first missing file."""
    directory = Path(dir)
    probe = _layout(directory, DEFAULT_TRUST_DOMAIN)
    required = [
        probe.ca_cert,
        probe.envoy_cert,
        probe.envoy_key,
        probe.processor_cert,
        probe.processor_key,
        probe.envoy_client_cert,
        probe.envoy_client_key,
        probe.jwt_key,
        probe.jwks,
    ]
    for path in required:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `cohortgate certs init --dir {directory}`")
    trust_domain = trust_domain_of(probe.envoy_client_cert) or DEFAULT_TRUST_DOMAIN
    clients = {name: _client_pair(directory, name) for name in _existing_clients(directory)}
    return dataclasses.replace(_layout(directory, trust_domain), clients=clients)


def rotate_jwt_key(dir: str | os.PathLike[str] = "certs", keep: int = 2) -> str:
    """Make a new signing key current; the JWKS keeps the ``keep`` newest keys. Returns the new kid.

    The JWKS is written first, so a verifier that refreshes on an unknown ``kid`` always finds it.
    """
    paths = load_cert_paths(dir)
    key = _new_key()
    jwk = public_jwk(key)
    _publish(paths.jwks, jwk, keep=keep)
    _write_key(paths.jwt_key, key)
    return str(jwk["kid"])


def mint_foreign_client(
    dir: str | os.PathLike[str], name: str = "app-demo", trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> ForeignClient:
    """A client certificate claiming ``spiffe://TD/NAME`` but signed by an unrelated CA.

    Written under ``DIR/foreign/``; a gateway that trusts only ``ca.crt`` must refuse it.
    """
    folder = Path(dir) / "foreign"
    ca_cert, ca_key = _make_ca(f"foreign CA ({trust_domain})")
    cert, key = _make_leaf(
        ca_cert,
        ca_key,
        validate_client_name(name),
        sans=(_uri(f"spiffe://{validate_trust_domain(trust_domain)}/{name}"),),
        server=False,
        client=True,
    )
    result = ForeignClient(folder / "ca.crt", folder / f"{name}.crt", folder / f"{name}.key")
    _write_cert(result.ca_cert, ca_cert)
    _write_cert(result.cert, cert)
    _write_key(result.key, key)
    return result


def mint_token(
    cert_paths: CertPaths,
    sub: str,
    residency: str | None = None,
    scopes: Iterable[str] = (),
    claims: Mapping[str, Any] | None = None,
    ttl_s: float = 900,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    *,
    now: float | None = None,
) -> str:
    """An ES256 JWT signed by the current signing key, ``kid`` set. ``claims`` override the rest."""
    import jwt

    key = _load_key(cert_paths.jwt_key)
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "jti": secrets.token_urlsafe(12),
    }
    if residency is not None:
        payload["residency"] = residency
    scope_list = list(scopes)
    if scope_list:
        payload["scope"] = " ".join(scope_list)
    payload.update(claims or {})
    return jwt.encode(payload, key, algorithm=JWT_ALGORITHM, headers={"kid": public_jwk(key)["kid"]})
