"""`cohortgate gateway --workers N`: N processor processes, each with its own event loop and socket.

The cuts, and why:

- **Listeners.** Worker I listens on ``PATH.wI`` (`cohortgate.core.contract.worker_socket`) and
  Envoy's processor cluster has one endpoint per socket (``envoy render --processor-workers N``),
  balanced per ext_proc stream (least request). SO_REUSEPORT was not chosen: the kernel balances
  *connections*, and Envoy keeps one long HTTP/2 connection per Envoy worker, so two connections
  can land on one process. A worker that stops refuses connections and Envoy's outlier detection
  ejects it; the parent restarts it.
- **Policy: the parent compiles, the workers follow.** The parent serves no request; it owns the
  policy file through the one `Reloader` (compile once, a bad file refused and counted once, with
  ``--envoy-xds``/``--envoy-cds`` Envoy's clusters added and confirmed first: the parent serves
  delta CDS) and writes each policy it installs, byte for byte, to a serving copy beside the file
  (``.NAME.serving``: relative paths resolve the same, the digest is the same). Workers watch the
  copy, so none serves a policy whose clusters Envoy lacks, and N workers never race on the CDS file.
  Each worker follows the controller's weights (state file or Redis) itself.
- **Metrics: the parent scrapes its workers and sums.** Each worker serves its own registry on a
  private Unix socket; the parent's ``/metrics`` reads them all: counters, histograms and
  per-process gauges are summed, series every worker holds for the same fact (`REPLICATED`: the
  policy serving, the weights, controller states applied) take the maximum, and the parent's own
  (policy reloads, worker restarts) are added. prometheus-client's multiprocess mode was not used:
  it drops custom collectors, and the processor's decisions are plain counters read at scrape time.
- **Audit: one writer per stream.** A file becomes one file per worker (``audit.w0.log``...; each
  writer thread rotates its own); ``-`` is relayed by the parent, whole lines only, to its stdout.
- **One unit salt.** The parent resolves ``$COHORTGATE_UNIT_SALT`` (or draws one) and hands it to
  every worker with its configuration on stdin: a user's unit hash and cohort do not depend on the
  worker. A worker exits when that pipe closes (its parent died).
- **Signals.** SIGTERM/SIGINT: every worker drains (GOAWAY, open streams finish), then the parent
  exits. SIGHUP: the parent reloads. A worker that exits otherwise is restarted (0.5 s, doubling to
  10 s while it keeps failing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cohortgate.core.contract import MAX_GATEWAY_WORKERS, worker_socket
from cohortgate.core.policy import Policy, load_policy
from cohortgate.support.files import write_atomic

log = logging.getLogger("cohortgate.workers")

# Series every worker holds for the same fact: the parent shows the largest, not N times it.
REPLICATED = frozenset({"cohortgate_policy_info", "cohortgate_variant_weight", "cohortgate_state_updates"})
# Series the parent owns (it alone reloads): the workers' own copies are left out.
PARENT_ONLY = frozenset({"cohortgate_policy_reloads", "cohortgate_gateway_worker_restarts"})
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
STEADY_S = 30.0  # a worker up this long restarts from RESTART_FIRST_S again
READY_S = 120.0  # how long start-up waits for every worker to answer
DRAIN_S = 10.0  # how long SIGTERM waits for workers to drain before killing them
WORKER_WATCH_S = 0.2  # the workers' safety-net poll of the serving copy (inotify sees it at once)


def serving_copy(policy_path: str | os.PathLike[str]) -> Path:
    """The file the workers follow: beside the policy, so its relative paths resolve the same."""
    p = Path(policy_path)
    return p.with_name(f".{p.name}.serving")


def worker_audit_path(audit_log: str | None, index: int) -> str | None:
    """``audit.log`` -> ``audit.w0.log``; ``-`` and None are kept (the parent relays ``-``)."""
    if audit_log is None or audit_log == "-":
        return audit_log
    p = Path(audit_log)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


# ------------------------------------------------------------------------------ metrics, summed


def sum_expositions(texts: Sequence[str], parent: str = "") -> bytes:
    """One Prometheus exposition from the workers' ``texts`` and the parent's own (see the module doc).

    Pure: samples with the same name and labels are summed, or maxed for `REPLICATED` families;
    `PARENT_ONLY` families come from ``parent`` alone.
    """
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    sources = [(t, False) for t in texts] + [(parent, True)]
    for text, is_parent in sources:
        for family in text_string_to_metric_families(text):
            if (family.name in PARENT_ONLY) != is_parent:
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            take_max = family.name in REPLICATED
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = merged.get(key)
                if old is None:
                    merged[key] = sample.value
                elif sample.name.endswith("_created"):  # when the series began: the earliest worker's
                    merged[key] = min(old, sample.value)
                elif take_max:
                    merged[key] = max(old, sample.value)
                else:
                    merged[key] = old + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value if not math.isnan(value) else 0.0)

    class _Static:
        def collect(self) -> Any:
            return iter(families.values())

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static())
    return generate_latest(registry)


async def serve_worker_metrics(metrics: Any, path: str, health: Callable[[], Mapping[str, Any]]) -> Any:
    """A worker's ``/metrics`` and ``/healthz`` on a private Unix socket (0600), for its parent."""
    import json

    from aiohttp import web

    async def _metrics(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({**health(), "pid": os.getpid()}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o077)
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    return runner


async def _get(path: str, what: str, timeout_s: float = 5.0) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
        session.get(f"http://worker{what}", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp,
    ):
        resp.raise_for_status()
        return await resp.text()


# ------------------------------------------------------------------------------ the parent


@dataclass(slots=True)
class Worker:
    index: int
    config: Any  # its GatewayConfig
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0

    @property
    def metrics_socket(self) -> str:
        assert self.config.metrics_uds is not None
        return str(self.config.metrics_uds)


class Supervisor:
    """The parent of N workers: owns the policy file, restarts workers, sums their metrics."""

    def __init__(self, config: Any, workers: int, *, log_level: str = "info", log_format: str = "text") -> None:
        from gateway.metrics import GatewayMetrics
        from gateway.service import PolicyHolder, unit_salt_from_env

        if not 2 <= workers <= MAX_GATEWAY_WORKERS:
            raise ValueError(f"--workers {workers}: give 1 to {MAX_GATEWAY_WORKERS}")
        if config.listen.uds is None:
            raise ValueError("several workers listen on Unix sockets: --listen uds:PATH (Envoy balances over them)")
        self.config = config
        self.log_level, self.log_format = log_level, log_format
        self.holder = PolicyHolder(load_policy(config.policy_path), config.policy_path)
        self.metrics = GatewayMetrics()
        self.metrics.serving(self.holder.policy.digest)
        self.holder.metrics = self.metrics
        from prometheus_client import Counter

        self.restart_counter = Counter(
            "cohortgate_gateway_worker_restarts",
            "Processor worker processes restarted after they exited.",
            registry=self.metrics.registry,
        )
        self.copy = serving_copy(config.policy_path)
        salt = config.unit_salt if config.unit_salt is not None else unit_salt_from_env()
        self.workers = [Worker(i, self._worker_config(i, workers, salt)) for i in range(workers)]
        self.reloader: Any = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_runner: Any = None
        self._out_lock = threading.Lock()

    def _worker_config(self, index: int, workers: int, salt: bytes) -> Any:
        cfg = self.config
        sock = worker_socket(cfg.listen.uds, index, workers)
        return replace(
            cfg,
            listen=replace(cfg.listen, uds=sock),
            policy_path=str(self.copy),
            unit_salt=salt,
            audit_log=worker_audit_path(cfg.audit_log, index),
            envoy_cds=None,
            envoy_admin=None,
            envoy_xds=None,
            metrics_listen=None,
            metrics_uds=f"{sock}.metrics",
            watch_s=WORKER_WATCH_S,
        )

    # ---- the policy

    def _publish(self, _old: Policy | None, new: Policy) -> None:
        """Write the policy now installed to the workers' copy (the same bytes: the same digest)."""
        raw = Path(self.config.policy_path).read_bytes()
        if hashlib.sha256(raw).hexdigest() != new.digest:
            log.info("policy file changed again before it reached the workers: the next reload carries it")
            return
        write_atomic(self.copy, raw, mode=0o600)
        log.info("workers follow policy %s", new.digest[:12])

    def _prepare(self, old: Policy, new: Policy) -> None:
        """A new ``jwt`` section must load its JWKS here before the workers see it."""
        if new.jwt != old.jwt:
            from gateway.service import build_verifier

            build_verifier(new.jwt)

    # ---- running

    async def start(self) -> None:
        from gateway.reload import Reloader
        from gateway.service import start_cluster_sink

        cfg = self.config
        self._stop = asyncio.Event()
        self._publish(None, self.holder.policy)
        self.holder.subscribe(self._publish)
        envoy = await start_cluster_sink(cfg, self.holder.policy)  # the parent alone talks to Envoy
        self.reloader = Reloader(
            self.holder, prepare=self._prepare, envoy=envoy, watch_s=cfg.watch_s, grace_s=cfg.reload_grace_s
        )
        await self.reloader.start()
        Path(cfg.listen.uds).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for worker in self.workers:
            await self._spawn(worker)
            self._tasks.append(asyncio.create_task(self._keep(worker), name=f"cohortgate-worker-{worker.index}"))
        await self._wait_ready()
        if cfg.metrics_listen is not None:
            from aiohttp import web

            app = web.Application()
            _routes(app, self)
            self._metrics_runner = web.AppRunner(app, access_log=None)
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, *cfg.metrics_listen).start()

    async def _wait_ready(self, timeout_s: float = READY_S) -> None:
        """Until every worker answers its health check (a busy 2-core host imports slowly)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok, doc = await self.health()
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway workers not ready after {timeout_s:.0f} s: {doc['workers']}")
            await asyncio.sleep(0.1)

    async def _spawn(self, worker: Worker) -> None:
        relay = worker.config.audit_log == "-"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if relay else None,
        )
        payload = pickle.dumps((worker.config, self.log_level, self.log_format, worker.index))
        assert proc.stdin is not None
        proc.stdin.write(struct.pack(">I", len(payload)) + payload)  # the pipe stays open: EOF = parent gone
        await proc.stdin.drain()
        worker.process, worker.started = proc, time.monotonic()
        if relay:
            assert proc.stdout is not None
            self._tasks.append(asyncio.create_task(self._relay(proc.stdout), name=f"cohortgate-audit-{worker.index}"))
        log.info("worker %d started (pid %d) on %s", worker.index, proc.pid, worker.config.listen)

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """A worker's audit lines to our stdout, whole lines only (workers never interleave within one)."""
        rest = b""
        out = sys.stdout.buffer
        while chunk := await stream.read(1 << 16):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                out.write(data[:cut])
                out.flush()
        if rest:
            out.write(rest + b"\n")
            out.flush()

    async def _keep(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it exits, until we stop."""
        delay = RESTART_FIRST_S
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            if time.monotonic() - worker.started > STEADY_S:
                delay = RESTART_FIRST_S
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s", worker.index,
                        worker.process.pid, code, delay)  # fmt: skip
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, RESTART_MAX_S)
            worker.restarts += 1
            self.restart_counter.inc()
            await self._spawn(worker)

    async def scrape(self) -> bytes:
        texts = await asyncio.gather(
            *(_get(w.metrics_socket, "/metrics") for w in self.workers), return_exceptions=True
        )
        ok = [t for t in texts if isinstance(t, str)]
        body, _ = self.metrics.render()
        return sum_expositions(ok, body.decode())

    async def health(self) -> tuple[bool, dict[str, Any]]:
        import json

        docs = await asyncio.gather(*(_get(w.metrics_socket, "/healthz") for w in self.workers), return_exceptions=True)
        workers = []
        for worker, doc in zip(self.workers, docs, strict=True):
            entry: dict[str, Any] = {"index": worker.index, "restarts": worker.restarts, "ok": isinstance(doc, str)}
            if isinstance(doc, str):
                entry.update(json.loads(doc))
            workers.append(entry)
        ok = all(w["ok"] for w in workers)
        # "policy" names a digest once every answering worker serves it (`cohortgate up` hands an edit
        # to the controller only then); while they differ it says "mixed"
        serving = {w.get("policy") for w in workers if w["ok"]}
        policy = serving.pop() if len(serving) == 1 else ("mixed" if serving else self.holder.policy.digest[:12])
        parent = self.holder.policy.digest[:12]
        summary: dict[str, Any] = {"ok": ok, "policy": policy, "parent_policy": parent, "workers": workers}
        summary["reload_failures"] = self.holder.reload_failures  # the parent reloads: its refusals count
        return ok, summary

    async def serve(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig, action in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop), (signal.SIGHUP, self._hangup)):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, action)
        log.info("gateway ready: %d workers on %s.w*", len(self.workers), self.config.listen.uds)
        try:
            assert self._stop is not None
            await self._stop.wait()
        finally:
            await self.close()

    def _hangup(self) -> None:
        if self.reloader is not None:
            self.reloader.trigger("SIGHUP")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        """Drain: SIGTERM every worker (each sends GOAWAY and lets its streams finish), then wait."""
        self._stopping = True
        procs = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=DRAIN_S)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d did not drain in %.0f s: killed", proc.pid, DRAIN_S)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.reloader is not None:
            await self.reloader.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        for path in [str(self.copy), *(w.metrics_socket for w in self.workers)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _routes(app: Any, supervisor: Supervisor) -> None:
    import json

    from aiohttp import web
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    async def _metrics(_request: web.Request) -> web.Response:
        return web.Response(body=await supervisor.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(_request: web.Request) -> web.Response:
        ok, doc = await supervisor.health()
        return web.Response(text=json.dumps(doc), content_type="application/json", status=200 if ok else 503)

    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)


def run_workers(config: Any, workers: int, *, log_level: str = "info", log_format: str = "text") -> int:
    """The CLI's entry point for ``--workers N`` (N >= 2): supervise until a signal stops us."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None  # type: ignore[assignment]
    supervisor = Supervisor(config, workers, log_level=log_level, log_format=log_format)
    (uvloop.run if uvloop is not None else asyncio.run)(supervisor.serve())
    return 0


# ------------------------------------------------------------------------------ a worker


def _orphan_watch() -> None:
    """Exit (drain, via SIGTERM) when the parent's pipe closes: a worker never outlives its parent."""
    while sys.stdin.buffer.read(4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def worker_main() -> int:
    from cohortgate.support.logs import configure
    from gateway.service import run

    (size,) = struct.unpack(">I", sys.stdin.buffer.read(4))
    config, level, log_format, index = pickle.loads(sys.stdin.buffer.read(size))  # from our parent only
    configure(f"gateway.w{index}", level, log_format)
    threading.Thread(target=_orphan_watch, name="cohortgate-orphan-watch", daemon=True).start()
    return run(config)


if __name__ == "__main__":
    sys.exit(worker_main())
