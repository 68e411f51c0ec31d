"""Fixtures for the batch tests: the demo models, a policy that serves them, and rows to score.

The rows mix what the gateway sees: units that hash into either variant, QA overrides, bots
(ineligible), a token without the unit claim, regions with a backend for every variant (eu), with control only
(ae: the canary falls back), with none (us), and none at all (denied, as the route guesses no region).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.demo_models import breast_cancer_split, build_models

POLICY = """\
version: 1
jwt: {{issuer: https://auth.test, audience: cohortgate, algorithms: [ES256], jwks: jwks.json}}
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth: {{identities: ["spiffe://cohortgate.local/app-*"], scopes: [predict]}}
    cohorts:
      unit: {{claim: sub}}
      salt: batch-parity-1
      eligibility: [{{header: x-device, not_in: [bot]}}]
      overrides: {{qa-canary: canary}}
    residency: {{source: {{claim: residency}}, on_missing_region: fallback_control}}
    variants:
      - name: control
        weight: 70
        backends:
          - {{url: "http://127.0.0.1:18101", region: eu, model: {models}/tabular-control.onnx}}
          - {{url: "http://127.0.0.1:18102", region: ae, model: {models}/tabular-control.onnx}}
      - name: canary
        weight: 30
        backends:
          - {{url: "http://127.0.0.1:18103", region: eu, model: {models}/tabular-canary.onnx}}
    shadows:
      - name: challenger
        percent: 10
        backends:
          - {{url: "http://127.0.0.1:18104", region: eu, model: {models}/tabular-challenger.onnx}}
  - name: remote
    match: {{path_prefix: /score}}
    cohorts: {{unit: {{header: x-user-id}}, salt: remote-1}}
    residency: {{source: {{header: x-region}}, default_region: eu}}
    variants:
      - name: control
        weight: 100
        backends: [{{url: "http://127.0.0.1:18105", region: eu}}]
"""


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch-models")
    build_models(out, include_mlp=False)
    return out


@pytest.fixture(scope="session")
def policy_file(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch-policy") / "policy.yaml"
    path.write_text(POLICY.format(models=models))
    return path


def make_rows(n: int, seed: int = 7):
    """``n`` rows of real feature vectors (breast-cancer test split, jittered) with gateway facts."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    _, x_test, _, _ = breast_cancer_split()
    x = np.asarray(x_test, dtype=np.float32)
    picks = x[rng.integers(0, len(x), n)] * rng.normal(1.0, 0.02, (n, x.shape[1])).astype(np.float32)
    sub: list[str | None] = [f"user-{i}" for i in range(n)]
    sub[0], sub[1] = "qa-canary", None  # an override; a token without the unit claim
    frame = pd.DataFrame(
        {
            "sub": pd.Series(sub, dtype=object),
            "residency": rng.choice(np.array(["eu", "eu", "eu", "ae", "us", None], dtype=object), n),
            "x-device": rng.choice(np.array(["web", "web", "web", "bot"], dtype=object), n),
            "input": list(picks),
        }
    )
    frame.loc[0, "residency"] = "eu"
    frame.loc[0, "x-device"] = "web"
    return frame


@pytest.fixture(scope="session")
def rows():
    return make_rows(600)


@pytest.fixture(scope="session")
def rows_file(rows, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batch-input") / "rows.parquet"
    rows.to_parquet(path, index=False)
    return path
