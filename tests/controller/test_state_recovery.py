"""Issue 17.3: a corrupted state file never silently undoes a rollback.

The scenario of the issue, against the real file store and controller: roll the canary back, garble
the state file, restart -> still rolled back; garble both generations -> the store starts safe
(every challenger at 0 % until an operator resumes it), says so in ``safe_mode`` and an ERROR line.
"""

from __future__ import annotations

import json
import logging

import pytest

from cohortgate.controller.loop import Controller
from cohortgate.core import rollout
from cohortgate.core.rollout import Phase, Signal
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState, effective_policy
from tests.controller.policies import make_policy

POLICY = make_policy()
ROUTE = POLICY.by_name["tabular"]
GARBAGE = b"\x00\x17garbage{{not json"


async def restarted(path) -> tuple[Controller, InProcessState]:
    """A fresh controller process on the same state file."""
    store = InProcessState(path)
    controller = Controller(POLICY, store, InProcessSink(), clock=lambda: 2_000.0)
    await controller.start()
    return controller, store


async def rolled_back_on_disk(path) -> None:
    controller, _ = await restarted(path)
    await controller.manual(Signal.ROLLBACK, "tabular", "canary", "operator")
    assert controller.states["tabular"].weights["canary"] == 0


def served(store: InProcessState) -> dict[str, int]:
    """What a gateway following this store serves."""
    route = effective_policy(POLICY, store.snapshot(), store.safe_mode is not None).by_name["tabular"]
    return {v.name: v.weight if v.enabled else 0 for v in route.variants}


@pytest.mark.parametrize("garble", ["primary", "prev"])
async def test_a_rollback_survives_a_garbled_state_file_and_a_restart(tmp_path, caplog, garble):
    path = tmp_path / "state.json"
    await rolled_back_on_disk(path)
    (path if garble == "primary" else path.with_name("state.json.prev")).write_bytes(GARBAGE)
    caplog.set_level(logging.WARNING, logger="cohortgate.store.state")
    controller, store = await restarted(path)
    assert controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK  # was: back at 10 %
    assert served(store) == {"control": 100, "canary": 0}
    assert store.safe_mode is None
    if garble == "primary":
        assert "recovered generation" in caplog.text


async def test_a_checksum_catches_an_edit_that_is_still_valid_json(tmp_path):
    path = tmp_path / "state.json"
    await rolled_back_on_disk(path)
    doc = json.loads(path.read_text())
    doc["states"]["tabular"]["weights"] = {"control": 90, "canary": 10}  # plausible, and wrong
    path.write_text(json.dumps(doc))
    controller, store = await restarted(path)
    assert controller.states["tabular"].weights["canary"] == 0 and store.safe_mode is None


async def test_both_generations_garbled_start_safe_until_an_operator_resumes(tmp_path, caplog):
    path = tmp_path / "state.json"
    await rolled_back_on_disk(path)
    path.write_bytes(GARBAGE)
    path.with_name("state.json.prev").write_bytes(b"")
    caplog.set_level(logging.ERROR, logger="cohortgate.store.state")
    gateway_store = InProcessState(path)  # a gateway reading the file before any controller wrote
    assert gateway_store.safe_mode and served(gateway_store) == {"control": 100, "canary": 0}
    controller, store = await restarted(path)
    assert "starting SAFE" in caplog.text and "resumes" in caplog.text
    assert store.safe_mode is not None and "no readable state file" in store.safe_mode
    canary = controller.states["tabular"].variants["canary"]
    assert canary.phase is Phase.ROLLED_BACK and canary.reason.startswith("safe mode:")  # was: 10 % again
    assert served(store) == {"control": 100, "canary": 0}
    # safe survives another restart (now from a readable file), and an operator's resume ends it
    controller, store = await restarted(path)
    assert controller.states["tabular"].weights["canary"] == 0
    await controller.manual(Signal.RESUME, "tabular", "canary", "operator")
    assert store.snapshot()["tabular"].weights["canary"] > 0


async def test_a_fresh_store_and_an_old_format_file_are_not_safe_mode(tmp_path):
    assert InProcessState(tmp_path / "none.json").safe_mode is None
    path = tmp_path / "state.json"
    await rolled_back_on_disk(path)
    path.unlink()  # deleted on purpose (up --demo starts afresh): the .prev copy does not bring it back
    store = InProcessState(path)
    assert store.safe_mode is None and store.snapshot() == {}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tabular": rollout.initial_state(ROUTE).to_json()}))  # format 1
    store = InProcessState(old)
    assert store.safe_mode is None and store.snapshot()["tabular"].weights["canary"] == 10
