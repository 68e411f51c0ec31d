"""`cohortgate policy ...` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = str(Path(__file__).resolve().parents[2] / "policies" / "example.yaml")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohortgate.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_validate_ok_prints_a_summary():
    out = run("policy", "validate", EXAMPLE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{EXAMPLE}: ok: 4 routes, 7 variants, 1 shadows, 9 backends")


def test_validate_bad_file_exits_1_with_positions(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = Path(EXAMPLE).read_text()
    bad.write_text(text.replace("weight: 90", "weight: 80").replace("canary: canary", "canary: ghost"))
    out = run("policy", "validate", EXAMPLE, str(bad))
    assert out.returncode == 1
    assert "ok" in out.stdout
    # the problems, each at its position (warnings about the example's model files, unbuilt in a fresh
    # clone, are not problems of the bad file)
    lines = [line for line in out.stderr.strip().splitlines() if ": warning: " not in line]
    assert lines and all(line.startswith(f"{bad}:") for line in lines)
    assert any("sum to 90, not 100" in line for line in lines)
    assert any("unknown variant 'ghost'" in line for line in lines)


def test_explain_text_and_json():
    args = ["policy", "explain", EXAMPLE, "--path", "/v2/models/tabular/infer", "--sub", "alice",
            "--residency", "eu", "--scope", "predict", "--identity", "spiffe://cohortgate.local/app-demo"]
    text = run(*args)
    assert text.returncode == 0, text.stderr
    assert "bucket 6004 of 10000" in text.stdout and "=> allow: route tabular, variant control" in text.stdout
    js = json.loads(run(*args, "--json").stdout)
    assert js["allowed"] and js["bucket"] == 6004 and js["variant"] == "control" and js["region"] == "eu"


def test_explain_denial_shows_code_and_status():
    out = run("policy", "explain", EXAMPLE, "--path", "/v2/models/tabular/infer", "--no-token", "--json")
    js = json.loads(out.stdout)
    assert (js["status"], js["error"]["code"]) == (401, "unauthenticated")


def test_explain_rejects_malformed_pairs():
    out = run("policy", "explain", EXAMPLE, "--path", "/x", "--claim", "novalue")
    assert out.returncode != 0 and "KEY=VALUE" in out.stderr


def test_schema_documents_every_field():
    schema = json.loads(run("policy", "schema").stdout)
    route = schema["$defs"]["Route"]["properties"]
    assert {"match", "auth", "cohorts", "residency", "variants", "shadows", "guardrails", "rollout"} <= set(route)
    assert schema["$defs"]["Residency"]["properties"]["on_missing_region"]["description"]


def _explain_device(header: str) -> dict:
    out = run("policy", "explain", EXAMPLE, "--path", "/v2/models/tabular/infer", "--sub", "u7",
              "--residency", "eu", "--scope", "predict", "--identity", "spiffe://cohortgate.local/app-demo",
              "--header", header, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_explain_reads_headers_as_call_does():
    """One header syntax: NAME:VALUE as in `call` and curl; NAME=VALUE means the same."""
    pinned = _explain_device("x-device:phone")  # eligible: u7 buckets into the canary
    assert pinned["variant"] == "canary"
    for spelling in ("x-device:bot", "x-device=bot", "X-Device: bot"):
        assert _explain_device(spelling)["variant"] == "control", spelling  # ineligible: always control
    bad = run("policy", "explain", EXAMPLE, "--path", "/x", "--header", "no-separator")
    assert bad.returncode == 2 and "NAME:VALUE" in bad.stderr


def _validate_text(tmp_path: Path, text: str) -> list[str]:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = run("policy", "validate", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix(f"{bad}:").split(": YAML syntax error: ")


def test_yaml_tab_is_explained_with_its_line(tmp_path):
    text = Path(EXAMPLE).read_text().replace("  audience: cohortgate", "\taudience: cohortgate")
    line = 1 + Path(EXAMPLE).read_text().splitlines().index("  audience: cohortgate")
    where, said = _validate_text(tmp_path, text)
    assert where == f"{line}:1"
    assert said.startswith(f"line {line} is indented with a tab; YAML indents with spaces only")


def test_yaml_bad_indent_is_explained_with_its_line(tmp_path):
    lines = Path(EXAMPLE).read_text().splitlines()
    n = lines.index("  audience: cohortgate")
    lines[n] = " audience: cohortgate"  # one space short of its siblings
    where, said = _validate_text(tmp_path, "\n".join(lines) + "\n")
    assert where.startswith(f"{n + 1}:")
    assert said.startswith(f"line {n + 1} is not indented like the keys above it")
    lines[n] = "   audience: cohortgate"  # one space too deep
    where, said = _validate_text(tmp_path, "\n".join(lines) + "\n")
    assert where.startswith(f"{n + 1}:") and "indented deeper than the key above it" in said


def test_yaml_unclosed_flow_and_quote_name_where_they_opened(tmp_path):
    _where, said = _validate_text(tmp_path, "jwt: {issuer: x\nroutes: []\n")
    assert said.startswith("a [...] or {...} opened on line 1 is not closed")
    _where, said = _validate_text(tmp_path, 'jwt:\n  issuer: "x\n')
    assert said.startswith("a quoted string opened on line 2 is never closed")


def test_validate_warns_about_a_missing_model_file(tmp_path):
    text = Path(EXAMPLE).read_text().replace("../models/tabular-canary.onnx", "../models/nope-canary.onnx")
    policy = tmp_path / "policies" / "p.yaml"
    policy.parent.mkdir()
    policy.write_text(text.replace("../certs/", f"{Path(EXAMPLE).parents[1]}/certs/"))
    out = run("policy", "validate", str(policy))
    assert out.returncode == 0, out.stderr  # a valid file: a warning, not a failure
    warnings = out.stderr.strip().splitlines()
    # the canary's file (on tabular and shop), plus the other demo files not built in tmp_path (per backend)
    assert len(warnings) == 2 + 5
    assert f"{policy}: warning: route tabular variant canary: model file {tmp_path}/models/nope-canary.onnx" \
        " is missing" in out.stderr
