"""A running gateway: the policy holder, the token verifier, the audit trail and one transport.

`Gateway` assembles the parts the processor (`gateway.extproc.Processor`) reads on every request:

- `PolicyHolder.policy`, one reference swapped atomically by ``swap`` (the controller's effective
  weights) or ``reload`` (the file changed; a bad file logs, counts and keeps the old policy);
- a `TokenVerifier` built from ``policy.jwt`` over a JWKS file or https URL (refreshed in the
  background), rebuilt only when a reload changes the ``jwt`` section;
- the `AuditLog` writer thread;
- the transport: ``grpc`` (grpcio, or the fast HTTP/2 server) or ``http`` (Envoy's http_service);
- optionally: the state store it follows (``--redis`` / ``--state-file``: the controller's effective
  weights stay on top of every file reload) and a ``/metrics`` + ``/healthz`` endpoint.

Everything runs on one event loop thread, so a swap never races a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cohortgate.core.contract import UNIT_SALT_ENV
from cohortgate.core.errors import failure_line
from cohortgate.core.policy import JwtSettings, Policy, load_policy
from cohortgate.store.state import InProcessState, RedisState, StateStore, follow
from cohortgate.support.metrics import serve_metrics
from cohortgate.support.runtime import tune_collector
from gateway.audit import AuditLog
from gateway.auth import TokenVerifier
from gateway.extproc import DEFAULT_MAX_BODY_BYTES, Processor, ProcessorSettings, hash_unit
from gateway.jwks import KeySet, source_from_spec
from gateway.metrics import GatewayMetrics
from gateway.reload import DEFAULT_GRACE_S, DEFAULT_WATCH_S, ClusterSink, EnvoyClusters, Reloader

log = logging.getLogger("cohortgate.service")

Transport = Literal["grpc", "http"]


# ------------------------------------------------------------------------------ addresses


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``uds:PATH`` or ``tcp:HOST:PORT``: where the processor listens for Envoy."""

    uds: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, spec: str) -> ListenAddress:
        kind, _, rest = spec.partition(":")
        if kind == "uds" and rest:
            return cls(uds=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return cls(host=host, port=int(port))
        raise ValueError(f"listen address {spec!r} must be uds:PATH or tcp:HOST:PORT")

    def __str__(self) -> str:
        return f"uds:{self.uds}" if self.uds is not None else f"tcp:{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost")


DEFAULT_SOCKET = ".cohortgate/processor.sock"  # what `cohortgate envoy render` points Envoy at


def default_socket_path() -> str:
    """The processor's Unix socket, relative to the working directory (as Envoy's default config)."""
    return DEFAULT_SOCKET


# ------------------------------------------------------------------------------ the policy holder


class PolicyHolder:
    """The serving policy: readers take ``holder.policy``; writers replace it in one assignment."""

    def __init__(self, policy: Policy, path: str | os.PathLike[str] | None = None) -> None:
        self.policy = policy
        self.path = Path(path) if path is not None else None
        self.reloads = 0
        self.reload_failures = 0
        self.metrics: GatewayMetrics | None = None
        self._listeners: list[Callable[[Policy, Policy], None]] = []

    def subscribe(self, listener: Callable[[Policy, Policy], None]) -> None:
        """Call ``listener(old, new)`` after every swap."""
        self._listeners.append(listener)

    def swap(self, policy: Policy) -> Policy:
        old, self.policy = self.policy, policy
        for listener in self._listeners:
            listener(old, policy)
        return old

    def reload(self, prepare: Callable[[Policy, Policy], Callable[[], None] | None] | None = None) -> bool:
        """Re-read the policy file now, synchronously (the live path is `gateway.reload.Reloader`).

        ``prepare(old, new)`` runs before the swap (e.g. loading a new JWKS) and may return a
        callable run at the swap; if it raises, the reload fails: logged, counted, old policy kept.
        """
        if self.path is None:
            return False
        try:
            policy = load_policy(self.path)
            if policy.digest == self.policy.digest:
                return False
            commit = prepare(self.policy, policy) if prepare is not None else None
        except Exception as exc:
            self.failed(exc, "reload")
            return False
        if commit is not None:
            commit()
        self.install(policy)
        return True

    def install(self, policy: Policy) -> Policy:
        """Swap in a reloaded policy and count it (``policy reloaded: OLD -> NEW`` is logged)."""
        old = self.swap(policy)
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.policy_reload(True)
            self.metrics.serving(policy.digest)
        log.info("policy reloaded: %s -> %s", old.digest[:12], policy.digest[:12])
        return old

    def failed(self, exc: BaseException, trigger: str, reason: str | None = None) -> None:
        """Log one JSON line (with the FILE:LINE:COL list for an invalid file) and count the failure."""
        self.reload_failures += 1
        if self.metrics is not None:
            self.metrics.policy_reload(False)
        log.error("%s", failure_line(self.path, exc, self.policy.digest, trigger, reason))


def build_verifier(settings: JwtSettings, *, cache_size: int = 100_000) -> TokenVerifier:
    """A `TokenVerifier` for a policy's ``jwt`` section (loads the JWKS now: a bad one is fatal)."""
    keys = KeySet(source_from_spec(settings.jwks, allowed_hosts=settings.jwks_hosts))
    return TokenVerifier(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        algorithms=settings.algorithms,
        leeway_s=settings.leeway_s,
        cache_size=cache_size,
    )


def unit_salt_from_env() -> bytes:
    """``$COHORTGATE_UNIT_SALT``, else a random salt (unit hashes then change on every restart)."""
    value = os.environ.get(UNIT_SALT_ENV)
    if value:
        return value.encode()
    log.warning(
        "%s is not set: using a random unit salt, so x-cohortgate-unit values change on restart",
        UNIT_SALT_ENV,
    )
    return secrets.token_bytes(32)


# ------------------------------------------------------------------------------ the gateway


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    policy_path: str
    listen: ListenAddress = field(default_factory=lambda: ListenAddress(uds=default_socket_path()))
    transport: Transport = "grpc"
    grpc_server: Literal["grpcio", "fast"] = "fast"
    certs_dir: str | None = None  # needed for TCP (mTLS with the processor certificate)
    audit_log: str | None = "-"  # a file, "-" for stdout, None for none
    audit_format: str = "json"  # or "ecs" (gateway.audit.AUDIT_FORMATS)
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector: one span per decision (off when None)
    trace_ratio: float = 0.01  # requests without a sampled parent traced with this probability
    unit_salt: bytes | None = field(default=None, repr=False)
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    trust_domain: str | None = None
    jwks_refresh_s: float = 300.0
    redis_url: str | None = field(default=None, repr=False)  # follow the controller's weights in Redis
    state_file: str | None = None  # the embedded controller's state file (or, with redis_url, a local cache)
    state_poll_s: float = 0.2
    metrics_listen: tuple[str, int] | None = None  # (host, port) for /metrics and /healthz
    metrics_uds: str | None = None  # a worker's /metrics and /healthz, for its parent (`gateway.workers`)
    watch_s: float = DEFAULT_WATCH_S  # poll the policy file this often (0: SIGHUP only)
    envoy_cds: str | None = None  # Envoy's filesystem-CDS file: two-phase cluster updates on reload
    envoy_admin: str | None = None  # Envoy's admin URL, to confirm new clusters before routing to them
    envoy_xds: str | None = None  # serve Envoy delta CDS on this Unix socket (instead of envoy_cds; gateway.xds)
    reload_grace_s: float = DEFAULT_GRACE_S  # dropped clusters stay this long after the swap
    upstream_ca: str | None = None  # verifies https backends in the clusters written


async def start_cluster_sink(cfg: GatewayConfig, policy: Policy) -> ClusterSink | None:
    """How this gateway moves Envoy's clusters on a reload: delta CDS it serves (``envoy_xds``, started
    here, before Envoy connects), a filesystem-CDS file confirmed through admin (``envoy_cds``), or none."""
    if cfg.envoy_xds is not None:
        if cfg.envoy_cds is not None:
            raise ValueError("--envoy-xds and --envoy-cds are two ways to hand Envoy its clusters: give one")
        from gateway.xds import XdsClusters

        xds = XdsClusters(cfg.envoy_xds, admin_url=cfg.envoy_admin, upstream_ca=cfg.upstream_ca)
        await xds.start()  # a connecting Envoy waits for the Reloader's first write (a background task)
        return xds
    if (cfg.envoy_cds is None) != (cfg.envoy_admin is None):
        raise ValueError("--envoy-cds and --envoy-admin go together: clusters are confirmed before use")
    if cfg.envoy_cds is not None and cfg.envoy_admin is not None:
        return EnvoyClusters(cfg.envoy_cds, cfg.envoy_admin, upstream_ca=cfg.upstream_ca)
    return None


class Gateway:
    """The assembled processor; ``await serve()`` runs it until ``stop()`` or a signal."""

    def __init__(self, config: GatewayConfig, *, policy: Policy | None = None) -> None:
        self.config = config
        self.holder = PolicyHolder(policy or load_policy(config.policy_path), config.policy_path)
        self.verifier = build_verifier(self.holder.policy.jwt)
        salt = config.unit_salt if config.unit_salt is not None else unit_salt_from_env()
        trust_domain = config.trust_domain
        if trust_domain is None and config.certs_dir is not None:
            from cohortgate.deploy.pki import load_cert_paths

            trust_domain = load_cert_paths(config.certs_dir).trust_domain  # only our own SPIFFE IDs
        self.audit = (
            AuditLog.open(config.audit_log, lambda sub: hash_unit(salt, sub), log_format=config.audit_format)
            if config.audit_log is not None
            else None
        )
        self.engine = Processor(
            self.holder,
            self.verifier,
            ProcessorSettings(unit_salt=salt, max_body_bytes=config.max_body_bytes, trust_domain=trust_domain),
            self.audit,
            tracing=_tracing(config),
        )
        self.metrics = GatewayMetrics()
        self.metrics.count_decisions_of(self.engine.stats)
        self.metrics.serving(self.holder.policy.digest)
        self.holder.metrics = self.metrics
        self.store: StateStore | None = None
        self.reloader: Reloader | None = None
        self._stop: asyncio.Event | None = None
        self._server: Any = None
        self._metrics_runner: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    def _prepare(self, old: Policy, new: Policy) -> Callable[[], None] | None:
        """Before a reload swaps policies: a changed ``jwt`` section needs its verifier first.

        Builds it now (a thread may call this: it loads the JWKS) and returns what installs it at
        the swap, so the new verifier and the new policy start serving together.
        """
        if new.jwt == old.jwt:
            return None
        verifier = build_verifier(new.jwt)  # raises on a bad JWKS: the reload is refused

        def commit() -> None:
            self.verifier = self.engine.verifier = verifier
            log.info("token verifier rebuilt for the new jwt settings")

        return commit

    # ---- running

    async def start(self) -> None:
        """Listen; returns once the transport accepts connections."""
        self._stop = asyncio.Event()
        listen = self.config.listen
        if listen.uds is not None:
            from gateway.transport_http import clear_stale_socket

            Path(listen.uds).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            clear_stale_socket(listen.uds)
        await self._start_state()
        self._server = await self._start_transport(listen)
        await self._start_reloader()
        self._tasks.append(asyncio.create_task(self._refresh_keys(), name="cohortgate-jwks-refresh"))
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            self._metrics_runner = await serve_metrics(self.metrics, host, port, self.health)
        elif self.config.metrics_uds is not None:
            from gateway.workers import serve_worker_metrics

            self._metrics_runner = await serve_worker_metrics(self.metrics, self.config.metrics_uds, self.health)

    async def _start_state(self) -> None:
        """Follow the controller's effective weights before the first request is answered."""
        cfg = self.config
        if cfg.redis_url is not None:
            self.store = RedisState(cfg.redis_url, cache_path=cfg.state_file)
        elif cfg.state_file is not None:
            self.store = InProcessState(cache_path=cfg.state_file, poll_s=cfg.state_poll_s)
        if self.store is not None:
            await self.store.start()
            follow(self.holder, self.store, self.metrics)
        else:  # no controller to follow: the policy file's weights are the ones applied
            self._export_weights(self.holder.policy)
            self.holder.subscribe(lambda old, new: self._export_weights(new))

    def _export_weights(self, policy: Policy) -> None:
        """``cohortgate_variant_weight`` (dashboards select routes and variants by it) for every route."""
        self.metrics.show_weights(policy.routes)

    async def _start_reloader(self) -> None:
        cfg = self.config
        envoy = await start_cluster_sink(cfg, self.holder.policy)
        self.reloader = Reloader(
            self.holder, prepare=self._prepare, envoy=envoy, watch_s=cfg.watch_s, grace_s=cfg.reload_grace_s
        )
        await self.reloader.start()

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` answers: the policy serving and whether the state store is reachable."""
        # reload_failures: what `cohortgate up` polls during an edit (not /metrics: ~1 000 routes of series)
        doc: dict[str, Any] = {
            "ok": True,
            "policy": self.holder.policy.digest[:12],
            "reload_failures": self.holder.reload_failures,
        }
        if isinstance(self.store, RedisState):
            doc["state_store"] = "connected" if self.store.connected else "unreachable"
        elif self.store is not None:
            doc["state_store"] = "file"
        return doc

    async def _start_transport(self, listen: ListenAddress) -> Any:
        cfg = self.config
        tls = self._tls_files(listen)
        if cfg.transport == "http":
            from gateway.transport_http import server_ssl_context, start_http

            ctx = server_ssl_context(*tls) if tls else None
            return await start_http(
                self.engine.handle_json, uds=listen.uds, host=listen.host, port=listen.port, ssl_context=ctx
            )
        if cfg.transport != "grpc":
            raise ValueError(f"transport must be grpc or http, not {cfg.transport!r}")
        if cfg.grpc_server == "fast":
            from gateway.h2 import server as h2server
            from gateway.h2.metrics import register_h2_metrics

            ctx = _fast_ssl_context(*tls) if tls else None
            kwargs: dict[str, Any] = {"ssl": ctx, "trace_context": self.engine.tracing is not None}
            if listen.uds is not None:
                kwargs["uds"] = listen.uds
            else:
                kwargs.update(host=listen.host, port=listen.port)
            server = await h2server.serve_fast(self.engine.new_processor, **kwargs)
            if self.metrics is not None:
                register_h2_metrics(server, self.metrics.registry)
            return server
        from gateway.transport_grpc import server_credentials, start_grpc

        creds = None
        if tls:
            cert, key, ca = (Path(p).read_bytes() for p in tls)
            creds = server_credentials(cert, key, ca)
        return await start_grpc(
            self.engine.new_processor,
            uds=listen.uds,
            host=listen.host,
            port=listen.port,
            credentials=creds,
            trace_context=self.engine.tracing is not None,
        )

    def _tls_files(self, listen: ListenAddress) -> tuple[str, str, str] | None:
        """(cert, key, CA) for TCP; plaintext TCP is allowed on loopback only."""
        if listen.uds is not None:
            return None
        if self.config.certs_dir is None:
            if listen.is_loopback:
                log.warning("listening on %s without TLS (loopback only); pass --certs for mTLS", listen)
                return None
            raise ValueError(f"listening on {listen} needs --certs: the processor hop must use mTLS")
        from cohortgate.deploy.pki import load_cert_paths

        paths = load_cert_paths(self.config.certs_dir)
        return str(paths.processor_cert), str(paths.processor_key), str(paths.ca_cert)

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(self.config.jwks_refresh_s)
            with contextlib.suppress(Exception):
                await self.verifier.keys.refresh_async(force=True)

    async def serve(self, *, on_ready: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Start, then run until `stop` (SIGTERM/SIGINT stop, SIGHUP reloads the policy)."""
        await self.start()
        loop = asyncio.get_running_loop()
        installed = []
        for sig, action in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop), (signal.SIGHUP, self._hangup)):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, action)
                installed.append(sig)
        try:
            if on_ready is not None:
                result = on_ready()
                if asyncio.iscoroutine(result):
                    await result
            assert self._stop is not None
            await self._stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()

    def _hangup(self) -> None:
        if self.reloader is not None:
            self.reloader.trigger("SIGHUP")  # off the request path, in order with file-watch reloads
        else:
            self.reload()

    def reload(self) -> bool:
        """Re-read the policy file now, synchronously, without Envoy's two phases (tests, tools)."""
        return self.holder.reload(self._prepare)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self.reloader is not None:
            reloader, self.reloader = self.reloader, None
            await reloader.close()
        if self._metrics_runner is not None:
            runner, self._metrics_runner = self._metrics_runner, None
            await runner.cleanup()
        if self.store is not None:
            store, self.store = self.store, None
            with contextlib.suppress(Exception):
                await store.close()
        server, self._server = self._server, None
        if server is not None:
            if hasattr(server, "drain"):  # the fast HTTP/2 server: GOAWAY, let streams finish
                await server.drain(timeout=1.0)
            elif hasattr(server, "stop"):  # grpc.aio
                await server.stop(0.5)
            else:  # asyncio.Server (http transport)
                server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 1.0)
            if self.config.listen.uds is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.listen.uds)
        if self.audit is not None:
            self.audit.close()
        if self.engine.tracing is not None:
            self.engine.tracing.shutdown()


def _tracing(config: GatewayConfig) -> Any:
    if config.otlp_endpoint is None:
        return None
    from cohortgate.support.tracing import Tracing

    return Tracing("gateway", config.otlp_endpoint, config.trace_ratio)


def _fast_ssl_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def run(config: GatewayConfig) -> int:
    """Run a gateway on uvloop until a signal stops it (the CLI's entry point)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None  # type: ignore[assignment]
    gateway = Gateway(config)
    policy = gateway.holder.policy
    log.info(
        "gateway: policy %s (%s), transport %s%s, listening on %s",
        config.policy_path,
        policy.digest[:12],
        config.transport,
        f" ({config.grpc_server})" if config.transport == "grpc" else "",
        config.listen,
    )

    def ready() -> None:
        tune_collector()  # start-up is done: see cohortgate.support.runtime
        log.info("gateway ready on %s (pid %d)", config.listen, os.getpid())

    if uvloop is not None:
        uvloop.run(gateway.serve(on_ready=ready))
    else:  # pragma: no cover
        asyncio.run(gateway.serve(on_ready=ready))
    return 0
