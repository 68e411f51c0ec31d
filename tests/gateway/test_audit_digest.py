"""Provenance in the audit trail: each allowed decision's line names the model digest of the backend it
routed to (pinned references, local files, store versions), denials name none, a policy edit that swaps
the model changes the next line's digest, and the local file is hashed at compile time, not per request."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from cohortgate.core import policy as policy_module
from cohortgate.core.policy import Policy, load_policy, routed_digest
from cohortgate.deploy import pki
from gateway.audit import FIELDS, AuditLog
from gateway.extproc import Processor, ProcessorSettings, hash_unit
from gateway.service import PolicyHolder, build_verifier
from sidecar import repository, sealing
from tests.gateway.test_extproc import SALT, infer, request, token

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
routes:
  - name: tabular
    match: {{model: tabular}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
    cohorts:
      unit: {{claim: sub}}
      salt: tabular-test
      overrides: {{qa-canary: canary}}
    residency:
      source: {{claim: residency}}
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "http://127.0.0.1:18101", region: eu, model: "{control}"}}
      - name: canary
        weight: 0
        backends:
          - {{url: "http://127.0.0.1:18103", region: eu, model: "{canary}"}}
"""

PIN = "ab" * 32


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("digest") / "certs", clients=())


def write_policy(path: Path, certs: pki.CertPaths, control: str, canary: str) -> Path:
    path.write_text(POLICY.format(jwks=certs.jwks, control=control, canary=canary))
    return path


def lines_of(
    policy: Policy | PolicyHolder, certs: pki.CertPaths, *subs: str, ecs: bool = False
) -> list[dict[str, Any]]:
    """The audit lines of one request per ``sub`` (``-`` sends no token: a denial)."""
    holder = policy if isinstance(policy, PolicyHolder) else PolicyHolder(policy)
    sink = io.BytesIO()
    audit = AuditLog(sink, lambda s: hash_unit(SALT, s), log_format="ecs" if ecs else "json")
    engine = Processor(holder, build_verifier(holder.policy.jwt), ProcessorSettings(SALT), audit)
    for sub in subs:
        auth = None if sub == "-" else "Bearer " + token(certs, sub)
        engine.handle_proto(request(infer(auth)))
    audit.flush()
    audit.close()
    return [orjson.loads(line) for line in sink.getvalue().splitlines()]


def test_a_pinned_reference_puts_its_digest_in_the_line_and_a_denial_none(tmp_path: Path, certs: pki.CertPaths) -> None:
    model = (tmp_path / "plain.onnx").as_posix()
    policy = load_policy(write_policy(tmp_path / "p.yaml", certs, f"file://{model}@sha256:{PIN.upper()}", model))
    allow, canary, deny = lines_of(policy, certs, "user-1", "qa-canary", "-")
    assert allow["outcome"] == "allow" and allow["variant"] == "control"
    assert allow["model_digest"] == f"sha256:{PIN}"  # the pin, lower-cased as the sidecar writes it
    assert canary["variant"] == "canary" and "model_digest" not in canary  # the file does not exist: unknown
    assert deny["outcome"] == "deny" and "model_digest" not in deny and set(deny) == set(FIELDS)


def test_a_local_file_is_hashed_and_the_ecs_document_carries_it(tmp_path: Path, certs: pki.CertPaths) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "v1.onnx").write_bytes(b"model one")
    (tmp_path / "m" / "v2.onnx").write_bytes(b"model two")
    policy = load_policy(write_policy(tmp_path / "p.yaml", certs, "m/v1.onnx", "m/v2.onnx"))
    expected = "sha256:" + hashlib.sha256(b"model one").hexdigest()  # what the sidecar's header says
    (line,) = lines_of(policy, certs, "user-1")
    assert line["model_digest"] == expected
    (line,) = lines_of(policy, certs, "qa-canary")
    assert line["model_digest"] == "sha256:" + hashlib.sha256(b"model two").hexdigest()
    (doc,) = lines_of(policy, certs, "user-1", ecs=True)
    assert doc["cohortgate"]["model"] == {"digest": expected}


def test_store_versions_and_sealed_files(tmp_path: Path, certs: pki.CertPaths) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    v1 = repository.push(store, "adder", "1", b"the plain model bytes")
    unpinned = v1.reference.rpartition("@")[0]  # file:///…/adder/1: the manifest names the digest
    assert routed_digest(unpinned) == v1.digest == "sha256:" + hashlib.sha256(b"the plain model bytes").hexdigest()
    assert routed_digest(v1.reference) == v1.digest
    kek = sealing.load_kek(f"file:{_kek(tmp_path)}")
    repository.seal(store, "adder", "1", kek)
    assert routed_digest(unpinned) == v1.digest  # sealing keeps the manifest: the plain model's digest
    sealed = tmp_path / "sealed.onnx"
    sealed.write_bytes(sealing.seal(b"the plain model bytes", kek))
    assert routed_digest(str(sealed)) is None  # the file's own hash is not the model's: unknown, never wrong
    assert routed_digest("https://models.example/adder/3") is None  # remote and unpinned: not fetched
    assert routed_digest(f"s3://bucket/adder/3@sha256:{PIN}") == f"sha256:{PIN}"


def _kek(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    path.write_bytes(sealing.new_kek())
    return path


def test_a_policy_edit_that_swaps_the_model_changes_the_next_line(tmp_path: Path, certs: pki.CertPaths) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    v1 = repository.push(store, "adder", "1", b"version one")
    v2 = repository.push(store, "adder", "2", b"version two")
    path = write_policy(tmp_path / "p.yaml", certs, v1.reference, v1.reference)
    holder = PolicyHolder(load_policy(path), path)
    (before,) = lines_of(holder, certs, "user-1")
    write_policy(path, certs, v2.reference, v1.reference)  # the live swap: control now serves version 2
    assert holder.reload()
    (after,) = lines_of(holder, certs, "user-1")
    assert (before["model_digest"], after["model_digest"]) == (v1.digest, v2.digest)


def test_a_local_file_is_hashed_once_per_version_at_compile_time(
    tmp_path: Path, certs: pki.CertPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = policy_module._hash_file
    monkeypatch.setattr(policy_module, "_hash_file", lambda p: hashed.append(p) or real(p))
    model = tmp_path / "m.onnx"
    model.write_bytes(b"first")
    path = write_policy(tmp_path / "p.yaml", certs, "m.onnx", "m.onnx")
    first = load_policy(path)
    lines_of(first, certs, *[f"user-{i}" for i in range(20)])
    assert load_policy(path).model_digests == first.model_digests
    assert hashed == [model]  # two compiles and 20 requests: one read of the file
    model.write_bytes(b"second, replaced in place")
    os.utime(model, ns=(1, 1))  # a different mtime even on a coarse clock
    replaced = load_policy(path)  # same policy text: the compiled route is reused, its digest is not
    assert replaced.model_digests["cg.tabular.control.0"] == "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    assert hashed == [model, model]
