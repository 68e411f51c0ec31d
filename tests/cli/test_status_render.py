"""`cohortgate status` shows what an operator must act on: safe mode and a control-breach alert."""

from __future__ import annotations

from cohortgate.cli.status import render
from cohortgate.controller.loop import Controller
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy


def doc(safe_mode: str | None, alert: dict | None) -> dict:
    return {
        "controller": {"name": "c1", "leader": True, "store": "ok", "policy_digest": "abc", "safe_mode": safe_mode},
        "routes": {"tabular": {"status": "halted", "version": 3, "updated_by": "controller", "alert": alert,
                               "variants": {}}},
    }  # fmt: skip


def test_safe_mode_and_alerts_are_shown_and_absent_when_there_are_none() -> None:
    alert = {"kind": "control_breach", "reason": "control 9%"}
    text = render(doc("no readable state file (state.json: garbage)", alert))
    assert "SAFE MODE: no readable state file (state.json: garbage)" in text
    assert "ALERT control_breach: control 9%" in text
    quiet = render(doc(None, None))
    assert "SAFE MODE" not in quiet and "ALERT" not in quiet


async def test_the_controller_status_carries_the_store_safe_mode(tmp_path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"garbage{")
    store = InProcessState(path)
    controller = Controller(make_policy(), store, InProcessSink(), clock=lambda: 1_000.0)
    await controller.start()
    safe = controller.status()["controller"]["safe_mode"]
    assert safe is not None and "no readable state file" in safe
    assert "SAFE MODE" in render(controller.status())
