"""`cohortgate up`'s composition root: prepare, start the planned stack in order, supervise it, stop it.

The parts live beside this module, one concept each: `plan` (pure: which sidecars, on which ports,
the effective policy data), `recipes` (pure: each child's command line), `probes` (readiness),
`supervisor` (process lifecycle: restarts with backoff, crash loops, the ordered stop with Envoy's
drain), `livepolicy` (following edits so the gateway and the controller serve the same digest) and
`banner` (what `up` prints). `Stack` does the rest of the I/O: builds missing demo models and
certificates, starts the children in dependency order (sidecars and controller, then the gateway,
Envoy last: its ext_proc filter fails closed, so it must never listen before the gateway answers),
keeps ``<state-dir>/run.json`` true (pids, restarts), and stops everything on SIGINT/SIGTERM.

A child that never becomes ready at start-up stops the stack with its name and log tail (never half
a stack); one that dies later is restarted while the others keep serving.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cohortgate.core.contract import EXPOSURE_KEY_ENV, UNIT_SALT_ENV
from cohortgate.core.datacontract import is_inline
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import Policy
from cohortgate.core.rollout import Phase as RolloutPhase
from cohortgate.local import banner, probes, recipes, shoppers
from cohortgate.local.client import DEFAULT_CLIENT as DEMO_CLIENT
from cohortgate.local.client import DEFAULT_STATE_DIR, RUN_FILE, describe_audit, pid_alive
from cohortgate.local.livepolicy import LivePolicy
from cohortgate.local.plan import (
    SidecarSpec,
    StackError,
    canary_variants,
    choose_port,
    local_model_file,
    oip_model_name,
    sidecar_specs,
)
from cohortgate.local.recipes import SIDECAR_DRAIN_S, Layout, Recipe
from cohortgate.local.supervisor import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_RESTART_WINDOW_S,
    POLL_S,
    Child,
    ChildFailed,
    EnvoyRunner,
    Interrupted,
    Phase,
    RestartPolicy,
    Supervisor,
)
from cohortgate.store.state import read_states
from cohortgate.support.files import write_atomic
from cohortgate.support.runtime import tune_collector

if TYPE_CHECKING:
    from cohortgate.deploy.envoy import EnvoyFiles

__all__ = ["ChildFailed", "Stack", "StackError", "StackOptions"]

DEFAULT_ENVOY_PORT = 8443
DEFAULT_CONTROLLER_PORT = banner.DEFAULT_CONTROLLER_PORT
DEFAULT_DASHBOARD_PORT = 9481
DEFAULT_GATEWAY_METRICS_PORT = 9482
EFFECTIVE_POLICY = "policy.yaml"  # the gateway's
CONTROLLER_POLICY = "controller-policy.yaml"  # the same bytes, once the gateway serves them
RUN_VERSION = 2  # 2: children carry state/restarts/last_exit; "supervision" summarises them
# What `cohortgate models build` writes (sidecar/demo_models.py): `up` builds these when missing.
DEMO_MODELS = frozenset({"tabular-control", "tabular-canary", "tabular-challenger", "mlp-4x512"})

_WATCH_S = 0.1  # how often a dead child is noticed (restart latency) and the loop looks around
_POLICY_POLL_S = 1.0
_MAX_UDS = 100  # sun_path holds 108 bytes; keep a margin


@dataclass(frozen=True, slots=True)
class StackOptions:
    """What `cohortgate up` was asked for; ``None`` ports mean "the usual one, else a free one"."""

    policy: Path
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    certs_dir: Path | None = None  # default: the directory of the policy's jwks file, else certs/
    redis: str | None = None
    transport: str = "grpc"
    canary_fault_rate: float = 0.0
    canary_fault_after_s: float = 0.0  # the canary is healthy this long from its first request (the demo)
    free_ports: bool = False  # every port a free one (tests, stacks side by side)
    envoy_port: int | None = None
    controller_port: int | None = None
    dashboard_port: int | None = None
    gateway_metrics_port: int | None = None
    concurrency: int = 1
    gateway_workers: int = 1  # `cohortgate gateway --workers`; Envoy gets one processor endpoint each
    delta_cds: bool = True  # Envoy's clusters over the gateway's delta CDS (False: the filesystem-CDS file)
    ready_timeout_s: float = 30.0
    max_restarts: int = DEFAULT_MAX_RESTARTS  # within restart_window_s; more is a crash loop
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    demo: bool = False  # `cohortgate traffic` runs beside the stack, as one more child
    demo_drift: str = ""  # the demo traffic's `--drift` (make demo-quality): input drift instead of faults
    warm_spares: bool = True  # one imported Python process per kind, so a restart skips the imports
    otlp_endpoint: str | None = None  # Envoy, the gateway and the sidecars trace to this collector
    trace_sample: float = 0.01  # the share of requests without a sampled traceparent that Envoy traces


class Stack:
    """The whole local stack. ``run()`` starts it, supervises it until a signal, stops it."""

    def __init__(self, options: StackOptions, *, out: IO[str] | None = None) -> None:
        self.opts = options
        self.out = out or sys.stdout
        self._say_lock = threading.Lock()
        self.state_dir = options.state_dir.resolve()
        self.logs_dir = self.state_dir / "logs"
        self.source = options.policy.resolve()
        self.run_path = self.state_dir / RUN_FILE
        self.sidecars: dict[tuple[Any, ...], tuple[SidecarSpec, int]] = {}  # spec.key -> (spec, port)
        self.ports: dict[str, int] = {}
        self._taken: set[int] = set()
        self._signal: str | None = None
        self._t0 = time.monotonic()
        self.live = LivePolicy(
            self.source,
            self.state_dir / EFFECTIVE_POLICY,
            self.state_dir / CONTROLLER_POLICY,
            gateway_health="",  # set once the ports are chosen
            gateway_metrics="",
        )
        self.certs: Any = None
        self.layout: Layout | None = None
        self.supervisor = Supervisor(
            restart_policy=RestartPolicy(max_restarts=options.max_restarts, window_s=options.restart_window_s),
            ready_timeout_s=options.ready_timeout_s,
            report=self.progress,
            on_change=self._on_supervision_change,
        )
        self._socket_dir: Path | None = None
        self._own_socket_dir = False
        self._audit_seen: set[str] = set()
        self._wrote_run = False
        self._up = False
        self._stopping = False
        self._audit_since = time.time()  # a restarted stack does not replay the old decisions

    @property
    def policy(self) -> Policy | None:
        """The effective policy serving now."""
        return self.live.policy

    # ------------------------------------------------------------------ output

    def say(self, message: str) -> None:
        with self._say_lock:  # the audit thread prints too: whole lines, never two run together
            print(message, file=self.out, flush=True)

    def progress(self, message: str) -> None:
        self.say(f"[{time.monotonic() - self._t0:5.1f}s] {message}")

    # ------------------------------------------------------------------ life

    def run(self) -> int:
        """The whole life of the stack; returns the exit status for `cohortgate up`."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        try:
            try:
                self._prepare()
                self._start_all()
            except Interrupted:
                self.progress(f"{self._signal}: stopping before the stack was up")
                self._stop_all()
                return 0
            self._up = True
            self.write_run_file()
            took = time.monotonic() - self._t0
            for line in banner.banner(self.run_info(), self._banner_facts(took)):
                self.say(line)
            tune_collector()  # up's entry point: a first policy edit otherwise waited ~0.4 s on a full collection
            if self.opts.demo:
                self._start_demo_traffic()
            if self.opts.warm_spares:
                self.supervisor.enable_spares()
            self._watch()
            self.progress(f"{self._signal or 'stop'}: stopping the stack")
            self._stop_all()
            self.progress("stopped; every child has exited")
            return 0
        except ChildFailed as exc:
            self._report_failure(exc)
            self._stop_all()
            return 1
        except (StackError, PolicyError) as exc:
            self.say(f"cohortgate up: {exc}")
            self._stop_all()
            return 2
        except BaseException:
            self._stop_all()
            raise
        finally:
            if self._wrote_run:
                with contextlib.suppress(FileNotFoundError):
                    self.run_path.unlink()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._cleanup_socket_dir()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.live.force_look()
            self.live.edited.set()
            return
        if self._stopping and signum == signal.SIGINT:  # a second Ctrl-C: no more patience
            self.say("second interrupt: killing every child now")
            self.supervisor.kill_all()
            return
        self._signal = signal.Signals(signum).name
        self.supervisor.request_stop()
        self.live.edited.set()  # the watch loop waits on it: wake it to stop

    def _report_failure(self, exc: ChildFailed) -> None:
        self.say(f"cohortgate up: {exc.name} {exc.reason}")
        if exc.log_path is not None:
            self.say(f"--- last lines of {banner.rel(exc.log_path)} ---")
        if exc.tail:
            self.say(exc.tail)
            self.say("---")
        self.say("stopping the rest of the stack")

    def _on_supervision_change(self) -> None:
        if self._up and not self._stopping:
            self.write_run_file()

    # ------------------------------------------------------------------ prepare

    def _prepare(self) -> None:
        raw = self.live.read_source()  # first: a missing policy is the one thing to say
        source_policy = self.live.parse_source(raw)
        self._check_running_stack()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.run_path.unlink()  # a reader must never mistake a stale file for this stack
        self.progress(f"policy {banner.rel(self.source)}: {len(source_policy.routes)} routes")
        self._previous_state()
        self._ensure_certs(source_policy)
        specs = self.specs(source_policy)
        self.ensure_models(specs)
        if self.opts.redis:
            self._check_redis(self.opts.redis)
        for spec in specs:
            self.sidecars[spec.key] = (spec, self.port(spec.port, spec.name))
        o = self.opts
        for key, asked, usual, what in (
            ("controller", o.controller_port, DEFAULT_CONTROLLER_PORT, "the controller"),
            ("envoy", o.envoy_port, DEFAULT_ENVOY_PORT, "Envoy"),
            ("dashboard", o.dashboard_port, DEFAULT_DASHBOARD_PORT, "the dashboard"),
            ("gateway_metrics", o.gateway_metrics_port, DEFAULT_GATEWAY_METRICS_PORT, "the gateway's metrics"),
        ):
            self.ports[key] = self.port(asked, what, usual=False) if asked else self.port(usual, what)
        self.layout = Layout(
            state_dir=self.state_dir,
            certs_dir=Path(self.certs.dir),
            ports=dict(self.ports),
            processor_socket=self._socket_path("processor.sock"),
            als_socket=self._socket_path("als.sock"),
            gateway_policy=self.live.gateway_file,
            controller_policy=self.live.controller_file,
            transport=o.transport,
            redis=o.redis,
            unit_salt=self._unit_salt(),
            exposure_key=self._exposure_key(),
            canary_fault_after_s=o.canary_fault_after_s,
            otlp_endpoint=o.otlp_endpoint,
            trace_sample=o.trace_sample,
            gateway_workers=o.gateway_workers,
            delta_cds=o.delta_cds,
        )
        self.live.gateway_health = self.layout.gateway_health
        self.live.gateway_metrics = self.layout.gateway_metrics
        self.live.controller_api = self.layout.controller_api
        self.live.install(raw, source_policy, self._url_map())

    def _previous_state(self) -> None:
        """The controller's states from an earlier run (embedded): the demo starts afresh; otherwise
        they stand, since a rollback is a safety decision, and `up` says which variants are off."""
        files = (self.state_dir / "state.json", self.state_dir / "gateway-state.json")
        if self.opts.demo and not self.opts.redis:
            for path in (*files, self.state_dir / "outcomes.jsonl"):  # the demo's experiment starts afresh too
                path.unlink(missing_ok=True)
            return
        states, safe_mode = read_states(files[0])
        if safe_mode is not None:
            self.progress(
                f"SAFE MODE: {safe_mode}; every challenger serves 0 % until `cohortgate resume ROUTE VARIANT`"
            )
        for route, state in sorted(states.items()):
            for variant, v in sorted(state.variants.items()):
                if v.phase in (RolloutPhase.ROLLED_BACK, RolloutPhase.HALTED):
                    self.progress(
                        f"note: {route}/{variant} is {v.phase.value.replace('_', ' ')} since an earlier run "
                        f"(`cohortgate resume {route}` restarts it)"
                    )

    def _check_running_stack(self) -> None:
        try:
            run = json.loads((self.state_dir / RUN_FILE).read_text())
            pid = int(run["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid != os.getpid() and pid_alive(pid):
            raise StackError(
                f"a stack is already running from {banner.rel(self.state_dir)} (pid {pid}); stop it first "
                f"(kill {pid}) or pass another --state-dir"
            )

    def port(self, preferred: int | None, what: str = "", *, usual: bool = True) -> int:
        """``preferred`` when free, else a free one. A port asked for by a flag (``usual=False``) is
        tried even with ``--free-ports``, which only skips the usual ones."""
        wanted = None if self.opts.free_ports and usual else preferred
        port = choose_port(wanted, taken=self._taken, is_free=probes.port_is_free, any_free=probes.any_free_port)
        if wanted and port != wanted and what:
            self.progress(f"port {wanted} is taken: {what} gets {port}")
        return port

    def specs(self, policy: Policy) -> tuple[SidecarSpec, ...]:
        rate = self.opts.canary_fault_rate
        rates = dict.fromkeys(canary_variants(policy), rate) if rate > 0 else {}
        return sidecar_specs(policy, fault_rates=rates)

    def _certs_dir(self, policy: Policy) -> Path:
        if self.opts.certs_dir is not None:
            return self.opts.certs_dir.resolve()
        if not policy.jwt.jwks.startswith("https://"):
            return Path(policy.jwt.jwks).parent
        return Path("certs").resolve()

    def _ensure_certs(self, policy: Policy) -> None:
        from cohortgate.deploy import pki

        directory = self._certs_dir(policy)
        try:
            self.certs = pki.load_cert_paths(directory)
            if DEMO_CLIENT not in self.certs.clients:
                raise FileNotFoundError(DEMO_CLIENT)
            self.progress(f"certificates: {banner.rel(directory)}")
        except FileNotFoundError:
            written: list[Path] = []
            self.certs = pki.init_certs(directory, on_write=written.append)
            self.progress(f"certificates: minted {len(written)} files (CA, TLS, JWT key) into {banner.rel(directory)}")
        if not policy.jwt.jwks.startswith("https://") and Path(policy.jwt.jwks) != self.certs.jwks.resolve():
            self.progress(
                f"note: the policy verifies tokens with {banner.rel(policy.jwt.jwks)}, "
                f"not {banner.rel(self.certs.jwks)}"
            )

    def ensure_models(self, specs: Iterable[SidecarSpec]) -> None:
        specs = list(specs)
        files = {local_model_file(s.model_path) for s in specs}  # None: remote, the sidecar fetches it
        files |= {Path(s.contract) for s in specs if s.contract and not is_inline(s.contract)}
        missing = sorted(p for p in files if p is not None and not p.exists())
        if not missing:
            return
        from sidecar.demo_models import DEMO_CONTRACT, build_models

        demo = [p for p in missing if p.stem in DEMO_MODELS or p.name == DEMO_CONTRACT]
        for directory in sorted({p.parent for p in demo}):
            started = time.monotonic()
            self.progress(f"models: building the demo models into {banner.rel(directory)} ...")
            built = build_models(directory)
            made = [m.path.name for m in built if not m.skipped]
            self.progress(f"models: built {', '.join(made) or 'nothing'} in {time.monotonic() - started:.1f}s")
        still = [p for p in missing if not p.exists()]
        if still:
            raise StackError(
                "model or contract files missing (and not demo ones that `cohortgate models build` makes): "
                + ", ".join(banner.rel(p) for p in still)
            )

    def _check_redis(self, url: str) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        except Exception as exc:  # redis raises its own tree; any failure means "not usable"
            raise StackError(f"cannot reach Redis at {url}: {exc}") from None
        finally:
            client.close()
        self.progress(f"redis: {url} answers")

    def _unit_salt(self) -> str:
        """``$COHORTGATE_UNIT_SALT``, else one kept in the state dir: unit hashes survive a restart."""
        return self._kept_secret(UNIT_SALT_ENV, "unit.salt", lambda: secrets.token_hex(32))

    def _exposure_key(self) -> str:
        """``$COHORTGATE_EXPOSURE_KEY``, else one kept in the state dir (0600, never printed): the
        gateway mints each response's exposure token with it, the controller verifies outcomes."""
        return self._kept_secret(EXPOSURE_KEY_ENV, "exposure.key", lambda: secrets.token_urlsafe(32))

    def _kept_secret(self, env: str, name: str, new: Callable[[], str]) -> str:
        """The environment's value, else the state dir's file ``name`` (made with ``new()``, 0600)."""
        if os.environ.get(env):
            return os.environ[env]
        path = self.state_dir / name
        with contextlib.suppress(FileNotFoundError):
            value = path.read_text().strip()
            if value:
                return value
        value = new()
        write_atomic(path, value.encode() + b"\n", 0o600)
        return value

    def _url_map(self) -> dict[str, str]:
        return {spec.url: f"http://127.0.0.1:{port}" for spec, port in self.sidecars.values()}

    # ------------------------------------------------------------------ sockets of the gateway and ALS

    def _socket_path(self, name: str) -> str:
        path = self.state_dir / name
        if len(str(path)) <= _MAX_UDS:
            return str(path)
        if self._socket_dir is None:  # a private directory of our own (0700), removed on exit
            self._socket_dir = Path(tempfile.mkdtemp(prefix="cohortgate-"))
            self._own_socket_dir = True
        return str(self._socket_dir / name)

    def _cleanup_socket_dir(self) -> None:
        if self._own_socket_dir and self._socket_dir is not None:
            for p in self._socket_dir.glob("*.sock"):
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()

    # ------------------------------------------------------------------ children

    def _sidecar_child(self, spec: SidecarSpec, port: int) -> Child:
        assert self.layout is not None
        recipe = recipes.sidecar_recipe(spec, port, self.layout)
        return Child(recipe, probes.sidecar_ready(recipe.endpoint))

    def _controller_child(self) -> Child:
        layout = self.layout
        assert layout is not None
        return Child(
            recipes.controller_recipe(layout),
            probes.controller_ready(layout.controller_api, layout.als_socket, layout.dashboard),
        )

    def _gateway_child(self, files: EnvoyFiles) -> Child:
        layout = self.layout
        assert layout is not None
        return Child(
            recipes.gateway_recipe(layout, files.cds),
            probes.gateway_ready(layout.processor_sockets[0], layout.gateway_health),
        )

    def _envoy_child(self, files: EnvoyFiles) -> Child:
        assert self.layout is not None
        recipe = recipes.envoy_recipe(self.layout, files.bootstrap, files.cds, self.opts.concurrency)
        return Child(recipe, make_process=lambda: EnvoyRunner(files, recipe.log_path, self.opts.concurrency))

    def _render_envoy(self) -> EnvoyFiles:
        """Envoy's bootstrap and CDS files (slow to import: runs in a thread while the rest starts)."""
        from cohortgate.deploy.envoy import JSON_CDS_FILE, AccessLogTarget, ProcessorAddress, TraceCollector, render

        assert self.policy is not None and self.layout is not None
        return render(  # traffic stats made at first use: a 1 000-route edit is ~4x faster in Envoy
            self.policy,
            xds_socket=self.layout.xds_socket if self.layout.delta_cds else None,  # only changed clusters travel
            cds_file=JSON_CDS_FILE,
            deferred_stats=True,
            certs=self.certs,
            out_dir=self.state_dir / "envoy",
            processor=ProcessorAddress(uds=self.layout.processor_socket, workers=self.layout.gateway_workers),
            transport=self.opts.transport,  # type: ignore[arg-type]
            listen_port=self.ports["envoy"],
            admin_socket=self.layout.admin_socket,
            access_log=AccessLogTarget(uds=self.layout.als_socket),
            concurrency=self.opts.concurrency,
            tracing=(
                TraceCollector.parse(self.opts.otlp_endpoint, self.opts.trace_sample)
                if self.opts.otlp_endpoint
                else None
            ),
        )

    def _start_all(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cohortgate-render") as pool:
            envoy_files = pool.submit(self._render_envoy)
            try:
                # The sidecars and the controller need nothing from each other to become ready.
                sidecars = [self._sidecar_child(spec, port) for spec, port in self.sidecars.values()]
                what = f"{len(sidecars)} model sidecars and the controller" if sidecars else "the controller"
                self._start_and_wait([*sidecars, self._controller_child()], what)
                files = envoy_files.result()
            except BaseException:
                envoy_files.cancel()
                raise
        self._start_and_wait([self._gateway_child(files)], "gateway")
        self._start_and_wait([self._envoy_child(files)], "Envoy")

    def _start_and_wait(self, group: list[Child], what: str) -> None:
        self.progress(f"starting {what} ...")
        self.supervisor.start(group)

        def ready(child: Child) -> None:
            took = time.monotonic() - child.started_at
            self.progress(f"  {child.name:<34} ready  {child.endpoint}  (pid {child.pid}, {took:.1f}s)")

        self.supervisor.wait_ready(group, ready)

    # What LivePolicy needs of the stack (livepolicy.StackOps).

    def start_sidecars(self, sidecars: Sequence[tuple[SidecarSpec, int]]) -> list[Child]:
        children = [self._sidecar_child(spec, port) for spec, port in sidecars]
        try:
            self._start_and_wait(children, f"{len(children)} new sidecar(s)")
        except BaseException:
            self.retire(children, 0)
            raise
        return children

    def retire(self, children: Sequence[Child], grace_s: float) -> None:
        """Stop sidecars no policy names any more, after ``grace_s`` (requests routed to them finish)."""
        if not children:
            return
        if grace_s:
            with contextlib.suppress(Interrupted):
                self.sleep(grace_s)
        self.supervisor.retire(children, timeout=SIDECAR_DRAIN_S + 2)

    def child_name_taken(self, name: str) -> bool:
        return self.supervisor.get(name) is not None

    def find_child(self, name: str) -> Child | None:
        return self.supervisor.get(name)

    def tick(self) -> None:
        self.supervisor.tick()

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` while supervising (a child dying meanwhile is restarted)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.supervisor.tick()
            self.supervisor.sleep(min(POLL_S, left))

    def _demo_model(self) -> str | None:
        assert self.policy is not None
        named = [n for r in self.policy.routes if (n := oip_model_name(r))]
        return "tabular" if "tabular" in named else (named[0] if named else None)

    def _start_demo_traffic(self) -> None:
        """The demo's load, as a child like the others: `up` stops it first and restarts it if it dies."""
        assert self.layout is not None
        assert self.policy is not None
        experiment = shoppers.demo_outcomes(self.policy)
        recipe: Recipe = recipes.traffic_recipe(
            self.layout, self._demo_model() or "tabular", experiment[1] if experiment else None, self.opts.demo_drift
        )
        self._start_and_wait([Child(recipe, probes.always_ready)], "demo traffic")
        self.write_run_file()
        for line in banner.demo_lines(
            [s for s, _ in self.sidecars.values()],
            fault_after_s=self.opts.canary_fault_after_s,
            traffic_log=recipe.log_path,
            dashboard=self.layout.dashboard,
            status=banner.status_command(self.ports["controller"], self.state_dir),
            experiment=experiment,
            drift=self.opts.demo_drift,
        ):
            self.say(line)

    # ------------------------------------------------------------------ running

    def _watch(self) -> None:
        audit = threading.Thread(target=self._audit_loop, name="cohortgate-up-audit", daemon=True)
        audit.start()
        next_look = time.monotonic()
        while not self.supervisor.stop_requested.is_set():
            self.supervisor.tick()
            if self.live.stamp is None or time.monotonic() >= next_look:
                next_look = time.monotonic() + _POLICY_POLL_S
                with contextlib.suppress(Interrupted):
                    self.live.follow(self)
            if self.live.edited.wait(_WATCH_S):  # a source edit (or a stop) wakes the loop at once
                self.live.edited.clear()

    def _audit_loop(self) -> None:
        """`_follow_audit` once a second, in its own thread: a busy controller (1 000 routes) took
        0.5-0.8 s to answer, and a policy edit arriving meanwhile waited for it in `_watch`."""
        while not self.supervisor.stop_requested.wait(_POLICY_POLL_S):
            with contextlib.suppress(Exception):  # it only prints; the next look tries again
                self._follow_audit()

    def _follow_audit(self) -> None:
        """Print the controller's new decisions (rollbacks, promotions), so the demo shows them."""
        controller = self.supervisor.get("controller")
        if controller is None or controller.phase is not Phase.READY:
            return
        try:
            token = Path(controller.info["token_file"]).read_text().strip()
        except OSError:
            return
        status, body = probes.get(f"{controller.endpoint}/audit?limit=50", headers={"authorization": f"Bearer {token}"})
        if status != 200:
            return
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            records = [r for r in json.loads(body).get("records", []) if isinstance(r, dict)]
            for record in reversed(records):  # oldest first
                key = json.dumps(record, sort_keys=True)
                if key in self._audit_seen:
                    continue
                self._audit_seen.add(key)
                if float(record.get("ts", 0)) >= self._audit_since:
                    self.progress(f"controller: {describe_audit(record)}")

    # ------------------------------------------------------------------ stopping

    def _stop_all(self) -> None:
        """Envoy first (drained), then the gateway, the controller, and the sidecars (they drain)."""
        self._stopping = True
        self.supervisor.stop_all()

    # ------------------------------------------------------------------ run.json

    def run_info(self) -> dict[str, Any]:
        certs, layout = self.certs, self.layout
        assert layout is not None and self.policy is not None
        children = {name: child.describe() for name, child in self.supervisor.children.items()}
        return {
            "version": RUN_VERSION,
            "pid": os.getpid(),
            "started_at": time.time() - (time.monotonic() - self._t0),
            "state_dir": str(self.state_dir),
            "policy": {
                "source": str(self.source),
                "effective": str(self.live.gateway_file),
                "controller": str(self.live.controller_file),
                "digest": self.policy.digest,
            },
            "transport": self.opts.transport,
            "redis": self.opts.redis,
            "endpoints": {
                "gateway": layout.gateway_url,
                "envoy_admin": layout.envoy_admin,
                "controller_api": layout.controller_api,
                "dashboard": layout.dashboard,
                "gateway_metrics": layout.gateway_metrics,
                "processor": f"uds:{layout.processor_socket}",
                "access_log": f"uds:{layout.als_socket}",
            },
            "ports": {
                "envoy": self.ports["envoy"],
                "controller": self.ports["controller"],
                "dashboard": self.ports["dashboard"],
                "gateway_metrics": self.ports["gateway_metrics"],
                **{spec.name: port for spec, port in self.sidecars.values()},
            },
            "certs": {
                "dir": str(certs.dir.resolve()),
                "trust_domain": certs.trust_domain,
                "ca": str(certs.ca_cert.resolve()),
                "jwks": str(certs.jwks.resolve()),
                "jwt_key": str(certs.jwt_key.resolve()),
                "clients": {
                    name: {"cert": str(Path(c).resolve()), "key": str(Path(k).resolve())}
                    for name, (c, k) in certs.clients.items()
                },
            },
            "admin_token_file": str(layout.token_file),
            "logs": str(self.logs_dir),
            "children": children,
            "supervision": {
                "restarts": sum(c["restarts"] for c in children.values()),
                "failed": sorted(n for n, c in children.items() if c["state"] == Phase.FAILED.value),
                "max_restarts": self.opts.max_restarts,
                "window_s": self.opts.restart_window_s,
                "spares": self.supervisor.spare_states(),
            },
        }

    def write_run_file(self) -> None:
        data = json.dumps(self.run_info(), indent=2).encode() + b"\n"
        write_atomic(self.run_path, data, 0o600)
        self._wrote_run = True

    def _banner_facts(self, took_s: float) -> banner.BannerFacts:
        assert self.policy is not None
        return banner.BannerFacts(
            took_s=took_s,
            transport=self.opts.transport,
            redis=self.opts.redis,
            state_dir=self.state_dir,
            sidecars=list(self.sidecars.values()),
            model=self._demo_model(),
            issuer=self.policy.jwt.issuer,
            audience=self.policy.jwt.audience[0] if self.policy.jwt.audience else banner.DEFAULT_AUDIENCE,
        )
