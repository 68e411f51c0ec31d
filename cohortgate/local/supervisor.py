"""`cohortgate up`'s process supervisor: start children, restart the ones that die, stop them in order.

Like a service manager, and on one thread (the caller ticks it): a child that was ready once and
then exits is restarted from its `Recipe` after a backoff (`RestartPolicy`: the first restart at
once, then 0.5, 1, 2, 4 s); one that exits `RestartPolicy.max_restarts` times within
`RestartPolicy.window_s` is a crash loop: reported with its log tail and left down while the
others keep serving. A child that never became ready is a configuration error, not a crash: that
raises `ChildFailed` to whoever started it (`up` at start-up, a policy edit for a new sidecar).

A child's life is a transition table (`TRANSITIONS`), not nested ifs::

    starting --ready--> ready --exited--> backoff --restart--> starting
    backoff --give_up--> failed            (any) --stop--> stopped

Once the stack is up, one warm `Spare` per kind of Python child (sidecar, gateway, controller) waits
with its modules imported (`cohortgate.local.warm`); a restart hands it the dead child's command, so
it skips the imports, most of a cold start on a busy machine. Spares are spawned only while no
child is starting (their imports would slow the start they are meant to speed up).

Envoy runs through `cohortgate.deploy.envoyproc.EnvoyProcess` (`EnvoyRunner`); stopping it drains
first (admin ``/drain_listeners?graceful``, the drain period or until every connection closed),
so no request in flight or sent during the drain is reset.

Exceptions: ``ChildFailed(StackError)`` carries the child's name, the reason and its log tail.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cohortgate.core.contract import API_ENV, REDIS_ENV, TOKEN_FILE_ENV, UNIT_SALT_ENV
from cohortgate.local import probes
from cohortgate.local.plan import StackError
from cohortgate.local.recipes import ENVOY_DRAIN_S, SIDECAR_DRAIN_S, Recipe, envoy_args

if TYPE_CHECKING:
    from cohortgate.deploy.envoy import EnvoyFiles
    from cohortgate.deploy.envoyproc import EnvoyProcess

POLL_S = 0.05
# `up` passes these explicitly (or means "none"): a child must not pick them up from the shell.
NOT_INHERITED = frozenset({REDIS_ENV, TOKEN_FILE_ENV, API_ENV, UNIT_SALT_ENV})
# Stop order: the load first, Envoy (drained) before the gateway it calls, the sidecars last (they drain).
STOP_ORDER = {"traffic": 0, "envoy": 1, "gateway": 2, "controller": 3, "sidecar": 4}
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 60.0
ENVOY_CLOSE_WAIT_S = 5.0  # after the drain period: at most this long for open connections to close


class ChildFailed(StackError):
    """A child exited or never became ready. ``name`` is the child's, ``tail`` its last log lines."""

    def __init__(self, name: str, reason: str, tail: str = "", log_path: Path | None = None) -> None:
        self.name = name
        self.reason = reason
        self.tail = tail
        self.log_path = log_path
        super().__init__(f"{name} {reason}")


class Interrupted(Exception):
    """A stop was requested (a signal) while the supervisor waited."""


# ================================================================================ pure parts


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # exited; restarts when its delay is over
    FAILED = "failed"  # a crash loop: left down
    STOPPED = "stopped"


class Event(enum.Enum):
    READY = "ready"
    EXITED = "exited"
    RESTART = "restart"
    GIVE_UP = "give_up"
    STOP = "stop"


TRANSITIONS: Mapping[tuple[Phase, Event], Phase] = {
    (Phase.STARTING, Event.READY): Phase.READY,
    (Phase.STARTING, Event.EXITED): Phase.BACKOFF,
    (Phase.READY, Event.EXITED): Phase.BACKOFF,
    (Phase.BACKOFF, Event.RESTART): Phase.STARTING,
    (Phase.BACKOFF, Event.GIVE_UP): Phase.FAILED,
    **{(phase, Event.STOP): Phase.STOPPED for phase in Phase},
}


def transition(phase: Phase, event: Event) -> Phase:
    """The next phase; ValueError for an event that cannot happen in ``phase``."""
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise ValueError(f"a child that is {phase.value} cannot take {event.value!r}") from None


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to restart a child that died, and when to stop trying (a crash loop)."""

    delays_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)  # by the number of recent exits
    max_restarts: int = DEFAULT_MAX_RESTARTS  # ... within window_s: one more exit is a crash loop
    window_s: float = DEFAULT_RESTART_WINDOW_S

    def delay(self, exits: Sequence[float], now: float) -> float | None:
        """Seconds to wait before the next restart, given the times of the exits so far (the one just
        seen included); None: a crash loop, restart no more."""
        recent = sum(1 for t in exits if now - t < self.window_s)
        if recent > self.max_restarts:
            return None
        return self.delays_s[min(max(recent - 1, 0), len(self.delays_s) - 1)]


def describe_exit(status: int) -> str:
    """``status 1`` or ``killed by SIGKILL``: a Popen return code as a person reads it."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"status {status}"


# ================================================================================ processes


class Process(Protocol):
    """One run of a child's command: started once; a restart is a new `Process`."""

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def exit_status(self) -> int | None:
        """None while it runs; the exit status once it has exited (reaped)."""

    def stop(self, timeout: float) -> None:
        """SIGTERM, up to ``timeout`` for it to exit, then SIGKILL."""

    def kill(self) -> None: ...


def inherited_env() -> dict[str, str]:
    """Our environment minus the variables that would make a child disagree with `up`'s flags."""
    return {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}


@functools.cache
def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when `up` dies, even by SIGKILL.

    ctypes is loaded here, in the parent: the function that runs between fork and exec only calls
    prctl, so it never needs an import lock another thread (the Envoy render) might hold.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class Spare:
    """A warm spare (`cohortgate.local.warm`): a Python process with a kind's modules imported, waiting
    for one job. A restart handed to it skips the imports, most of a cold start on a busy machine."""

    def __init__(self, python: str, preload: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "cohortgate.local.warm", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**inherited_env(), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self._warm = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def warm(self) -> bool:
        """Whether its imports are done (it said so on stdout); never blocks."""
        if not self._warm and self.proc.stdout is not None and self.alive:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0)
            self._warm = bool(readable) and self.proc.stdout.readline().strip() == b"warm"
        return self._warm

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def hand(self, recipe: Recipe) -> subprocess.Popen[bytes]:
        """Give it ``recipe``'s job; it becomes that child (same log, environment and arguments)."""
        job = {
            "args": list(recipe.cli_args or ()),
            "env": {**inherited_env(), "PYTHONUNBUFFERED": "1", **recipe.env},
            "log": str(recipe.log_path),
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.close()
        self._close_pipe()
        return self.proc

    def discard(self) -> None:
        """No job: closing its input makes it exit; SIGKILL if it does not."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self._close_pipe()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)


class PopenProcess:
    """A Python child: its own session (a terminal's Ctrl-C reaches only `up`), its log appended to."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, spare: Spare | None = None) -> None:
        for path in self.recipe.stale_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.recipe.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spare is not None:
            try:
                self.proc = spare.hand(self.recipe)
                return
            except OSError:  # it died since we looked: start cold
                spare.discard()
        with open(self.recipe.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.recipe.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**inherited_env(), "PYTHONUNBUFFERED": "1", **self.recipe.env},
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL, without waiting (a signal handler may call it); `exit_status` reaps it later."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class EnvoyRunner:
    """Envoy through `EnvoyProcess` (its binary, base id, admin address file), plus a graceful drain."""

    def __init__(self, files: EnvoyFiles, log_path: Path, concurrency: int) -> None:
        self.files = files
        self.log_path = log_path
        self.concurrency = concurrency
        self.envoy: EnvoyProcess | None = None
        self._status: int | None = None

    @property
    def pid(self) -> int | None:
        return self.envoy.pid if self.envoy is not None else None

    def start(self) -> None:
        from cohortgate.deploy.envoyproc import EnvoyProcess

        self.envoy = EnvoyProcess(
            self.files,
            log_path=self.log_path,
            concurrency=self.concurrency,
            extra_args=envoy_args(),
            preexec_fn=die_with_parent(),
        )
        self.envoy.start()

    def exit_status(self) -> int | None:
        if self.envoy is None or self.envoy.running:
            return None
        if self._status is None:
            self._status = self.envoy.stop(0)  # reaps it and cleans its work directory
        return self._status

    def ready(self) -> bool:
        """Admin ``/ready`` says LIVE and the HTTPS listener accepts a connection."""
        if self.envoy is None or not self.envoy.running:
            return False
        try:
            status, body = self.envoy.admin_get("/ready", timeout=1.0)
        except (OSError, ValueError):
            return False
        return status == 200 and body.strip() == b"LIVE" and probes.tcp_accepts(self.files.listen_port)

    def drain(self, period_s: float = ENVOY_DRAIN_S, close_wait_s: float = ENVOY_CLOSE_WAIT_S) -> str:
        """Drain before a stop: every connection is told to close, the listeners keep accepting for
        ``period_s`` (then close); return once no downstream connection is open, or the listeners
        have closed and ``close_wait_s`` more passed. Says what happened, for `up`'s log."""
        envoy = self.envoy
        if envoy is None or not envoy.running:
            return "not running"
        try:
            if not envoy.drain_listeners(graceful=True):
                return "admin refused the drain"
        except (OSError, ValueError):
            return "admin did not answer the drain"
        started = time.monotonic()
        closed_at = started + period_s
        deadline = closed_at + close_wait_s
        while envoy.running:
            open_now = probes.envoy_stat(envoy.admin_get, "http.cohortgate.downstream_cx_active")
            now = time.monotonic()
            if open_now == 0:
                return f"every connection closed after {now - started:.1f}s"
            if now >= deadline:
                return f"{open_now} connection(s) still open after {now - started:.1f}s"
            time.sleep(POLL_S)
        return "exited while draining"

    def stop(self, timeout: float) -> None:
        if self.envoy is not None:
            self._status = self.envoy.stop(timeout)

    def kill(self) -> None:
        if self.envoy is not None and self.envoy.pid is not None and self.envoy.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.envoy.pid, signal.SIGKILL)


# ================================================================================ children


class Child:
    """One supervised child: its recipe, readiness probe, current process, phase and restart history."""

    def __init__(
        self,
        recipe: Recipe,
        ready: Callable[[], bool] | None = None,
        make_process: Callable[[], Process] | None = None,
    ) -> None:
        """``ready`` probes readiness; None: the process's own ``ready()`` (`EnvoyRunner` has one)."""
        self.recipe = recipe
        self._ready = ready
        self._make_process = make_process or (lambda: PopenProcess(recipe))
        self.process: Process | None = None
        self.phase = Phase.STARTING
        self.ever_ready = False
        self.started_at = 0.0  # this run's start (monotonic)
        self.down_since: float | None = None  # when its last unexpected exit was seen
        self.restart_at = 0.0
        self.exits: list[float] = []  # monotonic times of unexpected exits
        self.restarts = 0
        self.last_exit = ""
        self.last_recovery_s: float | None = None

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def kind(self) -> str:
        return self.recipe.kind

    @property
    def endpoint(self) -> str:
        return self.recipe.endpoint

    @property
    def info(self) -> Mapping[str, Any]:
        return self.recipe.info

    @property
    def log_path(self) -> Path:
        return self.recipe.log_path

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.exit_status() is None

    def hangup(self) -> bool:
        """SIGHUP to a ready child (the gateway reloads its policy file at once); False when it is not
        ready: a child still starting may not have its handler yet, and SIGHUP's default ends it."""
        pid = self.pid
        if self.phase is not Phase.READY or pid is None or not self.running:
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True

    def ready(self) -> bool:
        if self._ready is not None:
            return self._ready()
        probe = getattr(self.process, "ready", None)
        return bool(probe()) if probe is not None else True

    def move(self, event: Event) -> None:
        self.phase = transition(self.phase, event)

    def start(self, now: float, spare: Spare | None = None) -> None:
        process = self._make_process()
        if spare is not None and isinstance(process, PopenProcess):
            process.start(spare)
        else:
            process.start()
        self.process = process
        self.started_at = now

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 32 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> dict[str, Any]:
        """This child in run.json: where it is, its pid, and how its supervision went."""
        return {
            "kind": self.kind,
            "pid": self.pid if self.phase in (Phase.STARTING, Phase.READY) else None,
            "endpoint": self.endpoint,
            "log": str(self.log_path),
            "argv": list(self.recipe.argv),
            **self.info,
            "state": self.phase.value,
            "restarts": self.restarts,
            "last_exit": self.last_exit or None,
            "last_recovery_s": None if self.last_recovery_s is None else round(self.last_recovery_s, 3),
        }


class Supervisor:
    """The children of one stack. Not thread-safe: one thread calls `tick`, `wait_ready` and `stop_all`;
    a signal handler may call `request_stop` and `kill_all`."""

    def __init__(
        self,
        *,
        restart_policy: RestartPolicy = RestartPolicy(),
        ready_timeout_s: float = 30.0,
        report: Callable[[str], None] = print,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children: dict[str, Child] = {}
        self.restart_policy = restart_policy
        self.ready_timeout_s = ready_timeout_s
        self.report = report
        self.on_change = on_change
        self.clock = clock
        self.stop_requested = threading.Event()
        self.spares: dict[tuple[str, tuple[str, ...]], Spare] = {}
        self.keep_spares = False
        self._spare_states: dict[str, str] = {}

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def get(self, name: str) -> Child | None:
        return self.children.get(name)

    def of_kind(self, kind: str) -> list[Child]:
        return [c for c in self.children.values() if c.kind == kind]

    # ------------------------------------------------------------------ waiting

    def request_stop(self) -> None:
        self.stop_requested.set()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; `Interrupted` when a stop is requested meanwhile."""
        if self.stop_requested.wait(seconds):
            raise Interrupted

    def check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise Interrupted

    # ------------------------------------------------------------------ starting

    def start(self, children: Iterable[Child]) -> list[Child]:
        """Start ``children`` (not yet ready: see `wait_ready`)."""
        self.check_stop()
        started = []
        for child in children:
            if child.name in self.children:
                raise ValueError(f"a child named {child.name!r} is already supervised")
            self.children[child.name] = child
            child.start(self.clock())
            started.append(child)
        return started

    def wait_ready(self, children: Sequence[Child], on_ready: Callable[[Child], None] = lambda c: None) -> None:
        """Tick until every child of ``children`` is ready. `ChildFailed` when one exits or times out
        before it ever was (the others are supervised meanwhile); `Interrupted` on a stop request."""
        pending = list(children)
        while True:
            became = self.tick()
            for child in became:
                if child in pending:
                    pending.remove(child)
                    on_ready(child)
            if not pending:
                return
            self.sleep(POLL_S)

    # ------------------------------------------------------------------ warm spares

    def enable_spares(self) -> None:
        """From now on keep one warm spare per kind of Python child (once no child is starting)."""
        self.keep_spares = True
        self._refill_spares()

    @staticmethod
    def _spare_key(recipe: Recipe) -> tuple[str, tuple[str, ...]] | None:
        return (recipe.argv[0], recipe.preload) if recipe.preload and recipe.cli_args is not None else None

    def _take_spare(self, recipe: Recipe) -> Spare | None:
        key = self._spare_key(recipe)
        spare = self.spares.pop(key, None) if key is not None else None
        return spare if spare is not None and spare.alive else None

    def _refill_spares(self) -> None:
        """A spare's imports compete for the CPU: spawn them only while every child is settled."""
        if not self.keep_spares or self.stop_requested.is_set():
            return
        if any(c.phase is Phase.STARTING for c in self.children.values()):
            return
        for child in self.children.values():
            key = self._spare_key(child.recipe)
            if key is not None and (key not in self.spares or not self.spares[key].alive):
                self.spares[key] = Spare(key[0], key[1])

    def spare_states(self) -> dict[str, str]:
        """For run.json: each kind's spare, ``warm`` (imports done) or ``warming``."""
        kinds = {self._spare_key(c.recipe): c.kind for c in self.children.values()}
        return {kinds.get(k, "?"): "warm" if s.warm else "warming" for k, s in self.spares.items() if s.alive}

    def _drop_spares(self) -> None:
        self.keep_spares = False
        spares, self.spares = list(self.spares.values()), {}
        for spare in spares:
            spare.discard()

    # ------------------------------------------------------------------ supervising

    def tick(self) -> list[Child]:
        """One look at every child: notice exits, restart after the backoff, see who became ready.

        Returns the children that became ready in this look. Raises `ChildFailed` for a child that
        exited or timed out before it was ever ready (see the module docstring)."""
        became_ready = []
        for child in list(self.children.values()):
            now = self.clock()
            if child.phase in (Phase.STARTING, Phase.READY):
                assert child.process is not None
                status = child.process.exit_status()
                if status is not None:
                    self._exited(child, status, now)
                elif child.phase is Phase.STARTING:
                    if child.ready():
                        self._ready(child, self.clock())
                        became_ready.append(child)
                    elif now - child.started_at > self.ready_timeout_s:
                        self._not_ready(child, now)
            if child.phase is Phase.BACKOFF and now >= child.restart_at:
                child.move(Event.RESTART)
                child.restarts += 1
                spare = self._take_spare(child.recipe)
                child.start(now, spare)
                how = " from a warm spare" if spare is not None else ""
                self.report(f"{child.name}: restarting{how} (restart {child.restarts})")
                self.on_change()
        self._refill_spares()
        if self.spares and (states := self.spare_states()) != self._spare_states:
            self._spare_states = states
            self.on_change()  # run.json says when the spares are warm
        return became_ready

    def _ready(self, child: Child, now: float) -> None:
        child.move(Event.READY)
        if child.ever_ready and child.down_since is not None:
            child.last_recovery_s = now - child.down_since
            self.report(
                f"{child.name}: back, ready again {child.last_recovery_s:.2f}s after it went down "
                f"(pid {child.pid}, restart {child.restarts})"
            )
            self.on_change()
        child.ever_ready = True
        child.down_since = None

    def _not_ready(self, child: Child, now: float) -> None:
        assert child.process is not None
        tail = child.log_tail()
        child.process.kill()
        if not child.ever_ready:
            raise ChildFailed(child.name, f"was not ready after {self.ready_timeout_s:.0f}s", tail, child.log_path)
        self._exited(child, None, now, reason=f"not ready {self.ready_timeout_s:.0f}s after its restart")

    def _exited(self, child: Child, status: int | None, now: float, reason: str = "") -> None:
        what = reason or describe_exit(status if status is not None else -signal.SIGKILL)
        if not child.ever_ready:
            raise ChildFailed(child.name, f"exited while starting with {what}", child.log_tail(), child.log_path)
        ran = now - child.started_at
        if child.phase is Phase.READY or child.down_since is None:
            child.down_since = now  # it was serving until now (a failed restart stays down since before)
        child.move(Event.EXITED)
        child.exits.append(now)
        child.last_exit = what
        delay = self.restart_policy.delay(child.exits, now)
        if delay is None:
            child.move(Event.GIVE_UP)
            policy = self.restart_policy
            self.report(
                f"{child.name}: exited {len(child.exits)} times ({what} last); more than "
                f"{policy.max_restarts} in {policy.window_s:.0f}s is a crash loop: not restarting it. "
                f"The rest of the stack keeps serving. Last lines of {child.log_path}:\n{child.log_tail(10)}"
            )
        else:
            child.restart_at = now + delay
            when = "now" if delay == 0 else f"in {delay:g}s"
            self.report(f"{child.name}: exited unexpectedly ({what}) after {ran:.1f}s; restarting {when}")
        self.on_change()

    # ------------------------------------------------------------------ stopping

    def retire(self, children: Sequence[Child], timeout: float = SIDECAR_DRAIN_S + 2) -> None:
        """Stop these children for good (a policy edit dropped them) and forget them."""
        for child in children:
            self.children.pop(child.name, None)
            if child.process is not None:
                child.process.stop(timeout)
            child.move(Event.STOP)

    def stop_all(self) -> None:
        """Stage by stage (`STOP_ORDER`): SIGTERM a stage, wait for it, then the next. Envoy drains first."""
        self._drop_spares()
        by_stage: dict[int, list[Child]] = {}
        for child in self.children.values():
            by_stage.setdefault(STOP_ORDER.get(child.kind, 9), []).append(child)
        for stage in sorted(by_stage):
            group = [c for c in by_stage[stage] if c.running]
            for child in by_stage[stage]:
                if not child.running:
                    child.move(Event.STOP)
            if not group:
                continue
            started = time.monotonic()
            for child in group:
                if isinstance(child.process, EnvoyRunner):
                    self.report(f"  draining {child.name}: {child.process.drain()}")
            timeout = SIDECAR_DRAIN_S + 2 if group[0].kind == "sidecar" else 10.0
            for child in group:  # SIGTERM every child of the stage first: they stop side by side
                if isinstance(child.process, PopenProcess) and child.process.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.proc.send_signal(signal.SIGTERM)
            for child in group:
                assert child.process is not None
                child.process.stop(timeout)
                child.move(Event.STOP)
            names = ", ".join(c.name for c in group) if len(group) < 3 else f"{len(group)} {group[0].kind}s"
            self.report(f"  stopped {names} ({time.monotonic() - started:.1f}s)")
            if group[0].kind == "traffic":  # its closing summary: what the demo did
                tail = group[0].log_tail(40)
                self.report(tail[tail.rfind("total:") :] if "total:" in tail else tail)

    def kill_all(self) -> None:
        for spare in list(self.spares.values()):
            with contextlib.suppress(ProcessLookupError):
                spare.proc.kill()
        for child in self.children.values():
            if child.process is not None:
                child.process.kill()
