"""`cohortgate experiment plan` and `cohortgate outcomes import|report`, through the real parser."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cohortgate.cli import main
from cohortgate.controller.outcomes import append_journal, read_journal
from cohortgate.core import plan as P
from cohortgate.core.contract import EXPOSURE_KEY_ENV
from cohortgate.core.exposure import exposure_id, mac_key, mint

SECRET = "cli-test-exposure-secret-0001"
KEY = mac_key(SECRET.encode())


def test_plan_prints_both_horizons_and_the_price(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "plan", "--baseline", "0.05", "--mde", "0.02", "--rps", "200", "--split", "90/10"]) == 0
    out = capsys.readouterr().out
    expected = P.plan(0.05, 0.02, rps=200, split=(90, 10))
    assert f"{expected.units_fixed:,}" in out and f"{expected.units_sequential:,}" in out
    assert "5.00% -> 5.10%" in out and f"{expected.price:.2f}x" in out


def test_plan_as_json_divides_alpha_among_challengers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["experiment", "plan", "--baseline", "0.1", "--mde", "0.1", "--rps", "50", "--split", "80/10/10", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["challengers"] == 2 and doc["alpha_per_challenger"] == pytest.approx(0.025)
    assert doc["always_valid"]["units"] > doc["fixed_horizon"]["units"]
    assert doc["fixed_horizon"]["seconds"] == pytest.approx(doc["fixed_horizon"]["units"] / 45.0)  # 90 % of 50/s


@pytest.mark.parametrize(
    "argv",
    [
        ["--baseline", "0.05", "--mde", "0.02", "--rps", "200", "--kind", "mean"],  # no sd
        ["--baseline", "1.5", "--mde", "0.02", "--rps", "200"],  # not a rate
    ],
)
def test_plan_refuses_what_it_cannot_plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "plan", *argv]) == 2
    assert "cohortgate experiment plan:" in capsys.readouterr().err


def test_plan_split_syntax_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["experiment", "plan", "--baseline", "0.05", "--mde", "0.02", "--rps", "1", "--split", "90"])
    assert "invalid split" in capsys.readouterr().err


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["exposure", "request_id", "metric", "value", "t"])
        w.writeheader()
        w.writerows(rows)
    return path


def _experiment(tmp_path: Path, now: float) -> tuple[Path, list[dict[str, object]]]:
    """A journal of exposures (what the controller's access-log feed writes) and outcome rows."""
    rng = np.random.default_rng(3)
    journal = tmp_path / "outcomes.jsonl"
    exposures, rows = [], []
    for u in range(2000):
        variant, unit, rid = ("control", "v1")[u % 2], f"{u:016x}", f"req-{u}"
        exposures.append({"kind": "exposure", "route": "shop", "variant": variant, "unit": unit, "t": now,
                          "request_id": rid})  # fmt: skip
        if rng.random() < (0.10 if variant == "control" else 0.20):
            token = mint(KEY, "shop", variant, unit, now, exposure_id(rid))
            rows.append({"exposure": token, "metric": "conversion", "value": 1, "t": now + 30})
    append_journal(journal, exposures)
    return journal, rows


def test_import_verifies_dedupes_and_appends(tmp_path: Path, monkeypatch, capsys) -> None:
    import time

    now = time.time()
    monkeypatch.setenv(EXPOSURE_KEY_ENV, SECRET)
    journal, rows = _experiment(tmp_path, now)
    forged = mint(mac_key(b"somebody-elses-secret-0000"), "shop", "v1", "ffff", now)
    extra = [
        rows[0],  # a duplicate within the file
        {"exposure": forged, "metric": "conversion", "value": 1, "t": now},
        {"exposure": "", "request_id": "req-7", "metric": "conversion", "value": 1, "t": "2026-12-03T18:00:00+00:00"},
        {"exposure": "", "request_id": "", "metric": "conversion", "value": 1, "t": ""},  # bad row
    ]
    path = _write_csv(tmp_path / "labels.csv", rows + extra)
    assert main(["outcomes", "import", str(path), "--journal", str(journal), "--json"]) == 1  # one bad row
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts == {"accepted": len(rows) + 1, "duplicate": 1, "forged": 1, "bad_row": 1}
    # Importing the same file again appends nothing: every row is a duplicate now.
    before = sum(1 for _ in read_journal(journal))
    main(["outcomes", "import", str(path), "--journal", str(journal), "--json"])
    assert json.loads(capsys.readouterr().out)["counts"]["accepted"] == 0
    assert sum(1 for _ in read_journal(journal)) == before


def test_report_reads_the_journal(tmp_path: Path, monkeypatch, capsys) -> None:
    import time

    now = time.time()
    monkeypatch.setenv(EXPOSURE_KEY_ENV, SECRET)
    journal, rows = _experiment(tmp_path, now)
    main(["outcomes", "import", str(_write_csv(tmp_path / "c.csv", rows)), "--journal", str(journal)])
    capsys.readouterr()
    argv = ["outcomes", "report", "shop", "--journal", str(journal), "--metric", "conversion:binary"]
    assert main([*argv, "--planned-units", "2000", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["units"] == {"challenger": 1000, "control": 1000}  # exposed units, converted or not
    assert result["verdict"] == "win"  # 20 % vs 10 %
    assert main(argv) == 0
    assert "conversion" in capsys.readouterr().out


def test_import_without_a_key_says_it_did_not_verify(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(EXPOSURE_KEY_ENV, raising=False)
    path = _write_csv(tmp_path / "x.csv", [{"exposure": "1.a.b.c", "metric": "m", "value": 1}])
    assert main(["outcomes", "import", str(path), "--journal", str(tmp_path / "j.jsonl")]) == 0
    assert "not verified here" in capsys.readouterr().out


def test_parquet_rows_import_like_csv(tmp_path: Path, monkeypatch, capsys) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    monkeypatch.setenv(EXPOSURE_KEY_ENV, SECRET)
    token = mint(KEY, "shop", "v1", "abcd", 1_800_000_000)
    pq.write_table(pa.Table.from_pylist([{"exposure": token, "metric": "m", "value": 2.0, "t": 1_800_000_010}]),
                   tmp_path / "x.parquet")  # fmt: skip
    assert main(["outcomes", "import", str(tmp_path / "x.parquet"), "--journal", str(tmp_path / "j"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"accepted": 1}
