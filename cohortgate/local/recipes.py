"""How `cohortgate up` runs each child, as pure functions: a `Layout` in, a `Recipe` (argv, env, log,
endpoint, what run.json says about it) out. No process, no socket: tests check every flag directly.

A restart runs the same recipe again, so a restarted child is exactly the child that died (same
ports, sockets, state files, salt). Envoy is the exception in kind, not in shape: `envoy_args` are
the extra flags `cohortgate.deploy.envoyproc.EnvoyProcess` adds to its own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohortgate.core.contract import EXPOSURE_KEY_ENV, TOKEN_FILE_ENV, UNIT_SALT_ENV, worker_socket, xds_socket
from cohortgate.local.plan import SidecarSpec
from cohortgate.local.shoppers import OutcomeDemo

SIDECAR_DRAIN_S = 10.0  # a sidecar's --drain-timeout: queued requests finish on SIGTERM
RELOAD_GRACE_S = 2.0  # the gateway's --reload-grace: how long a dropped cluster stays in Envoy
ENVOY_DRAIN_S = 2.0  # Envoy's --drain-time-s: how long listeners drain before they close
DEMO_BAD_SHARE = 0.03  # the demo's traffic includes a few misbehaving clients, so denials show too


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything of one stack lives: what every recipe needs, fixed for the stack's life."""

    state_dir: Path
    certs_dir: Path
    ports: Mapping[str, int]  # controller, dashboard, gateway_metrics, envoy
    processor_socket: str
    als_socket: str
    gateway_policy: Path  # the effective policy the gateway serves
    controller_policy: Path  # the same text, written only once the gateway serves it
    transport: str = "grpc"
    redis: str | None = None
    unit_salt: str = ""
    exposure_key: str = ""  # $COHORTGATE_EXPOSURE_KEY for the gateway and the controller (a secret: env only)
    canary_fault_after_s: float = 0.0
    otlp_endpoint: str | None = None  # every child traces to this OTLP/HTTP collector (docs/observability.md)
    trace_sample: float = 0.01
    python: str = field(default=sys.executable)
    gateway_workers: int = 1  # processor processes, one socket each (`worker_socket`)
    delta_cds: bool = True  # the gateway serves Envoy delta CDS (`xds_socket`); False: the filesystem-CDS file

    @property
    def xds_socket(self) -> str:
        """Where the gateway serves Envoy's clusters (delta CDS), beside the processor's socket."""
        return xds_socket(self.processor_socket)

    @property
    def processor_sockets(self) -> tuple[str, ...]:
        """Every gateway worker's socket (the one ``processor_socket`` for one worker)."""
        n = self.gateway_workers
        return tuple(worker_socket(self.processor_socket, i, n) for i in range(n))

    def tracing_args(self) -> tuple[str, ...]:
        """The gateway's and each sidecar's tracing flags (none when tracing is off)."""
        if self.otlp_endpoint is None:
            return ()
        return ("--otlp-endpoint", self.otlp_endpoint, "--trace-sample", str(self.trace_sample))

    def exposure_env(self) -> dict[str, str]:
        """The exposure-token key in a child's environment (never on its command line), when there is one."""
        return {EXPOSURE_KEY_ENV: self.exposure_key} if self.exposure_key else {}

    @property
    def outcomes_journal(self) -> Path:
        """The controller's outcome journal (embedded): in the state dir, so the demo can start it afresh."""
        return self.state_dir / "outcomes.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "admin.token"

    @property
    def state_file(self) -> Path:
        """The controller's state; in embedded mode the gateway follows it too."""
        return self.state_dir / "state.json"

    @property
    def audit_log(self) -> Path:
        return self.logs_dir / "audit.jsonl"

    @property
    def controller_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['controller']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}/"

    @property
    def gateway_health(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway_metrics']}/healthz"

    @property
    def gateway_metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway_metrics']}/metrics"

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin on a 0600 Unix socket: only this user can drain, quit or reconfigure Envoy."""
        return self.state_dir / "envoy-admin.sock"

    @property
    def envoy_admin(self) -> str:
        return f"unix:{self.admin_socket}"

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['envoy']}"

    def cli(self, *args: str) -> tuple[str, ...]:
        return (self.python, "-m", "cohortgate.cli", *args)


@dataclass(frozen=True, slots=True)
class Recipe:
    """One child, before it runs: the supervisor starts (and restarts) exactly this."""

    name: str
    kind: str  # sidecar | controller | gateway | envoy | traffic
    argv: tuple[str, ...]
    log_path: Path
    endpoint: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)  # what run.json says about it
    stale_paths: tuple[str, ...] = ()  # removed before each start: a stale socket must not pass for ready
    preload: tuple[str, ...] = ()  # modules a warm spare imports ahead of a restart (`cohortgate.local.warm`)

    @property
    def cli_args(self) -> tuple[str, ...] | None:
        """The ``cohortgate`` arguments when this is a ``python -m cohortgate.cli`` child, else None."""
        return self.argv[3:] if self.argv[1:3] == ("-m", "cohortgate.cli") else None


# What a warm spare imports for each kind: the modules that make a cold start slow.
SIDECAR_PRELOAD = ("sidecar.server", "sidecar.model", "onnxruntime", "prometheus_client")
CONTROLLER_PRELOAD = (
    "aiohttp.web", "grpc", "cohortgate.core.policy", "cohortgate.controller.als", "cohortgate.controller.api",
    "cohortgate.controller.leader", "cohortgate.controller.loop", "cohortgate.controller.metrics",
    "cohortgate.dashboard.app", "cohortgate.dashboard.view", "cohortgate.store.events", "cohortgate.store.state",
)  # fmt: skip
GATEWAY_PRELOAD = ("gateway.service", "gateway.transport_grpc", "gateway.transport_http", "cohortgate.deploy.pki")


def sidecar_recipe(spec: SidecarSpec, port: int, layout: Layout) -> Recipe:
    """A model sidecar on ``port``: its shadow reports go to Redis, else to the controller's /reports.

    ``--model`` is the backend's ``model:`` as the policy compiled it: a path, or a reference
    (``file://``/``https://``/``s3://`` with ``@sha256:``, or a signed store version) that the
    sidecar fetches and verifies; each of the route's ``trusted_keys`` becomes a ``--trusted-key``,
    so a route that names keys is served only by models signed with one (docs/models.md).
    """
    argv = layout.cli(
        "sidecar",
        "--model", spec.model_path,
        "--name", spec.model_name,
        "--port", str(port),
        "--variant", spec.variant,
        "--threads", "1",
        "--drain-timeout", str(SIDECAR_DRAIN_S),
        "--report-to", layout.redis or f"{layout.controller_api}/reports",
    )  # fmt: skip
    for key in spec.trusted_keys:
        argv += ("--trusted-key", key)
    if spec.contract:  # the policy's `contract:` beside `model:` (a file, or the contract inline as JSON)
        argv += ("--contract", spec.contract)
    if spec.features is not None:  # it joins online features: the route's block, from the file up validated
        argv += ("--features-policy", spec.features_policy, "--features-route", spec.route)
    argv += layout.tracing_args()
    if spec.fault_rate > 0:
        argv += ("--fault-rate", str(spec.fault_rate), "--fault-after", str(layout.canary_fault_after_s))
    return Recipe(
        name=spec.name,
        kind="sidecar",
        argv=argv,
        log_path=layout.logs_dir / f"{spec.name}.log",
        endpoint=f"http://127.0.0.1:{port}",
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
            "features": spec.features is not None,  # joins online features (never the store's URL: a password)
            "trusted_keys": len(spec.trusted_keys),
        },
        env={TOKEN_FILE_ENV: str(layout.token_file)},  # the controller's /reports needs the admin token
        preload=SIDECAR_PRELOAD,
    )


def controller_recipe(layout: Layout) -> Recipe:
    """The controller, its dashboard and its access-log receiver; it follows its own policy file."""
    argv = layout.cli(
        "controller",
        "--policy", str(layout.controller_policy),
        "--listen", f"127.0.0.1:{layout.ports['controller']}",
        "--als", f"uds:{layout.als_socket}",
        "--token-file", str(layout.token_file),
        "--state-file", str(layout.state_file),
        "--dashboard", f"127.0.0.1:{layout.ports['dashboard']}",
        "--allow-actions",  # the dashboard's buttons; each action still needs the admin token
        "--outcomes-journal", str(layout.outcomes_journal),
    )  # fmt: skip
    if layout.redis:
        argv += ("--redis", layout.redis)
    if layout.otlp_endpoint is not None:
        argv += ("--otlp-endpoint", layout.otlp_endpoint)
    return Recipe(
        name="controller",
        kind="controller",
        argv=argv,
        log_path=layout.logs_dir / "controller.log",
        endpoint=layout.controller_api,
        env=layout.exposure_env(),  # it verifies the exposure tokens clients echo with their outcomes
        info={
            "port": layout.ports["controller"],
            "als": f"uds:{layout.als_socket}",
            "token_file": str(layout.token_file),
            "dashboard": layout.dashboard,
            "policy": str(layout.controller_policy),
        },
        preload=CONTROLLER_PRELOAD,
    )


def gateway_recipe(layout: Layout, envoy_cds: Path) -> Recipe:
    """The ext_proc gateway on a Unix socket; it moves Envoy's clusters two-phase on a policy edit: over
    the delta CDS it serves (`Layout.delta_cds`: only the changed clusters travel, Envoy's ACK confirms;
    admin checks DNS clusters warmed), else through the CDS file ``envoy_cds``."""
    clusters = ("--envoy-xds", layout.xds_socket) if layout.delta_cds else ("--envoy-cds", str(envoy_cds))
    argv = layout.cli(
        "gateway",
        "--policy", str(layout.gateway_policy),
        "--certs", str(layout.certs_dir),
        "--transport", layout.transport,
        "--listen", f"uds:{layout.processor_socket}",
        "--audit-log", str(layout.audit_log),
        "--metrics", f"127.0.0.1:{layout.ports['gateway_metrics']}",
        *clusters,
        "--envoy-admin", layout.envoy_admin,
        "--reload-grace", str(RELOAD_GRACE_S),
    )  # fmt: skip
    if layout.gateway_workers > 1:
        argv += ("--workers", str(layout.gateway_workers))
    # The gateway follows the controller's weights: in the shared Redis (keeping a local copy of its
    # own), or, embedded, in the state file the controller writes.
    if layout.redis:
        argv += ("--redis", layout.redis, "--state-file", str(layout.state_dir / "gateway-state.json"))
    else:
        argv += ("--state-file", str(layout.state_file))
    argv += layout.tracing_args()
    return Recipe(
        name="gateway",
        kind="gateway",
        argv=argv,
        log_path=layout.logs_dir / "gateway.log",
        endpoint=f"uds:{layout.processor_sockets[0]}",
        env={UNIT_SALT_ENV: layout.unit_salt, **layout.exposure_env()},
        info={
            "transport": layout.transport,
            "audit_log": str(layout.audit_log),
            "metrics": layout.gateway_metrics,
            "metrics_port": layout.ports["gateway_metrics"],
        },
        stale_paths=layout.processor_sockets,  # (the gateway replaces a stale xDS socket itself)
        preload=GATEWAY_PRELOAD,
    )


def envoy_args() -> tuple[str, ...]:
    """Flags `up` adds to `EnvoyProcess`'s own: a graceful drain of `ENVOY_DRAIN_S`, every connection
    told to close at once (``Connection: close`` / GOAWAY) rather than a gradual share of them."""
    return ("--drain-time-s", str(int(ENVOY_DRAIN_S)), "--drain-strategy", "immediate")


def envoy_recipe(layout: Layout, bootstrap: Path, cds: Path, concurrency: int) -> Recipe:
    """Envoy as run.json describes it; `EnvoyProcess` builds the command line itself (see `envoy_args`)."""
    return Recipe(
        name="envoy",
        kind="envoy",
        argv=("envoy", "-c", str(bootstrap), "--concurrency", str(concurrency), *envoy_args()),
        log_path=layout.logs_dir / "envoy.log",
        endpoint=layout.gateway_url,
        info={
            "port": layout.ports["envoy"],
            "admin": layout.envoy_admin,
            "bootstrap": str(bootstrap),
            "cds": str(cds),
        },
    )


def traffic_recipe(layout: Layout, model: str, outcomes: OutcomeDemo | None = None, drift: str = "") -> Recipe:
    """The demo's load, as one more child: `up` stops it first and prints its summary. With
    ``outcomes`` it also plays the shoppers of that outcome experiment (`cohortgate traffic --outcomes-model`);
    with ``drift`` it plants that input drift (`cohortgate traffic --drift`)."""
    argv = layout.cli(
        "traffic", "--state-dir", str(layout.state_dir), "--model", model, "--duration", "1d",
        "--bad-share", str(DEMO_BAD_SHARE),
    )  # fmt: skip
    info: dict[str, Any] = {"model": model}
    if drift:
        argv += ("--drift", drift)
        info["drift"] = drift
    if outcomes is not None:
        rates = ",".join(f"{variant}={rate:g}" for variant, rate in outcomes.rates.items())
        argv += (
            "--outcomes-model", outcomes.model, "--outcomes-rps", f"{outcomes.rps:g}",
            "--conversion", rates, "--metric", outcomes.metric,
        )  # fmt: skip
        info["outcomes"] = {"model": outcomes.model, "rps": outcomes.rps, "conversion": dict(outcomes.rates)}
    return Recipe(name="traffic", kind="traffic", argv=argv, log_path=layout.logs_dir / "traffic.log", info=info)
