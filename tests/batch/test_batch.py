"""`cohortgate batch` in-process: parity with the gateway's decision, residency, models, the CLI.

Parity is checked against what the gateway does, not against the batch code: each row is turned
into the facts the ext_proc adapter builds for a request (method, OIP path, lower-cased headers,
the client's SPIFFE id, verified claims with the scope) and fed to the pure `decide`; each
prediction is recomputed by a bare onnxruntime session on the model file of the backend `decide`
chose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from cohortgate.batch import BatchError, run_pandas
from cohortgate.batch.assign import Assigner
from cohortgate.batch.job import prepare, score_frame, split
from cohortgate.cli import main
from cohortgate.core.decide import Facts, decide
from cohortgate.core.policy import load_policy


def gateway_decision(policy, row):
    """The decision the gateway takes for a request carrying this row's facts."""
    claims = {"scope": "predict"}
    for key in ("sub", "residency"):
        if row[key] is not None and not (isinstance(row[key], float) and np.isnan(row[key])):
            claims[key] = row[key]
    facts = Facts(
        "POST",
        "/v2/models/tabular/infer",
        {"x-device": row["x-device"], "content-type": "application/json"},
        "spiffe://cohortgate.local/app-shop",
        claims,
        "req-1",
    )
    return decide(policy, facts)


@pytest.fixture(scope="module")
def scored(policy_file, rows):
    job = prepare(policy_file, "tabular", shadows=True)
    return job, score_frame(job, rows)


def test_every_row_gets_the_gateways_variant_region_and_bucket(policy_file, rows, scored) -> None:
    policy = load_policy(policy_file)
    _, out = scored
    seen = set()
    for i, row in rows.iterrows():
        d = gateway_decision(policy, row)
        got = out.iloc[i]
        if d.denial is not None:
            assert got["reason"] == d.denial.code and got["status"] == d.denial.status, i
            assert pd.isna(got["variant"]) and got["probabilities"] is None, i
            seen.add(d.denial.code)
        else:
            assert pd.isna(got["reason"]), i
            assert (got["variant"], got["region"], got["assignment"], bool(got["fallback"])) == (
                d.variant,
                d.region,
                d.assignment,
                d.fallback,
            ), i
            assert (None if pd.isna(got["bucket"]) else int(got["bucket"])) == d.bucket, i
            seen.add((d.variant, d.assignment, d.fallback))
    # the rows exercise every path: both variants by hash, an override, ineligible, ae's fallback, 451, 401
    assert {("canary", "hash", False), ("control", "hash", False), ("canary", "override", False)} <= seen
    assert {("control", "ineligible", False), ("control", "hash", True)} <= seen
    assert {"residency_unavailable", "unauthenticated"} <= seen


def test_predictions_equal_bare_onnxruntime_on_the_chosen_backends_model(policy_file, rows, scored) -> None:
    policy = load_policy(policy_file)
    models = {b.cluster: b.model for b in policy.backends}
    _, out = scored
    sessions = {}
    checked = 0
    for i, row in rows.iterrows():
        d = gateway_decision(policy, row)
        if d.denial is not None:
            continue
        path = models[d.cluster]
        s = sessions.setdefault(path, ort.InferenceSession(path, providers=["CPUExecutionProvider"]))
        label, proba = s.run(None, {"input": np.asarray([row["input"]], dtype=np.float32)})
        np.testing.assert_allclose(out.iloc[i]["probabilities"], proba[0], rtol=1e-5, atol=1e-6)
        assert out.iloc[i]["label"] == label[0]
        checked += 1
    assert checked > 100
    # the models disagree somewhere, so a row scored by the wrong variant would have been caught
    x = np.stack(rows["input"].to_numpy()).astype(np.float32)
    outs = {p: s.run(None, {"input": x})[1] for p, s in sessions.items()}
    assert len(outs) >= 2 and not np.allclose(*list(outs.values())[:2])


def test_no_row_is_scored_out_of_region(scored) -> None:
    job, out = scored
    good, bad = split(job, out)
    assert set(good["region"]) == {"eu", "ae"}
    assert len(good) + len(bad) == len(out)
    assert (bad.loc[bad["reason"] == "residency_unavailable", "status"] == 451).all()
    assert set(bad.columns) == {"sub", "residency", "x-device", "input", "reason", "status", "message"}
    us = bad[bad["residency"] == "us"]
    assert len(us) and us["message"].str.contains("no backend in region 'us'").all()
    # canary has no ae backend: those units are served by control, marked as a fallback
    ae = good[good["region"] == "ae"]
    assert set(ae["variant"]) == {"control"} and ae["fallback"].any()
    # the challenger shadow exists only in eu: scored there (every row: batch does not sample), never in ae
    assert good.loc[good["region"] == "eu", "shadow_challenger_label"].notna().all()
    assert good.loc[good["region"] == "ae", "shadow_challenger_label"].isna().all()


def test_integer_and_absent_units_are_read_as_the_gateway_reads_them(policy_file) -> None:
    policy = load_policy(policy_file)
    a = Assigner(policy, "tabular")
    for unit in (4242, "4242"):
        row = {"sub": unit, "residency": "eu", "x-device": "web"}
        mine = a.decide(row)
        theirs = gateway_decision(policy, pd.Series(row))
        assert (mine.variant, mine.bucket) == (theirs.variant, theirs.bucket)
    assert a.decide({"sub": float("nan"), "residency": "eu"}).denial.code == "unauthenticated"
    assert a.decide({"sub": "u", "residency": None}).denial.code == "residency_unavailable"


def test_weights_override_moves_units_like_the_controller_would(policy_file, rows) -> None:
    job = prepare(policy_file, "tabular", weights={"control": 0, "canary": 100})
    out = score_frame(job, rows)
    hashed_eu = out[(out["assignment"] == "hash") & (out["region"] == "eu")]
    assert len(hashed_eu) and set(hashed_eu["variant"]) == {"canary"}
    with pytest.raises(BatchError, match="no variant"):
        prepare(policy_file, "tabular", weights={"nope": 100})
    with pytest.raises(BatchError, match="sum to 100"):
        prepare(policy_file, "tabular", weights={"control": 50})


def test_refuses_routes_it_cannot_score(policy_file) -> None:
    with pytest.raises(BatchError, match="no route 'missing'"):
        prepare(policy_file, "missing")
    with pytest.raises(BatchError, match="no local model file"):
        prepare(policy_file, "remote")


def test_run_pandas_writes_scored_and_rejects(policy_file, rows_file, tmp_path) -> None:
    job = prepare(policy_file, "tabular")
    summary = run_pandas(job, rows_file, tmp_path / "out.parquet", tmp_path / "rej.parquet")
    good, bad = pd.read_parquet(tmp_path / "out.parquet"), pd.read_parquet(tmp_path / "rej.parquet")
    assert summary.rows == len(good) + len(bad) == 600
    assert summary.scored == len(good) and sum(summary.rejected.values()) == len(bad)
    assert summary.by_variant == good["variant"].value_counts().to_dict()
    assert "shadow_challenger_label" not in good.columns  # shadows only when asked


def test_cli(policy_file, rows_file, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scored.parquet"
    code = main(
        ["batch", "--policy", str(policy_file), "--route", "tabular", "--input", str(rows_file), "--output", str(out)]
    )
    assert code == 0
    assert (tmp_path / "scored.rejects.parquet").exists()
    assert '"rows": 600' in capsys.readouterr().out
    assert (
        main(
            ["batch", "--policy", str(policy_file), "--route", "nope", "--input", str(rows_file), "--output", str(out)]
        )
        == 2
    )
    assert "no route 'nope'" in capsys.readouterr().err


def test_scalar_feature_columns(policy_file, rows) -> None:
    wide = rows.drop(columns=["input"]).join(
        pd.DataFrame(np.stack(rows["input"].to_numpy()), columns=[f"f{i}" for i in range(30)])
    )
    by_array = score_frame(prepare(policy_file, "tabular"), rows)
    by_columns = score_frame(prepare(policy_file, "tabular", features=[f"f{i}" for i in range(30)]), wide)
    pd.testing.assert_series_equal(by_array["label"], by_columns["label"])
    with pytest.raises(BatchError, match="no feature column"):
        score_frame(prepare(policy_file, "tabular", features=["f0", "zz"]), wide)


def test_repeated_units_share_a_decision_but_not_across_types(policy_file) -> None:
    policy = load_policy(policy_file)
    a = Assigner(policy, "tabular")
    units = ["u1", "u2", "u1", 1, True, 1]
    placed = a.place({"sub": units, "residency": ["eu"] * 6, "x-device": ["web"] * 6}, 6)
    assert placed[0] is placed[2] and placed[3] is placed[5]  # computed once per distinct facts
    for unit, got in zip(units, placed, strict=True):
        want = gateway_decision(policy, pd.Series({"sub": unit, "residency": "eu", "x-device": "web"}))
        assert (got.variant, got.bucket, got.denial) == (want.variant, want.bucket, want.denial), unit
    assert placed[4].denial is not None and placed[4].denial.code == "unauthenticated"  # True is no unit
