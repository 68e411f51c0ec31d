"""``sidecar --workers N``: N front processes on one port and one model executor, supervised.

The cuts, and why:

- **Fronts.** Each runs today's aiohttp app (parsing, contract checks, feature joins, reports,
  metrics) on the same port with SO_REUSEPORT: the kernel spreads connections over them. A front's
  batcher is ``sidecar.link.RemoteBatcher``, the ``Batcher`` interface that hands each request to
  the executor through the front's shared-memory arena.
- **One executor per device** (``sidecar.executor``): it loads the model once and owns the one
  ``Batcher``, so batches form across every front. On CPU its onnxruntime gets the cores the fronts
  leave (``--threads`` default: cores - N, at least 1); on CUDA the GPU does the work.
- **Failures.** The executor going away: fronts answer 503 JSON with Retry-After (as a sidecar whose
  model is not ready) and turn ``ready`` false; the parent restarts it (0.5 s, doubling to 10 s while
  it keeps failing) and the fronts reconnect. A front that exits is restarted the same way. A model
  that cannot be served (the executor exits with status 2) or a port a front cannot take stops the
  sidecar with status 2, as one process would.
- **Signals.** SIGTERM/SIGINT: the fronts drain first (they stop accepting, finish what is in flight
  and queued), then the executor stops (its last batches answered), then the parent exits.
  Children exit when the parent's pipe closes (``cohortgate.support.children``).
- **Metrics.** ``/metrics`` is answered by whichever front takes the connection: request counters,
  failures and latency are that front's; the batch histograms, queue depth and transport counts are
  the executor's, read from shared memory (``sidecar.arena.SharedStats``), so every front shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from cohortgate.support import children

log = logging.getLogger("sidecar.workers")

MAX_WORKERS = 64
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
STEADY_S = 30.0  # a child up this long restarts from RESTART_FIRST_S again
FATAL = 2  # a child's exit status that restarting cannot fix (model refused, port taken)
EXECUTOR_SOCKET = "executor.sock"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check(config: Any, workers: int) -> None:
    """Raise ``ValueError`` for settings several processes cannot serve (yet)."""
    if not 2 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers}: give 1 to {MAX_WORKERS}")
    if config.model_file:
        raise ValueError("--model-file (live swap) is not available with --workers yet; use --model")
    if getattr(config, "shared_memory", False):
        raise ValueError(
            "--shared-memory with --workers: a region registered through one front is unknown to the others; not yet"
        )
    if config.grpc_port is not None:  # the gRPC server binds without SO_REUSEPORT (sidecar/grpc_service.py)
        raise ValueError("--grpc-port is not available with --workers yet: REST only")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers needs SO_REUSEPORT (Linux)")


@dataclass(slots=True)
class Child:
    role: str  # "executor" or "front"
    index: int
    settings: Any  # what it receives on stdin
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0

    @property
    def label(self) -> str:
        return self.role if self.role == "executor" else f"front {self.index}"


class Supervisor:
    """The parent: starts the executor and the fronts, restarts them, stops them in order."""

    def __init__(self, config: Any, workers: int, *, log_level: str = "INFO", log_format: str = "text") -> None:
        check(config, workers)
        self.config = config
        self.workers = workers
        self.directory = tempfile.mkdtemp(prefix="cohortgate-sidecar-")  # 0700
        self.socket_path = os.path.join(self.directory, EXECUTOR_SOCKET)
        threads = config.intra_op_threads or max(1, cores() - workers)
        executor_config = dataclasses.replace(config, intra_op_threads=threads)
        front_config = dataclasses.replace(config, executor_socket=self.socket_path)
        logging_args = (log_level, log_format)
        self.executor = Child("executor", 0, (executor_config, self.socket_path, *logging_args))
        self.fronts = [Child("front", i, (front_config, i, *logging_args)) for i in range(workers)]
        self.status = 0
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def children(self) -> list[Child]:
        return [self.executor, *self.fronts]

    async def _spawn(self, child: Child) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar.workers", child.role, stdin=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None
        proc.stdin.write(children.handoff(child.settings))  # the pipe stays open: EOF = parent gone
        await proc.stdin.drain()
        child.process, child.started = proc, time.monotonic()
        log.info("%s started (pid %d)", child.label, proc.pid)

    async def _keep(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, until we stop; a fatal exit stops the sidecar."""
        delay = RESTART_FIRST_S
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            if code == FATAL:
                log.error("%s exited with status %d: stopping the sidecar", child.label, code)
                self.status = FATAL
                self.stop()
                return
            if time.monotonic() - child.started > STEADY_S:
                delay = RESTART_FIRST_S
            log.warning("%s (pid %d) exited with %s; restarting in %.1f s", child.label, child.process.pid, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            delay = min(delay * 2, RESTART_MAX_S)
            child.restarts += 1
            await self._spawn(child)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        try:
            for child in self.children:
                await self._spawn(child)
                self._tasks.append(asyncio.create_task(self._keep(child), name=f"sidecar-{child.label}"))
            log.info(
                "sidecar %s: %d fronts on %s:%d, one model executor",
                self.config.model_name,
                self.workers,
                self.config.host,
                self.config.port,
            )
            await self._stop.wait()
        finally:
            await self.close()
        return self.status

    async def close(self) -> None:
        """Drain in order: the fronts (they finish what they hold), then the executor."""
        self._stopping = True
        drain = self.config.drain_timeout_s + 10.0
        await _terminate([f.process for f in self.fronts], drain)
        await _terminate([self.executor.process], drain)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self.directory, ignore_errors=True)


async def _terminate(procs: list[asyncio.subprocess.Process | None], timeout_s: float) -> None:
    alive = [p for p in procs if p is not None and p.returncode is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    if not alive:
        return
    _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in alive], timeout=timeout_s)
    for proc in alive:
        if proc.returncode is None:
            log.warning("pid %d did not stop in %.0f s: killed", proc.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    if pending:
        await asyncio.wait(pending, timeout=2.0)


def run_workers(config: Any, workers: int, *, log_level: str = "INFO", log_format: str = "text") -> int:
    """The CLI's entry point for ``--workers N`` (N >= 2): supervise until a signal; the exit status."""
    supervisor = Supervisor(config, workers, log_level=log_level, log_format=log_format)
    return _loop_run(supervisor.serve())


def _loop_run(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


# ------------------------------------------------------------------------------ the children


def executor_main() -> int:
    from cohortgate.support.logs import configure
    from sidecar import executor
    from sidecar.errors import ModelLoadError

    config, socket_path, level, log_format = children.receive()
    configure("sidecar.executor", level, log_format)
    children.exit_with_parent()
    try:
        _loop_run(executor.run(config, socket_path))
    except ModelLoadError as exc:
        print(f"cohortgate sidecar: {exc}", file=sys.stderr)
        return FATAL
    return 0


def front_main() -> int:
    from cohortgate.support.logs import configure
    from sidecar.server import serve

    config, index, level, log_format = children.receive()
    configure(f"sidecar.f{index}", level, log_format)
    children.exit_with_parent()
    try:
        _loop_run(serve(config))
    except OSError as exc:  # the port is taken by a process without SO_REUSEPORT
        print(f"cohortgate sidecar: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return FATAL
    return 0


if __name__ == "__main__":
    sys.exit(executor_main() if sys.argv[1:] == ["executor"] else front_main())
