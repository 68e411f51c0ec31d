"""`cohortgate up`'s supervisor: start the planned stack in order, watch it, stop it.

The plan (which sidecars, on which ports, the effective policy) is pure and lives in
`gateway/stackplan.py`. `Stack` does the I/O: builds missing demo models and certificates, starts
the children in dependency order and waits for each to be ready (sidecars and controller, then
the gateway, Envoy last: its ext_proc filter fails closed, so it must never listen before the
gateway answers), writes ``<state-dir>/run.json``, follows edits of the source policy, and stops
everything in reverse order on SIGINT/SIGTERM (Envoy drains first, the sidecars drain last). A
child that dies takes the whole stack down with its name and log tail: never half a stack.

Exceptions (`StackError` is a `CohortgateError`)::

    StackError           the stack cannot be planned or prepared (bad policy, a model missing, ...)
    └── ChildFailed      a child exited or never became ready; carries its name and log tail
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from cohortgate.core.contract import API_ENV, REDIS_ENV, TOKEN_FILE_ENV, UNIT_SALT_ENV
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.local.client import DEFAULT_CLIENT as DEMO_CLIENT
from cohortgate.local.client import DEFAULT_STATE_DIR, RUN_FILE, describe_audit, pid_alive
from cohortgate.local.plan import (
    SidecarSpec,
    StackError,
    canary_variants,
    choose_port,
    effective_policy_data,
    oip_model_name,
    sidecar_specs,
    url_key,
)
from cohortgate.support import http
from cohortgate.support.files import FileStamp, write_atomic

if TYPE_CHECKING:
    from cohortgate.deploy.envoy import EnvoyFiles

DEFAULT_ENVOY_PORT = 8443
DEMO_BAD_SHARE = 0.03  # the demo's traffic includes a few misbehaving clients, so denials show too
DEFAULT_ADMIN_PORT = 9901
DEFAULT_CONTROLLER_PORT = 9480
DEFAULT_DASHBOARD_PORT = 9481
DEFAULT_GATEWAY_METRICS_PORT = 9482
EFFECTIVE_POLICY = "policy.yaml"
RUN_VERSION = 1
# What `cohortgate models build` writes (sidecar/demo_models.py): `up` builds these when missing.
DEMO_MODELS = frozenset({"tabular-control", "tabular-canary", "tabular-challenger", "mlp-4x512"})

ENVOY_DRAIN_S = 2.0  # --drain-time-s: how long Envoy discourages keep-alive after a graceful drain
SIDECAR_DRAIN_S = 10.0
GATEWAY_SWITCH_S = 10.0  # a policy edit: the gateway confirms new clusters with Envoy (5 s at most), then swaps
RELOAD_GRACE_S = 2.0  # the gateway's --reload-grace: how long a dropped cluster stays in Envoy
_POLL_S = 0.05
_WATCH_S = 0.2
_POLICY_POLL_S = 1.0
_MAX_UDS = 100  # sun_path holds 108 bytes; keep a margin
# Probes go to loopback only: never let an http_proxy variable route them elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# `up` passes these explicitly (or means "none"): a child must not pick them up from the shell.
_NOT_INHERITED = {REDIS_ENV, TOKEN_FILE_ENV, API_ENV, UNIT_SALT_ENV}


class ChildFailed(StackError):
    """A child exited or never became ready. ``name`` is the child's, ``tail`` its last log lines."""

    def __init__(self, name: str, reason: str, tail: str = "", log_path: Path | None = None) -> None:
        self.name = name
        self.reason = reason
        self.tail = tail
        self.log_path = log_path
        super().__init__(f"{name} {reason}")


# ================================================================================ sockets


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``host:port`` now (SO_REUSEADDR, as aiohttp and Envoy set it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    # Linux lets SO_REUSEADDR sockets bind beside a listener on the wildcard address; connect too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) != 0


def any_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 1.0) -> bool:
    return 200 <= _http("GET", url, timeout)[0] < 300


def unix_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ================================================================================ children


def _inherited_env() -> dict[str, str]:
    """Our environment minus the variables that would make a child disagree with `up`'s flags."""
    return {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
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


class Child:
    """One supervised process: its own session (a terminal's Ctrl-C reaches only `up`), its own log."""

    def __init__(
        self,
        name: str,
        kind: str,
        argv: Sequence[str],
        log_path: Path,
        ready: Callable[[], bool],
        *,
        endpoint: str = "",
        env: Mapping[str, str] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.argv = list(argv)
        self.log_path = log_path
        self.ready = ready
        self.endpoint = endpoint
        self.env = dict(env or {})
        self.info = dict(info or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_inherited_env(), "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                assert self.proc is not None
                self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        """True when the process has exited within ``timeout``."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.wait(5)

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
        return {
            "kind": self.kind,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "log": str(self.log_path),
            "argv": self.argv,
            **self.info,
        }


# ================================================================================ the stack


@dataclass(frozen=True, slots=True)
class StackOptions:
    """What `cohortgate up` was asked for; ``None`` ports mean "the usual one, else a free one"."""

    policy: Path
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    certs_dir: Path | None = None  # default: the directory of the policy's jwks file, else certs/
    redis: str | None = None
    transport: str = "grpc"
    canary_fault_rate: float = 0.0
    canary_fault_after_s: float = 0.0  # the canary is healthy this long first (the demo shows it go bad)
    free_ports: bool = False  # every port a free one (tests, stacks side by side)
    envoy_port: int | None = None
    admin_port: int | None = None
    controller_port: int | None = None
    concurrency: int = 1
    ready_timeout_s: float = 30.0
    demo: bool = False  # `cohortgate traffic` runs beside the stack, as one more child


def _rel(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies below it (for copy-paste), else absolute."""
    p = Path(path)
    with contextlib.suppress(ValueError):
        rel = p.resolve().relative_to(Path.cwd().resolve())
        return str(rel)
    return str(p)


def _rel_uds(spec: str) -> str:
    return f"uds:{_rel(spec[4:])}" if spec.startswith("uds:") else spec


class _Stopped(Exception):
    """A signal asked the stack to stop while it was starting."""


class Stack:
    """The whole local stack. ``run()`` starts it, watches it until a signal or a failure, stops it."""

    def __init__(self, options: StackOptions, *, out: IO[str] | None = None) -> None:
        self.opts = options
        self.out = out or sys.stdout
        self.state_dir = options.state_dir.resolve()
        self.logs_dir = self.state_dir / "logs"
        self.source = options.policy.resolve()
        self.effective_path = self.state_dir / EFFECTIVE_POLICY
        self.run_path = self.state_dir / RUN_FILE
        self.children: dict[str, Child] = {}
        self.sidecars: dict[tuple[Any, ...], tuple[SidecarSpec, int]] = {}  # spec.key -> (spec, port)
        self.ports: dict[str, int] = {}
        self._taken: set[int] = set()
        self._stop = threading.Event()
        self._signal: str | None = None
        self._t0 = time.monotonic()
        self._policy_stamp: FileStamp | None = None
        self._source_digest = ""
        self.policy: Policy | None = None  # the effective policy serving now
        self.certs: Any = None
        self._socket_dir: Path | None = None
        self._own_socket_dir = False
        self._audit_seen: set[str] = set()
        self._wrote_run = False
        self._stopping = False
        self._audit_since = time.time()  # a restarted stack does not replay the old decisions

    # ------------------------------------------------------------------ output

    def say(self, message: str) -> None:
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
            except _Stopped:
                self.progress(f"{self._signal}: stopping before the stack was up")
                self._stop_all()
                return 0
            self._write_run_file()
            self._print_banner()
            if self.opts.demo:
                self._start_demo_traffic()
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
            self._policy_stamp = None  # re-read the policy at the next look
            return
        if self._stopping and signum == signal.SIGINT:  # a second Ctrl-C: no more patience
            self.say("second interrupt: killing every child now")
            for child in self.children.values():
                child.send(signal.SIGKILL)
            return
        self._signal = signal.Signals(signum).name
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _report_failure(self, exc: ChildFailed) -> None:
        self.say(f"cohortgate up: {exc.name} {exc.reason}")
        if exc.log_path is not None:
            self.say(f"--- last lines of {_rel(exc.log_path)} ---")
        if exc.tail:
            self.say(exc.tail)
            self.say("---")
        self.say("stopping the rest of the stack")

    # ------------------------------------------------------------------ prepare

    def _prepare(self) -> None:
        self._check_running_stack()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.run_path.unlink()  # a reader must never mistake a stale file for this stack
        self._previous_state()
        raw = self._read_source()
        source_policy = parse_policy(raw, filename=str(self.source), base_dir=self.source.parent)
        self.progress(f"policy {_rel(self.source)}: {len(source_policy.routes)} routes")
        self._ensure_certs(source_policy)
        specs = self._specs(source_policy)
        self._ensure_models(specs)
        if self.opts.redis:
            self._check_redis(self.opts.redis)
        for spec in specs:
            self.sidecars[spec.key] = (spec, self._port(spec.port, spec.name))
        self.ports["controller"] = self._port(self.opts.controller_port or DEFAULT_CONTROLLER_PORT, "the controller")
        self.ports["envoy"] = self._port(self.opts.envoy_port or DEFAULT_ENVOY_PORT, "Envoy")
        self.ports["admin"] = self._port(self.opts.admin_port or DEFAULT_ADMIN_PORT, "Envoy's admin")
        self.ports["dashboard"] = self._port(DEFAULT_DASHBOARD_PORT, "the dashboard")
        self.ports["gateway_metrics"] = self._port(DEFAULT_GATEWAY_METRICS_PORT, "the gateway's metrics")
        self.policy = self._write_effective(raw)
        self._source_digest = source_policy.digest
        self._policy_stamp = self._stamp()
        self._unit_salt()

    def _previous_state(self) -> None:
        """The controller's states from an earlier run (embedded): the demo starts afresh; otherwise
        they stand, since a rollback is a safety decision, and `up` says which variants are off."""
        files = (self.state_dir / "state.json", self.state_dir / "gateway-state.json")
        if self.opts.demo and not self.opts.redis:
            for path in files:
                path.unlink(missing_ok=True)
            return
        try:
            doc = json.loads(files[0].read_text())
        except (OSError, ValueError):
            return
        for route, state in sorted(doc.items()):
            for variant, v in sorted((state.get("variants") or {}).items()):
                if v.get("phase") in ("rolled_back", "halted"):
                    self.progress(
                        f"note: {route}/{variant} is {v['phase'].replace('_', ' ')} since an earlier run "
                        f"(`cohortgate resume {route}` restarts it)"
                    )

    def _read_source(self) -> bytes:
        try:
            return self.source.read_bytes()
        except OSError as exc:
            raise StackError(f"cannot read the policy {_rel(self.source)}: {exc.strerror or exc}") from None

    def _check_running_stack(self) -> None:
        try:
            run = json.loads((self.state_dir / RUN_FILE).read_text())
            pid = int(run["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid != os.getpid() and pid_alive(pid):
            raise StackError(
                f"a stack is already running from {_rel(self.state_dir)} (pid {pid}); stop it first "
                f"(kill {pid}) or pass another --state-dir"
            )

    def _port(self, preferred: int | None, what: str = "") -> int:
        wanted = None if self.opts.free_ports else preferred
        port = choose_port(wanted, taken=self._taken, is_free=port_is_free, any_free=any_free_port)
        if wanted and port != wanted and what:
            self.progress(f"port {wanted} is taken: {what} gets {port}")
        return port

    def _specs(self, policy: Policy) -> tuple[SidecarSpec, ...]:
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
            self.progress(f"certificates: {_rel(directory)}")
        except FileNotFoundError:
            written: list[Path] = []
            self.certs = pki.init_certs(directory, on_write=written.append)
            self.progress(f"certificates: minted {len(written)} files (CA, TLS, JWT key) into {_rel(directory)}")
        if not policy.jwt.jwks.startswith("https://") and Path(policy.jwt.jwks) != self.certs.jwks.resolve():
            self.progress(f"note: the policy verifies tokens with {_rel(policy.jwt.jwks)}, not {_rel(self.certs.jwks)}")

    def _ensure_models(self, specs: Iterable[SidecarSpec]) -> None:
        missing = sorted({Path(s.model_path) for s in specs if not Path(s.model_path).exists()})
        if not missing:
            return
        from sidecar.demo_models import build_models

        for directory in sorted({p.parent for p in missing if p.stem in DEMO_MODELS}):
            started = time.monotonic()
            self.progress(f"models: building the demo models into {_rel(directory)} ...")
            built = build_models(directory)
            made = [m.path.name for m in built if not m.skipped]
            self.progress(f"models: built {', '.join(made) or 'nothing'} in {time.monotonic() - started:.1f}s")
        still = [p for p in missing if not p.exists()]
        if still:
            raise StackError(
                "model files missing (and not demo models that `cohortgate models build` makes): "
                + ", ".join(_rel(p) for p in still)
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
        if os.environ.get(UNIT_SALT_ENV):
            return os.environ[UNIT_SALT_ENV]
        path = self.state_dir / "unit.salt"
        try:
            salt = path.read_text().strip()
            if salt:
                return salt
        except FileNotFoundError:
            pass
        salt = secrets.token_hex(32)
        write_atomic(path, salt.encode() + b"\n", 0o600)
        return salt

    # ------------------------------------------------------------------ the effective policy

    def _url_map(self) -> dict[str, str]:
        return {spec.url: f"http://127.0.0.1:{port}" for spec, port in self.sidecars.values()}

    def _effective_text(self, raw: bytes) -> str:
        data = yaml.safe_load(raw)
        if not isinstance(data, dict):
            raise StackError(f"{_rel(self.source)} is not a mapping")
        effective = effective_policy_data(data, self.source.parent, self._url_map())
        header = (
            f"# Effective policy written by `cohortgate up` from {self.source}.\n"
            "# Backend URLs point at the ports the sidecars bound; file paths are absolute.\n"
            "# Edit the source file, not this one: `up` rewrites this file when the source changes.\n"
        )
        return header + yaml.safe_dump(effective, sort_keys=False, allow_unicode=True)

    def _write_effective(self, raw: bytes) -> Policy:
        text = self._effective_text(raw)
        policy = parse_policy(text.encode(), filename=str(self.effective_path), base_dir=self.state_dir)
        write_atomic(self.effective_path, text.encode())
        return policy

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

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cohortgate.cli", *args]

    def _sidecar_child(self, spec: SidecarSpec, port: int) -> Child:
        argv = self._cli(
            "sidecar",
            "--model", spec.model_path,
            "--name", spec.model_name,
            "--port", str(port),
            "--variant", spec.variant,
            "--threads", "1",
            "--drain-timeout", str(SIDECAR_DRAIN_S),
            "--report-to", self.opts.redis or f"http://127.0.0.1:{self.ports['controller']}/reports",
        )  # fmt: skip
        if spec.fault_rate > 0:
            argv += ["--fault-rate", str(spec.fault_rate), "--fault-after", str(self.opts.canary_fault_after_s)]
        url = f"http://127.0.0.1:{port}"
        return Child(
            spec.name,
            "sidecar",
            argv,
            self.logs_dir / f"{spec.name}.log",
            lambda: http_ok(f"{url}/v2/health/ready"),
            endpoint=url,
            info={
                "port": port,
                "policy_url": spec.url,
                "route": spec.route,
                "variant": spec.variant,
                "shadow": spec.shadow,
                "region": spec.region,
                "model": spec.model_name,
                "model_path": spec.model_path,
                "fault_rate": spec.fault_rate,
            },
            env={TOKEN_FILE_ENV: str(self.state_dir / "admin.token")},  # /reports needs the admin token
        )

    def _controller_child(self) -> Child:
        port = self.ports["controller"]
        als = self._socket_path("als.sock")
        argv = self._cli(
            "controller",
            "--policy", str(self.effective_path),
            "--listen", f"127.0.0.1:{port}",
            "--als", f"uds:{als}",
            "--token-file", str(self.state_dir / "admin.token"),
            "--state-file", str(self.state_dir / "state.json"),
            "--dashboard", f"127.0.0.1:{self.ports['dashboard']}",
            "--allow-actions",  # the dashboard's buttons; each action still needs the admin token
        )  # fmt: skip
        if self.opts.redis:
            argv += ["--redis", self.opts.redis]
        api, dashboard = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{self.ports['dashboard']}/"
        return Child(
            "controller",
            "controller",
            argv,
            self.logs_dir / "controller.log",
            lambda: http_ok(f"{api}/healthz") and unix_accepts(als) and http_ok(dashboard),
            endpoint=api,
            info={
                "port": port,
                "als": f"uds:{als}",
                "token_file": str(self.state_dir / "admin.token"),
                "dashboard": dashboard,
            },
        )

    def _gateway_child(self, envoy: EnvoyFiles) -> Child:
        sock = self._socket_path("processor.sock")
        metrics_port = self.ports["gateway_metrics"]
        metrics = f"http://127.0.0.1:{metrics_port}"
        argv = self._cli(
            "gateway",
            "--policy", str(self.effective_path),
            "--certs", str(self.certs.dir),
            "--transport", self.opts.transport,
            "--listen", f"uds:{sock}",
            "--audit-log", str(self.logs_dir / "audit.jsonl"),
            "--metrics", f"127.0.0.1:{metrics_port}",
            # Policy edits: the gateway watches its file and moves Envoy's clusters two-phase.
            "--envoy-cds", str(envoy.cds),
            "--envoy-admin", f"http://127.0.0.1:{self.ports['admin']}",
            "--reload-grace", str(RELOAD_GRACE_S),
        )  # fmt: skip
        # The gateway follows the controller's weights: in the shared Redis (keeping a local copy of
        # its own), or, embedded, in the state file the controller writes.
        if self.opts.redis:
            argv += ["--redis", self.opts.redis, "--state-file", str(self.state_dir / "gateway-state.json")]
        else:
            argv += ["--state-file", str(self.state_dir / "state.json")]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)  # a stale socket must not pass for a ready gateway
        return Child(
            "gateway",
            "gateway",
            argv,
            self.logs_dir / "gateway.log",
            lambda: unix_accepts(sock) and http_ok(f"{metrics}/healthz"),
            endpoint=f"uds:{sock}",
            env={UNIT_SALT_ENV: self._unit_salt()},
            info={
                "transport": self.opts.transport,
                "audit_log": str(self.logs_dir / "audit.jsonl"),
                "metrics": f"{metrics}/metrics",
                "metrics_port": metrics_port,
            },
        )

    def _render_envoy(self) -> EnvoyFiles:
        """Envoy's bootstrap and CDS files (slow to import: runs in a thread while the rest starts)."""
        from cohortgate.deploy.envoy import AccessLogTarget, ProcessorAddress, render

        assert self.policy is not None
        return render(
            self.policy,
            certs=self.certs,
            out_dir=self.state_dir / "envoy",
            processor=ProcessorAddress(uds=self._socket_path("processor.sock")),
            transport=self.opts.transport,  # type: ignore[arg-type]
            listen_port=self.ports["envoy"],
            admin_port=self.ports["admin"],
            access_log=AccessLogTarget(uds=self._socket_path("als.sock")),
            concurrency=self.opts.concurrency,
        )

    def _envoy_child(self, files: EnvoyFiles) -> Child:
        from cohortgate.deploy.envoyproc import envoy_binary

        argv = [
            envoy_binary(),
            "-c", str(files.bootstrap),
            "--concurrency", str(self.opts.concurrency),
            "--use-dynamic-base-id",
            "--drain-time-s", str(int(ENVOY_DRAIN_S)),
            "--drain-strategy", "immediate",
        ]  # fmt: skip
        admin = f"http://127.0.0.1:{self.ports['admin']}"
        listen = self.ports["envoy"]

        def ready() -> bool:
            status, body = _http("GET", f"{admin}/ready")
            return status == 200 and body.strip() == b"LIVE" and tcp_accepts(listen)

        return Child(
            "envoy",
            "envoy",
            argv,
            self.logs_dir / "envoy.log",
            ready,
            endpoint=f"https://127.0.0.1:{listen}",
            info={
                "port": listen,
                "admin": admin,
                "admin_port": self.ports["admin"],
                "bootstrap": str(files.bootstrap),
                "cds": str(files.cds),
            },
        )

    def _traffic_child(self) -> Child:
        model = self._demo_model() or "tabular"
        argv = self._cli(
            "traffic", "--state-dir", str(self.state_dir), "--model", model, "--duration", "1d",
            "--bad-share", str(DEMO_BAD_SHARE),
        )  # fmt: skip
        return Child("traffic", "traffic", argv, self.logs_dir / "traffic.log", lambda: True, info={"model": model})

    def _start_demo_traffic(self) -> None:
        """The demo's load, as a child like the others: `up` stops it first and reports it if it dies."""
        child = self._traffic_child()
        self._start_and_wait([child], "demo traffic")
        self._write_run_file()
        canaries = [s for s, _ in self.sidecars.values() if s.fault_rate]
        self.say("")
        self.say(f"Demo: `cohortgate traffic` sends 100 req/s from 1000 sticky users (log: {_rel(child.log_path)}).")
        for spec in canaries:
            onset = self.opts.canary_fault_after_s
            when = f" from {onset:g} s after start on" if onset else ""
            self.say(
                f"  {spec.route}/{spec.variant} fails {spec.fault_rate:.0%} of its requests{when}: expect a rollback."
            )
        self.say("Watch the controller roll the canary back within a minute:")
        dashboard = self.run_info()["endpoints"].get("dashboard")
        if dashboard:
            self.say(f"  dashboard:  {dashboard}")
        self.say(f"  {self._status_command()}")
        self.say(f"  tail -f {_rel(child.log_path)}")
        self.say("Decisions also show here, as `controller: rollback ...`.")
        self.say("")

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
        self._check_stop()
        self.progress(f"starting {what} ...")
        for child in group:
            self.children[child.name] = child
            child.start()
        pending = list(group)
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while pending:
            self._check_stop()
            self._check_alive(starting={c.name for c in pending})
            for child in list(pending):
                if child.ready():
                    pending.remove(child)
                    took = time.monotonic() - child.started_at
                    self.progress(f"  {child.name:<34} ready  {child.endpoint}  (pid {child.pid}, {took:.1f}s)")
            if pending and time.monotonic() > deadline:
                late = pending[0]
                raise ChildFailed(
                    late.name,
                    f"was not ready after {self.opts.ready_timeout_s:.0f}s",
                    late.log_tail(),
                    late.log_path,
                )
            if pending:
                self._stop.wait(_POLL_S)

    def _check_alive(self, starting: Collection[str] = ()) -> None:
        for child in self.children.values():
            rc = child.poll()
            if rc is not None:
                when = "while starting" if child.name in starting else "unexpectedly"
                raise ChildFailed(child.name, f"exited {when} with status {rc}", child.log_tail(), child.log_path)

    # ------------------------------------------------------------------ running

    def _watch(self) -> None:
        next_look = time.monotonic() + _POLICY_POLL_S
        while not self._stop.is_set():
            self._check_alive()
            if self._policy_stamp is None or time.monotonic() >= next_look:
                next_look = time.monotonic() + _POLICY_POLL_S
                self._follow_policy()
                self._follow_audit()
            self._stop.wait(_WATCH_S)

    def _follow_audit(self) -> None:
        """Print the controller's new decisions (rollbacks, promotions), so the demo shows them."""
        controller = self.children.get("controller")
        if controller is None:
            return
        try:
            token = Path(controller.info["token_file"]).read_text().strip()
        except OSError:
            return
        status, body = _http(
            "GET", f"{controller.endpoint}/audit?limit=50", headers={"authorization": f"Bearer {token}"}
        )
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

    def _stamp(self) -> FileStamp | None:
        return FileStamp.of(self.source)

    def _follow_policy(self) -> None:
        """Re-validate a changed source policy and apply it; a bad edit keeps the running one."""
        stamp = self._stamp()
        if stamp is None or stamp == self._policy_stamp:
            return
        self._policy_stamp = stamp
        try:
            raw = self._read_source()
        except StackError as exc:
            self.progress(f"policy: {exc}; keeping the running policy")
            return
        if hashlib.sha256(raw).hexdigest() == self._source_digest:
            return
        try:
            source_policy = parse_policy(raw, filename=str(self.source), base_dir=self.source.parent)
            specs = self._specs(source_policy)
            self._ensure_models(specs)
        except (PolicyError, StackError) as exc:
            self.progress(f"policy: edit refused, the running policy stays:\n{exc}")
            return
        self._source_digest = source_policy.digest
        try:
            self._apply(raw, specs)
        except _Stopped:
            return  # a signal arrived while new sidecars were starting: the watch loop stops
        except ChildFailed:
            raise
        except (StackError, PolicyError, OSError) as exc:
            self.progress(f"policy: could not apply the edit, the running policy stays: {exc}")

    def _apply(self, raw: bytes, specs: Sequence[SidecarSpec]) -> None:
        """Start the new sidecars, hand the gateway the new effective policy, stop the unused sidecars.

        The gateway watches its policy file and moves Envoy's clusters two-phase itself (new ones
        confirmed before it switches, dropped ones removed after a grace), so `up` only writes the
        file and waits until the gateway's ``/healthz`` names the new policy.
        """
        wanted = {s.key: s for s in specs}
        removed = [self.sidecars.pop(k) for k in list(self.sidecars) if k not in wanted]
        added = [s for k, s in wanted.items() if k not in self.sidecars]
        new_children = []
        for spec in added:
            if spec.name in self.children:  # the same variant with another model: the old one still runs
                spec = dataclasses.replace(spec, name=f"{spec.name}-{len(self.children)}")
            same_url = any(url_key(spec.url) == url_key(o.url) for o, _ in removed)  # still held by the old one
            port = self._port(None if same_url else spec.port, spec.name)
            self.sidecars[spec.key] = (spec, port)
            new_children.append(self._sidecar_child(spec, port))
        try:
            if new_children:
                self._start_and_wait(new_children, f"{len(new_children)} new sidecar(s)")
            text = self._effective_text(raw)
            new = parse_policy(text.encode(), filename=str(self.effective_path), base_dir=self.state_dir)
        except (_Stopped, StackError, PolicyError):
            self._retire([c for c in new_children if self.children.pop(c.name, None)], grace_s=0)
            for spec in added:
                self.sidecars.pop(spec.key, None)
            self.sidecars.update((spec.key, (spec, port)) for spec, port in removed)
            raise
        assert self.policy is not None
        if new.digest == self.policy.digest:  # e.g. only comments changed
            self.progress(f"policy: {_rel(self.source)} changed, the effective policy did not")
            return
        write_atomic(self.effective_path, text.encode())
        if not self._wait_gateway_policy(new.digest):
            # It may still route to the old sidecars: they keep running, and the gateway's log says why.
            self.sidecars.update((spec.key, (spec, port)) for spec, port in removed)
            self._write_run_file()
            self.progress(
                f"policy: the gateway did not switch to the edit within {GATEWAY_SWITCH_S:.0f}s; "
                f"see {_rel(self.children['gateway'].log_path)}"
            )
            return
        self.policy = new
        self._retire([c for spec, _ in removed if (c := self.children.pop(spec.name, None))], RELOAD_GRACE_S)
        self._write_run_file()
        changes = f"sidecars: {len(added)} started, {len(removed)} stopped" if added or removed else "same sidecars"
        self.progress(f"policy: applied the edit of {_rel(self.source)} ({changes})")

    def _wait_gateway_policy(self, digest: str) -> bool:
        """Whether the gateway's ``/healthz`` names policy ``digest`` within `GATEWAY_SWITCH_S`."""
        healthz = self.children["gateway"].info["metrics"].removesuffix("/metrics") + "/healthz"
        deadline = time.monotonic() + GATEWAY_SWITCH_S
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = _http("GET", healthz)
            with contextlib.suppress(ValueError, AttributeError):
                if status == 200 and digest.startswith(json.loads(body).get("policy") or "-"):
                    return True
            if self._stop.wait(_POLL_S):
                return False
        return False

    def _retire(self, children: Sequence[Child], grace_s: float) -> None:
        """Stop sidecars no policy names any more, after ``grace_s`` (requests routed to them finish)."""
        if children:
            self._stop.wait(grace_s)
        for child in children:
            self._stop_child(child, timeout=SIDECAR_DRAIN_S + 2)

    # ------------------------------------------------------------------ stopping

    def _stop_all(self) -> None:
        """Envoy first (drained), then the gateway, the controller, and the sidecars (they drain)."""
        self._stopping = True
        order = {"traffic": 0, "envoy": 1, "gateway": 2, "controller": 3, "sidecar": 4}
        by_stage: dict[int, list[Child]] = {}
        for child in self.children.values():
            by_stage.setdefault(order.get(child.kind, 9), []).append(child)
        for stage in sorted(by_stage):
            group = [c for c in by_stage[stage] if c.running()]
            if not group:
                continue
            started = time.monotonic()
            if stage == 1:
                for child in group:
                    self._drain_envoy(child)
            for child in group:
                child.send(signal.SIGTERM)
            timeout = SIDECAR_DRAIN_S + 2 if stage == 4 else 10.0
            for child in group:
                if not child.wait(timeout):
                    self.progress(f"  {child.name} ignored SIGTERM for {timeout:.0f}s: killing it")
                    child.kill()
            names = ", ".join(c.name for c in group) if len(group) < 3 else f"{len(group)} {group[0].kind}s"
            self.progress(f"  stopped {names} ({time.monotonic() - started:.1f}s)")
            for child in group:
                if child.kind == "traffic":  # its closing summary: what the demo did
                    tail = child.log_tail(40)
                    self.say(tail[tail.rfind("total:") :] if "total:" in tail else tail)
        for child in self.children.values():  # reap anything that exited on its own
            child.wait(1)

    def _stop_child(self, child: Child, timeout: float) -> None:
        child.send(signal.SIGTERM)
        if not child.wait(timeout):
            child.kill()

    def _drain_envoy(self, child: Child) -> None:
        """Admin ``/drain_listeners?graceful`` (connections told to close), wait for in-flight requests."""
        admin = child.info.get("admin")
        if not admin:
            return
        status, _ = _http("POST", f"{admin}/drain_listeners?graceful")
        if status != 200:
            return
        deadline = time.monotonic() + ENVOY_DRAIN_S
        while time.monotonic() < deadline and child.running():
            status, body = _http("GET", f"{admin}/stats?filter=^http\\.cohortgate\\.downstream_rq_active$")
            match = re.search(rb"downstream_rq_active: (\d+)", body) if status == 200 else None
            if match is None or int(match.group(1)) == 0:
                return
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ run.json and the banner

    def run_info(self) -> dict[str, Any]:
        certs = self.certs
        envoy = self.children.get("envoy")
        controller = self.children.get("controller")
        gateway = self.children.get("gateway")
        assert envoy is not None and controller is not None and gateway is not None and self.policy is not None
        return {
            "version": RUN_VERSION,
            "pid": os.getpid(),
            "started_at": time.time() - (time.monotonic() - self._t0),
            "state_dir": str(self.state_dir),
            "policy": {"source": str(self.source), "effective": str(self.effective_path), "digest": self.policy.digest},
            "transport": self.opts.transport,
            "redis": self.opts.redis,
            "endpoints": {
                "gateway": envoy.endpoint,
                "envoy_admin": envoy.info["admin"],
                "controller_api": controller.endpoint,
                "dashboard": controller.info["dashboard"],
                "gateway_metrics": gateway.info["metrics"],
                "processor": gateway.endpoint,
                "access_log": controller.info["als"],
            },
            "ports": {
                "envoy": self.ports["envoy"],
                "envoy_admin": self.ports["admin"],
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
            "admin_token_file": controller.info["token_file"],
            "logs": str(self.logs_dir),
            "children": {name: child.describe() for name, child in self.children.items()},
        }

    def _status_command(self) -> str:
        """`cohortgate status --watch` with the flags this stack needs (its port, its token)."""
        command = "cohortgate status --watch"
        if self.ports["controller"] != DEFAULT_CONTROLLER_PORT:
            command += f" --api http://127.0.0.1:{self.ports['controller']}"
        if self.state_dir != Path(DEFAULT_STATE_DIR).resolve():
            command += f" --token-file {_rel(self.state_dir / 'admin.token')}"
        return command

    def _write_run_file(self) -> None:
        data = json.dumps(self.run_info(), indent=2).encode() + b"\n"
        write_atomic(self.run_path, data, 0o600)
        self._wrote_run = True

    def _demo_model(self) -> str | None:
        assert self.policy is not None
        names = [oip_model_name(r) for r in self.policy.routes]
        named = [n for n in names if n]
        return "tabular" if "tabular" in named else (named[0] if named else None)

    def _print_banner(self) -> None:
        from cohortgate.deploy import pki
        from cohortgate.local.client import demo_body

        info = self.run_info()
        took = time.monotonic() - self._t0
        rows = [
            ("gateway (Envoy, mTLS + JWT)", info["endpoints"]["gateway"], "envoy"),
            ("Envoy admin", info["endpoints"]["envoy_admin"], None),
            ("dashboard", info["endpoints"]["dashboard"], None),
            ("controller API", info["endpoints"]["controller_api"], "controller"),
            ("gateway metrics (Prometheus)", info["endpoints"]["gateway_metrics"], None),
            (
                "gateway processor (ext_proc)",
                f"{_rel_uds(info['endpoints']['processor'])} ({self.opts.transport})",
                "gateway",
            ),
            ("access log service (ALS)", _rel_uds(info["endpoints"]["access_log"]), None),
        ]
        for spec, port in self.sidecars.values():
            label = f"{spec.route} {'shadow' if spec.shadow else 'variant'} {spec.variant} ({spec.region})"
            if spec.fault_rate:
                label += f" fault {spec.fault_rate:g}"
            rows.append((label, f"http://127.0.0.1:{port}", spec.name))
        width = max(len(r[0]) for r in rows)
        url_width = max(len(r[1]) for r in rows)
        self.say("")
        mode = f"Redis {self.opts.redis}" if self.opts.redis else "embedded, no Redis"
        self.say(f"cohortgate is up in {took:.1f}s ({mode}).")
        for label, url, child_name in rows:
            pid = f"pid {self.children[child_name].pid}" if child_name else ""
            self.say(f"  {label:<{width}}  {url:<{url_width}}  {pid}".rstrip())
        self.say(f"  state: {_rel(self.run_path)}   logs: {_rel(self.logs_dir)}/   policy: {_rel(self.effective_path)}")
        model = self._demo_model()
        state_flag = (
            "" if self.state_dir == Path(DEFAULT_STATE_DIR).resolve() else f" --state-dir {_rel(self.state_dir)}"
        )
        self.say("")
        self.say("Try it:")
        if model:
            self.say(f"  cohortgate call {model} --sub alice --residency eu{state_flag}")
            self.say(f"  cohortgate traffic --duration 60s{state_flag}")
        self.say(f"  {self._status_command()}")
        if model:
            cert, key = self.certs.clients[DEMO_CLIENT]
            token = pki.mint_token(self.certs, "alice", residency="eu", scopes=["predict"], ttl_s=3600)
            body = json.dumps(demo_body(), separators=(",", ":"))
            self.say("")
            self.say("or with curl (the token is valid for an hour):")
            self.say(
                f"  curl -i --cert {_rel(cert)} --key {_rel(key)} --cacert {_rel(self.certs.ca_cert)} \\\n"
                f"    -H 'Authorization: Bearer {token}' \\\n"
                f"    -H 'content-type: application/json' \\\n"
                f"    -d '{body}' \\\n"
                f"    {info['endpoints']['gateway']}/v2/models/{model}/infer"
            )
        self.say("")
        self.say("Ctrl-C stops everything.")


def _http(method: str, url: str, timeout: float = 1.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body); (0, b"") when nothing answers."""
    try:
        reply = http.call(url, method, body=b"" if method == "POST" else None, headers=headers, timeout=timeout)
    except (OSError, ValueError):
        return 0, b""
    return reply.status, reply.body
