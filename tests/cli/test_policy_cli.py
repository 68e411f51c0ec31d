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
    assert out.stdout.startswith(f"{EXAMPLE}: ok: 2 routes, 3 variants, 1 shadows, 5 backends")


def test_validate_bad_file_exits_1_with_positions(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = Path(EXAMPLE).read_text()
    bad.write_text(text.replace("weight: 90", "weight: 80").replace("canary: canary", "canary: ghost"))
    out = run("policy", "validate", EXAMPLE, str(bad))
    assert out.returncode == 1
    assert "ok" in out.stdout
    lines = out.stderr.strip().splitlines()
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
