"""`policy diff` and `policy apply`: what a reviewer and an operator rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cohortgate.core.policy import load_policy, parse_policy
from cohortgate.core.policydiff import diff

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"
TEXT = EXAMPLE.read_text()


def reweighted(control: int, canary: int) -> str:
    return TEXT.replace("weight: 90", f"weight: {control}").replace("weight: 10\n", f"weight: {canary}\n")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cohortgate.cli", *args], capture_output=True, text=True, timeout=60)


def test_identical_policies_have_no_diff():
    assert diff(load_policy(EXAMPLE), load_policy(EXAMPLE)).empty


def test_weight_change_reports_the_measured_move():
    old = load_policy(EXAMPLE)
    new = parse_policy(reweighted(85, 15), base_dir=EXAMPLE.parent)
    result = diff(old, new)
    tabular = next(r for r in result.routes if r.name == "tabular")
    assert "variant canary: weight 10 -> 15" in tabular.changes
    assert [(a, b) for a, b, _ in tabular.moves] == [("control", "canary")]  # monotone: one direction only
    assert abs(tabular.moved_share - 0.05) < 0.005
    assert any("moves 5.0 % of users from control to canary" in line for line in result.lines())


def test_added_variant_removed_shadow_and_new_route():
    text = TEXT.replace(
        "    shadows:                     # mirrored copies; their answers never reach the client\n"
        "      - name: challenger\n        percent: 50\n        backends:\n"
        '          - {url: "http://127.0.0.1:18104", region: eu, model: ../models/tabular-challenger.onnx}\n',
        "",
    )
    assert text != TEXT
    result = diff(load_policy(EXAMPLE), parse_policy(text, base_dir=EXAMPLE.parent))
    assert "- shadow challenger" in next(r for r in result.routes if r.name == "tabular").changes


def test_cli_diff_and_apply(tmp_path):
    new = tmp_path / "new.yaml"
    new.write_text(reweighted(75, 25))
    out = run("policy", "diff", str(EXAMPLE), str(new))
    assert out.returncode == 0 and "moves 15.0 % of users from control to canary" in out.stdout

    live = tmp_path / "live.yaml"
    assert run("policy", "apply", str(new), "--to", str(live)).returncode == 0
    assert live.read_text() == new.read_text()

    bad = tmp_path / "bad.yaml"
    bad.write_text(reweighted(75, 30))
    out = run("policy", "apply", str(bad), "--to", str(live))
    assert out.returncode == 1 and "sum to 105" in out.stderr and "refused" in out.stderr
    assert live.read_text() == new.read_text(), "a bad file never replaces a good one"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".live")] == []


def test_a_jwks_path_change_names_only_that_field():
    """It used to say issuer/audience/algorithms/jwks changed when only the jwks path had."""
    text = TEXT.replace("jwks: ../certs/jwks.json", "jwks: ../certs/next-jwks.json")
    assert text != TEXT
    result = diff(load_policy(EXAMPLE), parse_policy(text, base_dir=EXAMPLE.parent))
    assert len(result.global_changes) == 1
    (line,) = result.global_changes
    assert line.startswith("jwt.jwks ") and line.endswith("next-jwks.json")
    assert not any(word in line for word in ("issuer", "audience", "algorithms"))


def test_each_changed_field_is_named_once():
    text = (
        TEXT.replace("audience: cohortgate", "audience: other")
        .replace("max_p99_ms: 250", "max_p99_ms: 300")
        .replace("interval_s: 30", "interval_s: 45")
    )
    assert text.count("audience: other") == 1 and "max_p99_ms: 300" in text and "interval_s: 45" in text
    result = diff(load_policy(EXAMPLE), parse_policy(text, base_dir=EXAMPLE.parent))
    assert result.global_changes == ("jwt.audience ['cohortgate'] -> ['other']",)
    tabular = next(r for r in result.routes if r.name == "tabular")
    assert "guardrails.max_p99_ms 250.0 -> 300.0" in tabular.changes
    assert "rollout.interval_s 30.0 -> 45.0" in tabular.changes
    assert len(tabular.changes) == 2
    assert tabular.moves == ()  # neither field moves a user
