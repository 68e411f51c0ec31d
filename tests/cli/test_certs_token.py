"""`cohortgate certs` and `cohortgate token`, driven through the real CLI entry point."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import jwt
import pytest
import yaml

from cohortgate.cli import main
from cohortgate.cli.token import parse_claim
from cohortgate.core.errors import RequestDenied
from cohortgate.deploy import pki
from cohortgate.support.durations import duration_arg
from gateway.auth import TokenVerifier, scopes_of
from gateway.jwks import JwksFile, KeySet

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"


def verifier_for(certs: Path, **kwargs: object) -> TokenVerifier:
    jwt_policy = yaml.safe_load(EXAMPLE_POLICY.read_text())["jwt"]
    return TokenVerifier(
        KeySet(JwksFile(certs / "jwks.json"), min_refresh_interval_s=0),
        kwargs.pop("issuer", jwt_policy["issuer"]),  # type: ignore[arg-type]
        kwargs.pop("audience", jwt_policy["audience"]),  # type: ignore[arg-type]
        jwt_policy["algorithms"],
    )


@pytest.fixture
def certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory)]) == 0
    capsys.readouterr()
    return directory


def test_certs_init_writes_everything_and_lists_the_identities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    for name in ("ca.key", "envoy.crt", "processor.crt", "envoy-client.key", "jwks.json", "jwt-signing.key"):
        assert f"wrote {directory / name}" in out
    assert "client app-demo: spiffe://cohortgate.local/app-demo" in out
    assert "client qa: spiffe://cohortgate.local/qa" in out
    for key in directory.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_certs_init_twice_keeps_everything(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    assert main(["certs", "init", "--dir", str(certs)]) == 0
    out = capsys.readouterr().out
    assert "wrote" not in out and "everything already present" in out
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == before


def test_certs_init_force_regenerates(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = (certs / "ca.crt").read_bytes()
    assert main(["certs", "init", "--dir", str(certs), "--force"]) == 0
    assert (certs / "ca.crt").read_bytes() != ca
    assert f"wrote {certs / 'ca.crt'}" in capsys.readouterr().out


def test_certs_init_with_clients_and_trust_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "c"
    argv = ["certs", "init", "--dir", str(directory), "--trust-domain", "example.org"]
    assert main([*argv, "--client", "app-a", "--client", "app-b"]) == 0
    assert set(pki.load_cert_paths(directory).clients) == {"app-a", "app-b"}
    assert "client app-a: spiffe://example.org/app-a" in capsys.readouterr().out


def test_certs_init_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path / "c"), "--client", "../evil"]) == 2
    assert "client name '../evil' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "evil.key").exists()
    assert main(["certs", "init", "--dir", str(tmp_path / "d")]) == 0
    assert main(["certs", "init", "--dir", str(tmp_path / "d"), "--trust-domain", "other.td"]) == 2
    assert "use --force" in capsys.readouterr().err


def test_token_verifies_against_the_example_policy_settings(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--certs", str(certs), "--sub", "alice", "--residency", "eu"]
    argv += ["--scope", "predict", "--scope", "admin", "--claim", "tier=gold", "--claim", "n=3", "--ttl", "15m"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    token = out.strip()
    assert out == token + "\n" and token.count(".") == 2
    header = jwt.get_unverified_header(token)
    jwks = json.loads((certs / "jwks.json").read_text())
    assert header["alg"] == "ES256" and header["kid"] == jwks["keys"][0]["kid"]

    claims = verifier_for(certs).verify(f"Bearer {token}")
    assert (claims["sub"], claims["residency"], claims["tier"], claims["n"]) == ("alice", "eu", "gold", 3)
    assert scopes_of(claims) == {"predict", "admin"}
    assert claims["exp"] - claims["iat"] == 900


def test_token_issuer_and_audience_flags(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--certs", str(certs), "--sub", "u", "--issuer", "https://other", "--audience", "x"]
    assert main(argv) == 0
    token = capsys.readouterr().out.strip()
    with pytest.raises(RequestDenied, match="trusted issuer"):
        verifier_for(certs).verify(f"Bearer {token}")
    claims = verifier_for(certs, issuer="https://other", audience="x").verify(f"Bearer {token}")
    assert claims["sub"] == "u"


def test_token_after_rotate_jwt_uses_the_new_key(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verifier = verifier_for(certs)
    assert main(["token", "--certs", str(certs), "--sub", "before"]) == 0
    before = capsys.readouterr().out.strip()
    verifier.verify(f"Bearer {before}")
    assert main(["certs", "rotate-jwt", "--dir", str(certs)]) == 0
    assert "new signing key" in capsys.readouterr().out
    assert main(["token", "--certs", str(certs), "--sub", "after"]) == 0
    after = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
    assert verifier.verify(f"Bearer {after}")["sub"] == "after"  # unknown kid -> refresh
    verifier.clear_cache()
    assert verifier.verify(f"Bearer {before}")["sub"] == "before"


def test_token_without_certs_says_how_to_make_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--certs", str(tmp_path / "none"), "--sub", "x"]) == 2
    assert "cohortgate certs init" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra", [["--ttl", "0"], ["--ttl", "15x"], ["--ttl=-0"], ["--ttl=--5m"], ["--claim", "novalue"], ["--claim", "=v"]]
)
def test_token_bad_arguments_are_usage_errors(
    certs: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "--certs", str(certs), "--sub", "x", *extra])
    assert info.value.code == 2
    assert "invalid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "ago"), [(["--expired"], 900), (["--expired", "--ttl", "2m"], 120), (["--ttl=-5m"], 300)]
)
def test_expired_tokens_for_tests_are_refused_as_expired(
    certs: Path, capsys: pytest.CaptureFixture[str], extra: list[str], ago: int
) -> None:
    assert main(["token", "--certs", str(certs), "--sub", "late", *extra]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == ago  # the lifetime is kept, only moved into the past
    assert claims["nbf"] <= claims["exp"]
    with pytest.raises(RequestDenied, match="expired"):
        verifier_for(certs).verify(f"Bearer {token}")


def test_token_requires_sub(certs: Path) -> None:
    with pytest.raises(SystemExit):
        main(["token", "--certs", str(certs)])


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1.5m", 90), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration_arg(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "0", "0s", "15x", "1e3", "15 m", "١٥m"])
def test_durations_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration_arg(text)


def test_parse_claim_reads_json_values_else_strings() -> None:
    assert parse_claim("tier=gold") == ("tier", "gold")
    assert parse_claim("n=3") == ("n", 3)
    assert parse_claim("flag=true") == ("flag", True)
    assert parse_claim('groups=["a","b"]') == ("groups", ["a", "b"])
    assert parse_claim("zip=01234") == ("zip", "01234")
    assert parse_claim("eq=a=b") == ("eq", "a=b")
