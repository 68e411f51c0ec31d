"""`cohortgate batch --spark local[2]`: the same rows, the same variants and predictions as in-process.

One SparkSession serves the module (starting a JVM takes tens of seconds on a busy 2-core VM); the
CLI's own `getOrCreate` finds it, so the test runs the command exactly as a user types it, with the
model files shipped through `addFile` and read back with `SparkFiles` in the Python workers. The
input is two Parquet files, so two partitions run in parallel tasks.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohortgate.batch.job import prepare, score_frame, session
from cohortgate.cli import main
from tests.batch.conftest import make_rows
from tests.needs import import_or_missing, missing

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def spark():
    import_or_missing("pyspark")
    if shutil.which("java") is None:
        missing("no java on PATH: Spark needs a JRE >= 17 (make system-deps installs default-jre-headless)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyspark 4.x on pandas 3: works, warns
        s = session("local[2]")
    yield s
    s.stop()


def _plain(value):
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else value


def test_spark_matches_in_process(spark, policy_file: Path, tmp_path: Path, capsys) -> None:
    rows = make_rows(400, seed=11)
    source = tmp_path / "in"
    source.mkdir()
    rows.iloc[:200].to_parquet(source / "part-0.parquet", index=False)
    rows.iloc[200:].to_parquet(source / "part-1.parquet", index=False)
    out, rejects = tmp_path / "scored", tmp_path / "rejects"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        code = main(
            [
                "batch",
                "--policy",
                str(policy_file),
                "--route",
                "tabular",
                "--input",
                str(source),
                "--output",
                str(out),
                "--rejects",
                str(rejects),
                "--shadows",
                "--spark",
                "local[2]",
            ]
        )
    assert code == 0, capsys.readouterr().err
    assert '"rows": 400' in capsys.readouterr().out

    expected = score_frame(prepare(policy_file, "tabular", shadows=True), rows).set_index("sub", drop=False)
    good = pd.read_parquet(out)
    bad = pd.read_parquet(rejects)
    assert len(good) + len(bad) == 400
    assert len(good) > 100 and len(bad) > 20
    want_good = expected[expected["reason"].isna()]
    assert sorted(good["sub"]) == sorted(want_good["sub"])
    for _, row in good.iterrows():
        want = want_good.loc[row["sub"]]
        keys = ("variant", "region", "assignment", "bucket", "label", "fallback")
        assert [_plain(row[k]) for k in keys] == [_plain(want[k]) for k in keys], row["sub"]
        np.testing.assert_allclose(row["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
        if row["region"] == "eu":
            np.testing.assert_allclose(
                row["shadow_challenger_probabilities"], want["shadow_challenger_probabilities"], rtol=1e-5, atol=1e-6
            )
    want_bad = expected[expected["reason"].notna()].fillna({"sub": ""})
    got_bad = bad.fillna({"sub": ""})
    assert sorted(zip(got_bad["sub"], got_bad["reason"], strict=True)) == sorted(
        zip(want_bad["sub"], want_bad["reason"], strict=True)
    )
    assert "variant" not in bad.columns and "reason" not in good.columns
