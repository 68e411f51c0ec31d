"""The supervisor's rules: restart with backoff, a crash loop left down, start-up failures fatal, stop order.

Most tests drive `Supervisor` with scripted processes and a fake clock (no process, no sleep); one
runs real ones to show a SIGKILLed child is restarted under a new pid.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cohortgate.local.recipes import Recipe
from cohortgate.local.supervisor import (
    TRANSITIONS,
    Child,
    ChildFailed,
    Event,
    Phase,
    RestartPolicy,
    Supervisor,
    describe_exit,
    transition,
)

# ------------------------------------------------------------------------------ pure rules


def test_the_first_restart_is_immediate_then_the_delay_doubles():
    policy = RestartPolicy()
    exits: list[float] = []
    delays = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        exits.append(t)
        delays.append(policy.delay(exits, t))
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0]


def test_more_exits_than_the_limit_within_the_window_is_a_crash_loop():
    policy = RestartPolicy(max_restarts=3, window_s=60.0)
    exits = [0.0, 10.0, 20.0]
    assert policy.delay(exits, 20.0) is not None
    assert policy.delay([*exits, 30.0], 30.0) is None  # a fourth exit within 60 s
    # exits older than the window are forgiven: a child that crashes once an hour is restarted forever
    assert policy.delay([0.0, 100.0, 200.0, 300.0], 300.0) == 0.0


def test_every_phase_can_stop_and_an_impossible_event_is_refused():
    assert all(TRANSITIONS[(phase, Event.STOP)] is Phase.STOPPED for phase in Phase)
    assert transition(Phase.READY, Event.EXITED) is Phase.BACKOFF
    with pytest.raises(ValueError, match="ready cannot take 'restart'"):
        transition(Phase.READY, Event.RESTART)
    with pytest.raises(ValueError):
        transition(Phase.FAILED, Event.RESTART)  # a crash loop stays down


def test_exit_statuses_read_as_a_person_would():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(1) == "status 1"


# ------------------------------------------------------------------------------ scripted processes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """A process whose exit the test decides; records what the supervisor did to it."""

    pids = iter(range(100, 10_000))

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.pid: int | None = None
        self.status: int | None = None

    def start(self) -> None:
        self.pid = next(self.pids)
        self.log.append(f"start {self.name}")

    def exit_status(self) -> int | None:
        return self.status

    def stop(self, timeout: float) -> None:
        self.log.append(f"stop {self.name}")
        self.status = 0 if self.status is None else self.status

    def kill(self) -> None:
        self.status = -signal.SIGKILL


class Harness:
    def __init__(self, **policy) -> None:
        self.clock = Clock()
        self.lines: list[str] = []
        self.changes = 0
        self.actions: list[str] = []
        self.processes: dict[str, list[FakeProcess]] = {}
        self.ready: dict[str, bool] = {}
        self.sup = Supervisor(
            restart_policy=RestartPolicy(**policy), ready_timeout_s=30.0, report=self.lines.append,
            on_change=self._changed, clock=self.clock,
        )  # fmt: skip

    def _changed(self) -> None:
        self.changes += 1

    def child(self, name: str, kind: str = "sidecar") -> Child:
        def make() -> FakeProcess:
            proc = FakeProcess(self.actions, name)
            self.processes.setdefault(name, []).append(proc)
            return proc

        recipe = Recipe(name=name, kind=kind, argv=("x",), log_path=Path(os.devnull))
        self.ready[name] = True
        return Child(recipe, lambda: self.ready[name], make)

    def up(self, *children: Child) -> None:
        self.sup.start(children)
        self.sup.wait_ready(children)

    def current(self, name: str) -> FakeProcess:
        return self.processes[name][-1]


def test_a_dead_child_is_restarted_at_once_and_its_recovery_is_measured():
    h = Harness()
    a, b = h.child("a"), h.child("b")
    h.up(a, b)
    first_pid = a.pid
    h.current("a").status = -signal.SIGKILL
    h.ready["a"] = False
    h.sup.tick()  # notices the exit; the first restart is immediate
    assert a.phase is Phase.STARTING and a.restarts == 1 and a.pid != first_pid
    assert b.phase is Phase.READY and len(h.processes["b"]) == 1  # the other child is left alone
    h.clock.now += 1.5
    h.ready["a"] = True
    assert h.sup.tick() == [a]
    assert a.phase is Phase.READY and a.last_recovery_s == pytest.approx(1.5)
    described = a.describe()
    assert described["restarts"] == 1 and described["last_exit"] == "killed by SIGKILL"
    assert described["state"] == "ready" and described["pid"] == a.pid
    assert any("a: exited unexpectedly (killed by SIGKILL)" in line for line in h.lines)
    assert any("a: back, ready again 1.50s after it went down" in line for line in h.lines)
    assert h.changes >= 2  # run.json rewritten on the exit/restart and on the recovery


def test_the_second_restart_waits_its_backoff():
    h = Harness()
    a = h.child("a")
    h.up(a)
    h.current("a").status = 1
    h.sup.tick()  # restarted at once
    h.sup.tick()  # ready again (the probe says so)
    assert a.phase is Phase.READY and a.restarts == 1
    h.current("a").status = 1
    h.sup.tick()
    assert a.phase is Phase.BACKOFF and a.restarts == 1  # the second exit waits 0.5 s
    h.clock.now += 0.4
    h.sup.tick()
    assert a.phase is Phase.BACKOFF
    h.clock.now += 0.2
    h.sup.tick()
    assert a.phase is Phase.STARTING and a.restarts == 2


def test_a_crash_loop_is_reported_once_and_left_down_while_the_others_serve():
    h = Harness(max_restarts=2, window_s=60.0, delays_s=(0.0,))
    a, b = h.child("a"), h.child("b")
    h.up(a, b)
    for _ in range(3):
        h.current("a").status = 1
        h.sup.tick()
        h.sup.tick()
    assert a.phase is Phase.FAILED and a.restarts == 2 and len(h.processes["a"]) == 3
    for _ in range(5):
        h.clock.now += 10
        h.sup.tick()
    assert len(h.processes["a"]) == 3  # never started again
    assert b.phase is Phase.READY
    loops = [line for line in h.lines if "crash loop" in line]
    assert len(loops) == 1 and "a: exited 3 times" in loops[0] and "keeps serving" in loops[0]
    assert a.describe()["state"] == "failed" and a.describe()["pid"] is None


def test_a_child_that_never_became_ready_fails_the_start_instead_of_restarting():
    h = Harness()
    a = h.child("a")
    h.ready["a"] = False
    h.sup.start([a])
    h.current("a").status = 2
    with pytest.raises(ChildFailed, match="a exited while starting with status 2"):
        h.sup.wait_ready([a])
    assert len(h.processes["a"]) == 1


def test_a_child_not_ready_in_time_fails_the_start():
    h = Harness()
    a = h.child("a")
    h.ready["a"] = False
    h.sup.start([a])
    h.sup.tick()
    h.clock.now += 31
    with pytest.raises(ChildFailed, match="was not ready after 30s"):
        h.sup.tick()
    assert h.current("a").status == -signal.SIGKILL


def test_stop_goes_load_first_then_envoy_gateway_controller_and_sidecars_last():
    h = Harness()
    children = [h.child(n, k) for n, k in (("s1", "sidecar"), ("controller", "controller"), ("gateway", "gateway"),
                                           ("envoy", "envoy"), ("traffic", "traffic"))]  # fmt: skip
    h.up(*children)
    h.actions.clear()
    h.sup.stop_all()
    assert h.actions == ["stop traffic", "stop envoy", "stop gateway", "stop controller", "stop s1"]
    assert all(c.phase is Phase.STOPPED for c in children)


# ------------------------------------------------------------------------------ real processes


def test_a_sigkilled_process_comes_back_under_a_new_pid(tmp_path: Path):
    recipe = Recipe(
        name="sleeper", kind="sidecar", argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        log_path=tmp_path / "sleeper.log",
    )  # fmt: skip
    sup = Supervisor(report=lambda line: None)
    child = Child(recipe, lambda: True)
    sup.start([child])
    sup.wait_ready([child])
    first = child.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30  # generous: a busy 2-core machine
    while not (child.phase is Phase.READY and child.pid != first):
        assert time.monotonic() < deadline, child.describe()
        sup.tick()
        time.sleep(0.02)
    assert child.restarts == 1 and child.last_exit == "killed by SIGKILL"
    second = child.pid
    sup.stop_all()
    assert child.phase is Phase.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


def test_a_warm_spare_runs_the_job_it_is_handed_with_its_log_and_environment(tmp_path: Path):
    """The spare imports ahead, then becomes exactly the command a cold start would have run."""
    from cohortgate.local.supervisor import PopenProcess, Spare

    recipe = Recipe(
        name="probe", kind="sidecar", argv=(sys.executable, "-m", "cohortgate.cli", "--version"),
        log_path=tmp_path / "probe.log", env={"COHORTGATE_TEST_MARK": "1"}, preload=("json",),
    )  # fmt: skip
    assert recipe.cli_args == ("--version",)
    spare = Spare(sys.executable, recipe.preload)
    deadline = time.monotonic() + 60
    while not spare.warm:  # it says so once its imports are done
        assert time.monotonic() < deadline and spare.alive
        time.sleep(0.02)
    process = PopenProcess(recipe)
    process.start(spare)
    assert process.pid == spare.proc.pid
    assert process.proc is not None and process.proc.wait(60) == 0
    assert (tmp_path / "probe.log").read_text().startswith("cohortgate ")


def test_a_spare_without_a_job_exits_quietly():
    from cohortgate.local.supervisor import Spare

    spare = Spare(sys.executable, ("json",))
    spare.discard()
    assert spare.proc.returncode == 0


def test_a_spare_handed_a_job_while_still_importing_runs_it(tmp_path: Path):
    """A child may die before its spare is warm: the job waits on stdin and runs after the imports."""
    from cohortgate.local.supervisor import PopenProcess, Spare

    recipe = Recipe(
        name="probe", kind="sidecar", argv=(sys.executable, "-m", "cohortgate.cli", "--version"),
        log_path=tmp_path / "probe.log", preload=("json",),
    )  # fmt: skip
    spare = Spare(sys.executable, recipe.preload)
    assert not spare.warm  # handed over at once, mid-import
    process = PopenProcess(recipe)
    process.start(spare)
    assert process.proc is not None and process.proc.wait(60) == 0
    assert (tmp_path / "probe.log").read_text().startswith("cohortgate ")


def test_hangup_reaches_a_ready_child_and_spares_one_still_starting(tmp_path: Path):
    """`up` hands a policy edit to the gateway with SIGHUP (issue 29); a child still starting may not
    have its handler yet, and SIGHUP's default would end it, so it is not sent then."""
    mark = tmp_path / "hup"
    script = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(mark)!r}).write_text('hup'))\n"
        f"pathlib.Path({str(mark)!r} + '.ready').write_text('')\n"
        "time.sleep(60)\n"
    )
    recipe = Recipe(name="hup", kind="gateway", argv=(sys.executable, "-c", script), log_path=tmp_path / "hup.log")
    ready = {"now": False}
    sup = Supervisor(report=lambda line: None)
    child = Child(recipe, lambda: ready["now"])
    sup.start([child])
    try:
        deadline = time.monotonic() + 60  # generous: a busy 2-core machine
        while not Path(str(mark) + ".ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert child.phase is Phase.STARTING and not child.hangup()
        ready["now"] = True
        sup.wait_ready([child])
        assert child.hangup()
        while not mark.exists():
            assert time.monotonic() < deadline, "the handler never ran"
            time.sleep(0.01)
        assert child.running  # handled, not killed
    finally:
        sup.stop_all()
    assert not child.hangup()  # stopped: nothing to signal
