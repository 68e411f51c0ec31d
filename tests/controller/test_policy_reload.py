"""The controller follows an edited policy: file weights apply unless someone has acted on the route."""

from __future__ import annotations

from cohortgate.controller.loop import Controller
from cohortgate.core.rollout import Phase, Signal
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy


async def started(policy):
    store = InProcessState()
    controller = Controller(policy, store, InProcessSink(), clock=lambda: 1_000.0, name="c1")
    await controller.start()
    return controller, store


async def test_an_edited_weight_applies_when_nobody_has_acted_on_the_route():
    controller, store = await started(make_policy(weights=(90, 10), steps=None))
    await controller.set_policy(make_policy(weights=(80, 20), steps=None))
    assert dict(store.snapshot()["tabular"].weights) == {"control": 80, "canary": 20}
    reload = (await store.audit())[0]
    assert reload["action"] == "policy_reload" and reload["actor"] == "controller:c1"


async def test_a_rollback_survives_an_edit_of_the_weights():
    controller, store = await started(make_policy(weights=(90, 10), steps=None))
    await controller.manual(Signal.ROLLBACK, "tabular", "canary", "manual:test")
    await controller.set_policy(make_policy(weights=(80, 20), steps=None))
    state = store.snapshot()["tabular"]
    assert dict(state.weights) == {"control": 100, "canary": 0}
    assert state.variants["canary"].phase is Phase.ROLLED_BACK


async def test_a_new_variant_gets_its_windows_and_tests_and_the_file_weights():
    controller, store = await started(make_policy(weights=(90, 10), steps=None))
    await controller.set_policy(make_policy(weights=(80, 10, 10), steps=None))
    assert dict(store.snapshot()["tabular"].weights) == {"control": 80, "canary": 10, "beta": 10}
    assert set(controller.windows["tabular"].variants) == {"control", "canary", "beta"}
    assert ("tabular", "beta") in controller.tests


async def test_an_unchanged_policy_changes_nothing():
    policy = make_policy()
    controller, store = await started(policy)
    version = store.snapshot()["tabular"].version
    await controller.set_policy(make_policy())
    assert store.snapshot()["tabular"].version == version and await store.audit() == []


def test_the_controller_process_follows_edits_of_its_policy_file(tmp_path):
    import time

    from cohortgate.store.state import read_states
    from tests.dashboard.harness import ControllerProc, policy_text

    proc = ControllerProc(tmp_path).start()
    try:

        def weights():  # what the store would start from: the checksummed state file
            states, _safe_mode = read_states(proc.state_file)
            return dict(states["tabular"].weights) if "tabular" in states else None

        def wait_for(predicate, what):
            deadline = time.monotonic() + 60  # generous: a busy 2-core CI machine; the watch interval is 1 s
            while time.monotonic() < deadline:
                if predicate():
                    return
                time.sleep(0.05)
            raise AssertionError(f"{what}; log:\n{proc.log_path.read_text()[-2000:]}")

        wait_for(lambda: weights() == {"control": 90, "canary": 10}, "the file's weights at start")
        proc.policy.write_text(policy_text().replace("weight: 90", "weight: 75").replace("weight: 10", "weight: 25")
                               .replace("steps: [10, 25, 50, 100]", "steps: [25, 50, 100]"))  # fmt: skip
        wait_for(lambda: weights() == {"control": 75, "canary": 25}, "the edited weights within the watch interval")
        proc.policy.write_text("routes: [oops\n")
        wait_for(lambda: "policy_reload_failed" in proc.log_path.read_text(), "a refused edit in the log")
        assert weights() == {"control": 75, "canary": 25}
    finally:
        proc.stop()


async def test_a_tick_and_an_operator_action_flushing_together_write_each_record_once():
    import asyncio

    class SlowAudit(InProcessState):
        async def append_audit(self, record):
            await asyncio.sleep(0.01)  # a network round trip, as with Redis
            await super().append_audit(record)

    store = SlowAudit()
    controller = Controller(make_policy(steps=None), store, InProcessSink(), clock=lambda: 1_000.0, name="c1")
    await controller.start()
    await asyncio.gather(
        controller.manual(Signal.ROLLBACK, "tabular", "canary", "manual:test"),
        controller.tick(),
        controller.set_policy(make_policy(weights=(80, 20), steps=None)),
    )
    actions = [r["action"] for r in await store.audit()]
    assert sorted(actions) == ["policy_reload", "rollback"]
