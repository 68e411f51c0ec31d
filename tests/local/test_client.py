"""The client side of `cohortgate call` / `traffic`, without a stack: bodies, users, pacing, tallies."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.cli.traffic import Tally, bodies, due, new_rollbacks, parse_mix, plan_users
from cohortgate.local.client import (
    FEATURES,
    StackInfo,
    StackNotRunning,
    demo_body,
    describe_audit,
    oip_body,
    parse_input,
)


def test_the_demo_body_is_one_fp32_row_of_thirty_features():
    (tensor,) = demo_body()["inputs"]
    assert tensor["name"] == "input" and tensor["datatype"] == "FP32"
    assert tensor["shape"] == [1, FEATURES] and len(tensor["data"]) == FEATURES


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("[1, 2, 3]", [1, 3]),
        ("[[1, 2], [3, 4], [5, 6]]", [3, 2]),
        ('{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [7]}]}', [1]),
    ],
)
def test_input_is_a_body_a_row_or_rows(text: str, shape: list[int]):
    assert parse_input(text)["inputs"][0]["shape"] == shape


@pytest.mark.parametrize("text", ["nope", "{}", "[]", '["a"]', "[[1, 2], [3]]", "3"])
def test_bad_input_says_what_is_wrong(text: str):
    with pytest.raises(ValueError, match=r"input|row"):
        parse_input(text)


def test_input_from_a_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[[0.5, 1.5]]")
    assert parse_input(f"@{path}") == oip_body([[0.5, 1.5]])


def test_no_run_file_tells_how_to_start_the_stack(tmp_path):
    with pytest.raises(StackNotRunning, match="cohortgate up"):
        StackInfo.load(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(StackNotRunning, match="not a readable run file"):
        StackInfo.load(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = {
        "pid": gone.pid,
        "endpoints": {"gateway": "https://127.0.0.1:1"},
        "certs": {"ca": "c", "dir": "d", "clients": {}},
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(StackNotRunning, match="is stale"):
        StackInfo.load(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({**run, "pid": os.getpid()}))
    assert StackInfo.load(tmp_path).port == 1


def test_users_are_reproducible_distinct_and_follow_the_mix():
    users = plan_users(10_000, {"ae": 0.3, "eu": 0.7}, seed=7)
    assert users == plan_users(10_000, {"eu": 0.7, "ae": 0.3}, seed=7)
    assert users != plan_users(10_000, {"ae": 0.3, "eu": 0.7}, seed=8)
    assert len({sub for sub, _ in users}) == 10_000
    share = Counter(region for _, region in users)["ae"] / 10_000
    assert abs(share - 0.3) < 0.02


def test_the_mix_is_normalised_and_checked():
    assert parse_mix("ae=1,eu=3") == {"ae": 0.25, "eu": 0.75}
    assert parse_mix("eu") == {"eu": 1.0}
    for bad in ("ae=x", "=0.5", "ae=0", "ae=-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)


@given(st.floats(0, 600), st.floats(0.1, 5000))
def test_an_open_loop_schedule_starts_one_request_per_interval(elapsed: float, rps: float):
    n = due(elapsed, rps)
    assert elapsed * rps <= n <= elapsed * rps + 1 + 1e-6
    assert due(elapsed + 1 / rps, rps) == n + 1


def test_bodies_are_valid_oip_and_reproducible():
    first = bodies(seed=3, count=8)
    assert first == bodies(seed=3, count=8) and first != bodies(seed=4, count=8)
    for raw in first:
        (tensor,) = json.loads(raw)["inputs"]
        assert tensor["shape"] == [1, FEATURES] and len(tensor["data"]) == FEATURES


def test_the_tally_reports_each_second_then_starts_afresh():
    tally = Tally()
    for status, variant in [("200", "control")] * 9 + [("500", "canary")]:
        tally.record(status, variant, 0.004)
    line = tally.window_line(1, in_flight=2)
    assert "10 req/s" in line and "200:9 500:1" in line and "canary:1 control:9" in line
    assert "0 req/s" in tally.window_line(2, in_flight=0)
    assert "200:9 500:1" in tally.summary(2.0)


def test_only_new_rollbacks_since_the_start_are_reported_oldest_first():
    records = [  # as /audit answers: newest first
        {"ts": 30.0, "action": "rollback", "route": "r", "variant": "b"},
        {"ts": 20.0, "action": "promote", "route": "r", "variant": "a"},
        {"ts": 15.0, "action": "rollback", "route": "r", "variant": "a"},
        {"ts": 5.0, "action": "rollback", "route": "r", "variant": "old"},  # before this run
        "not a record",
        {"ts": "?", "action": "rollback"},
    ]
    seen: set[str] = set()
    assert [r["variant"] for r in new_rollbacks(records, seen, since=10.0)] == ["a", "b"]
    assert new_rollbacks(records, seen, since=10.0) == []  # each one once


def test_the_summary_counts_statuses_variants_and_rollbacks():
    tally = Tally()
    tally.record("200", "control", 0.002)
    tally.record("500", "canary", 0.003)
    assert "rollbacks 0" in tally.summary(1.0)
    tally.rollbacks.append((12.0, describe_audit({"action": "rollback", "route": "r", "variant": "canary"})))
    summary = tally.summary(1.0)
    assert "status    200:1 500:1" in summary and "variants  canary:1 control:1" in summary
    assert "rollbacks 1\n    at 12s: rollback r/canary" in summary


def test_up_keeps_an_earlier_rollback_and_says_so_but_the_demo_starts_afresh(tmp_path):
    import io
    import json
    from pathlib import Path

    from cohortgate.local.stack import Stack, StackOptions

    state = {"tabular": {"route": "tabular", "weights": {"control": 100, "canary": 0}, "updated_by": "controller:x",
                         "variants": {"canary": {"phase": "rolled_back", "step": 0}}}}  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(state))
    out = io.StringIO()
    Stack(StackOptions(policy=Path("policies/example.yaml"), state_dir=tmp_path), out=out)._previous_state()
    assert "tabular/canary is rolled back since an earlier run" in out.getvalue()
    assert (tmp_path / "state.json").exists()
    Stack(StackOptions(policy=Path("policies/example.yaml"), state_dir=tmp_path, demo=True), out=out)._previous_state()
    assert not (tmp_path / "state.json").exists()


async def test_up_reads_the_checksummed_state_and_says_when_it_starts_safe(tmp_path):
    """The notes read the state the store itself would start from (the checksummed generations),
    and a state file with no readable generation is announced as safe mode, not passed over."""
    import io
    from pathlib import Path

    from cohortgate.controller.loop import Controller
    from cohortgate.core.policy import load_policy
    from cohortgate.core.rollout import Signal
    from cohortgate.local.stack import Stack, StackOptions
    from cohortgate.store.events import InProcessSink
    from cohortgate.store.state import InProcessState

    policy = load_policy("policies/example.yaml")
    controller = Controller(policy, InProcessState(tmp_path / "state.json"), InProcessSink(), clock=lambda: 2_000.0)
    await controller.start()
    await controller.manual(Signal.ROLLBACK, "tabular", "canary", "operator")
    assert "format" in (tmp_path / "state.json").read_text()  # the checksummed format, not the old plain map

    out = io.StringIO()
    Stack(StackOptions(policy=Path("policies/example.yaml"), state_dir=tmp_path), out=out)._previous_state()
    assert "tabular/canary is rolled back since an earlier run" in out.getvalue()
    assert "SAFE MODE" not in out.getvalue()

    for path in tmp_path.glob("state.json*"):
        path.write_text("garbage{")
    out = io.StringIO()
    Stack(StackOptions(policy=Path("policies/example.yaml"), state_dir=tmp_path), out=out)._previous_state()
    assert "SAFE MODE" in out.getvalue() and "cohortgate resume" in out.getvalue()
