"""Live policy changes: watch the file, compile off the request path, two-phase Envoy clusters, swap.

One `Reloader` per gateway owns the whole procedure, serialised by a lock:

1. **read** the file in a thread; the same bytes as the policy serving now (a SIGHUP, a ``touch``,
   an editor's rewrite) change nothing;
2. **compile** (parse, validate, precompute) in a thread; a bad file, or a ``jwt`` section whose
   JWKS does not load, is refused: one JSON log line with the ``FILE:LINE:COL`` list, the
   reload-failure metric, and the old policy keeps serving;
3. with Envoy (``--envoy-xds`` or ``--envoy-cds``): **add** — hand Envoy the union of the serving and
   the new clusters and wait for its confirmation: over delta CDS (`gateway.xds.XdsClusters`, what
   `cohortgate up` uses) only the changed clusters travel and the confirmation is Envoy's ACK (a NACK
   refuses the reload with Envoy's reason); with filesystem CDS (`EnvoyClusters`) the CDS file
   (``cds.json``, or ``cds.yaml``: the suffix picks the form) is rewritten whole and Envoy's admin
   polled until it has accepted that version and nothing is warming. `confirm_limit` (5 s + 5 ms a
   cluster in the set) bounds handing over and confirming together (not confirmed in time: the
   reload is refused the same way and Envoy is handed the serving clusters again);
4. **swap** one reference (`PolicyHolder.install`); requests in flight finish on the policy object
   they already hold, and the controller's effective weights are put back on top at once
   (`cohortgate.store.state.follow` listens to the swap);
5. **remove** — after ``grace_s`` (requests already routed to a dropped cluster finish), hand Envoy
   only the clusters still named (delta CDS sends the removals).

Requests never name a cluster Envoy lacks (no 503 ``NC``): clusters arrive before the policy that
names them and leave after the last policy that named them. The pure part, which clusters to add,
keep and drop, is `cluster_change` / `union_backends`; the rest is a thin adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cohortgate.core.errors import CohortgateError
from cohortgate.core.policy import Backend, Policy, model_digests_now, parse_policy
from cohortgate.support.files import FileStamp, changes

log = logging.getLogger("cohortgate.reload")

DEFAULT_WATCH_S = 0.5
DEFAULT_GRACE_S = 2.0
MODEL_WATCH_S = 1.0  # how often the local model files are looked at (a stat each) for a replacement in place
DEFAULT_CONFIRM_S = 5.0
CONFIRM_PER_CLUSTER_S = 0.005  # measured on 2 busy cores: ~3.8 ms (YAML), 0.5-5 ms (JSON, load 5 to 27)


# ------------------------------------------------------------------------------ the pure part


@dataclass(frozen=True, slots=True)
class ClusterChange:
    """What a policy change asks of Envoy."""

    added: frozenset[str]  # confirm these before the new policy serves
    removed: frozenset[str]  # drop these only after the old policy stopped serving (and a grace)
    changed: frozenset[str] = frozenset()  # same name, another endpoint: the new one goes to Envoy first


def clusters_of(backends: Iterable[Backend]) -> frozenset[str]:
    return frozenset(b.cluster for b in backends)


def cluster_change(old: Iterable[Backend], new: Iterable[Backend]) -> ClusterChange:
    before = {b.cluster: b for b in old}
    after = {b.cluster: b for b in new}
    a, b = before.keys(), after.keys()
    changed = frozenset(n for n in a & b if before[n] != after[n])
    return ClusterChange(added=frozenset(b - a), removed=frozenset(a - b), changed=changed)


def confirm_limit(base_s: float, clusters_in_file: int) -> float:
    """How long Envoy gets to accept a CDS file and activate its new clusters: ``base_s`` plus 5 ms
    a cluster in the file (Envoy parses all of it and builds the new clusters on its main thread).

    A flat 5 s refused every 1 000-route replacement: on a busy 2-core machine Envoy needed ~15 s for
    the 4 002-cluster union as YAML (~8 s to read it, ~7.6 s to add 2 000 clusters); as JSON 1.6-3 s
    at a load average of 5, 9-11 s at 27, where 1.5 ms a cluster refused a one-route edit. The limit
    costs nothing when Envoy is quick (the confirmation returns at once); this gives it 25 s."""
    return base_s + CONFIRM_PER_CLUSTER_S * clusters_in_file


def union_backends(*groups: Iterable[Backend]) -> tuple[Backend, ...]:
    """Every backend of every group, one per cluster name (the first one seen wins), in order."""
    seen: dict[str, Backend] = {}
    for group in groups:
        for b in group:
            seen.setdefault(b.cluster, b)
    return tuple(seen.values())


class ClustersNotConfirmed(CohortgateError):
    """Envoy did not show the new clusters in time; the reload is refused."""


# ------------------------------------------------------------------------------ Envoy adapters


class ClusterSink(Protocol):
    """How the `Reloader` moves Envoy's clusters: `EnvoyClusters` (a CDS file) or `gateway.xds.XdsClusters`."""

    cds_path: Any  # where the clusters go, for log lines

    async def write(self, backends: Iterable[Backend], source: str) -> bool: ...

    async def confirm(self, names: Iterable[str], timeout_s: float) -> None: ...

    async def close(self) -> None: ...


class EnvoyClusters:
    """Writes Envoy's filesystem-CDS file and asks its admin API which clusters are active."""

    def __init__(
        self, cds_path: str | os.PathLike[str], admin_url: str, *, upstream_ca: str | None = None, poll_s: float = 0.02
    ) -> None:
        """``admin_url`` is ``http://HOST:PORT`` or ``unix:PATH`` (admin on a 0600 socket)."""
        self.cds_path = Path(cds_path)
        self.admin_url = admin_url.rstrip("/")
        self.upstream_ca = upstream_ca
        self.poll_s = poll_s
        self._session: Any = None
        socket_path = self.admin_url.removeprefix("unix:") if self.admin_url.startswith("unix:") else None
        self._socket = socket_path
        self._base = "http://localhost" if socket_path is not None else self.admin_url

    def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            connector = aiohttp.UnixConnector(path=self._socket) if self._socket is not None else None
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2.0))
        return self._session

    async def write(self, backends: Iterable[Backend], source: str) -> bool:
        from cohortgate.deploy.envoy import write_cds_clusters

        backends = tuple(backends)
        return await asyncio.to_thread(
            write_cds_clusters, backends, self.cds_path, upstream_ca=self.upstream_ca, source=source
        )

    async def active(self) -> set[str]:
        """Names of the clusters Envoy has now, from admin ``/clusters?format=json`` (``cluster_statuses``)."""
        async with self._open().get(f"{self._base}/clusters?format=json") as resp:
            if resp.status != 200:
                raise ClustersNotConfirmed(f"Envoy admin /clusters answered {resp.status}")
            body = await resp.read()
        doc = await asyncio.to_thread(json.loads, body) if len(body) > 1 << 20 else json.loads(body)
        return {c["name"] for c in doc.get("cluster_statuses", ())}

    async def _cds_stats(self) -> tuple[str | None, int | None]:
        """(the CDS ``version_info`` Envoy accepted, its number of warming clusters).

        The version is a text readout, asked for by type (Envoy then walks only the text readouts:
        ~16 ms with 2 000 clusters); the warming clusters are a config dump that is empty once none
        is warming (~2 ms). Both as two stats of one ``/stats`` call took 150-330 ms of Envoy's main
        thread with 2 000 clusters (it walks all 80-210 thousand stats), the thread that applies the
        new file, and the confirmation polls every 20 ms."""
        version_url = f"{self._base}/stats?filter=%5Ecluster_manager%5C.cds%5C.version_text%24&type=TextReadouts"
        async with self._open().get(version_url) as resp:
            text = (await resp.read()).decode(errors="replace") if resp.status == 200 else ""
        stats = dict(line.partition(":")[::2] for line in text.splitlines())
        version = stats.get("cluster_manager.cds.version_text", "").strip().strip('"') or None
        async with self._open().get(f"{self._base}/config_dump?resource=dynamic_warming_clusters") as resp:
            body = await resp.read() if resp.status == 200 else b""
        try:
            warming: int | None = len(json.loads(body).get("configs", ())) if body else None
        except (ValueError, AttributeError):
            warming = None
        return version, warming

    async def loaded_version(self) -> str | None:
        """The CDS ``version_info`` Envoy has accepted (stat ``cluster_manager.cds.version_text``)."""
        return (await self._cds_stats())[0]

    async def confirm(self, names: Iterable[str], timeout_s: float) -> None:
        """Return once every cluster in ``names`` is active; raise `ClustersNotConfirmed` after ``timeout_s``.

        Envoy applies a CDS file whole or not at all: once it has accepted the version just written
        and no cluster is warming, every cluster of that file is active. Only when the file's version
        is unknown (or the stats say nothing of warming) is the active list itself read."""
        import aiohttp

        from cohortgate.deploy.envoy import written_version

        wanted = set(names)
        written = written_version(self.cds_path)
        deadline = time.monotonic() + timeout_s
        missing = wanted
        while True:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):  # no call outlives the limit
                    version, warming = await self._cds_stats() if written is not None else (None, None)
                    if written is not None and version != written:
                        problem = f"Envoy has not loaded CDS version {written} yet"
                    elif warming is not None and warming > 0:
                        problem = f"{warming} cluster(s) still warming"
                    elif written is not None and warming == 0:
                        return
                    else:
                        missing = wanted - await self.active()
                        if not missing:
                            return
                        problem = f"{len(missing)} new cluster(s) not active, e.g. {sorted(missing)[:3]}"
            except (TimeoutError, OSError, ValueError, aiohttp.ClientError, ClustersNotConfirmed) as exc:
                problem = f"Envoy admin {self.admin_url} unreachable: {exc or type(exc).__name__}"
            if time.monotonic() >= deadline:
                raise ClustersNotConfirmed(f"after {timeout_s:.1f}s: {problem}")
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class LoopLag:
    """How late a tiny periodic task wakes up: the time every request waits for the event loop.

    Run during a reload: the processor must answer Envoy within its message timeout (1 s), so a
    reload that holds the loop (or the GIL) longer than that turns requests on unchanged routes into 504s."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.max_s = 0.0

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.period_s)
            self.max_s = max(self.max_s, time.monotonic() - before - self.period_s)


# ------------------------------------------------------------------------------ the procedure


class Reloader:
    """Keeps a `gateway.service.PolicyHolder` on the policy file, Envoy's clusters in step.

    ``prepare(old, new)`` runs in a thread before the swap and returns a callable run at the swap
    (the service rebuilds its token verifier there); raising refuses the reload.
    """

    def __init__(
        self,
        holder: Any,
        *,
        prepare: Callable[[Policy, Policy], Callable[[], None] | None] | None = None,
        envoy: ClusterSink | None = None,
        watch_s: float = DEFAULT_WATCH_S,
        grace_s: float = DEFAULT_GRACE_S,
        confirm_s: float = DEFAULT_CONFIRM_S,
    ) -> None:
        if holder.path is None:
            raise ValueError("live reloads need the policy's file")
        self.holder = holder
        self.path: Path = holder.path
        self.prepare = prepare
        self.envoy = envoy
        self.watch_s = watch_s
        self.grace_s = grace_s
        self.confirm_s = confirm_s
        self._lock = asyncio.Lock()
        self._stamp = FileStamp.of(self.path)
        self._lingering: list[tuple[float, tuple[Backend, ...]]] = []  # (until, backends) still in Envoy
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_loop_lag_s = 0.0  # the worst event-loop lag during the last reload (requests wait that long)
        self._parse_s = 0.0  # the last reload's parse and compile (logged with its time)

    # ---- life

    async def start(self) -> None:
        """Start watching; with Envoy, write the serving clusters (this also warms the render cache)."""
        if self.envoy is not None:
            self._spawn(self._initial_cds(), "cohortgate-cds-initial")
        if self.watch_s > 0:
            self._spawn(self._watch(), "cohortgate-policy-watch")
            self._spawn(self._watch_models(), "cohortgate-model-watch")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.envoy is not None:
            await self.envoy.close()

    def trigger(self, reason: str) -> None:
        """Reload soon, from a signal handler (SIGHUP)."""
        self._spawn(self.reload(reason), "cohortgate-policy-reload")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _initial_cds(self) -> None:
        async with self._lock:
            started = time.monotonic()
            try:
                await self.envoy.write(self.holder.policy.backends, self.holder.policy.path)  # type: ignore[union-attr]
                # the first render imports and warms the renderer (seconds on a busy machine): an
                # edit arriving meanwhile waits for it
                log.info(
                    "Envoy clusters ready (%s): %d cluster(s), %.0f ms", self.envoy.cds_path,  # type: ignore[union-attr]
                    len(self.holder.policy.backends),
                    (time.monotonic() - started) * 1000,
                )  # fmt: skip
            except Exception:
                log.exception("cannot hand Envoy its clusters (%s)", self.envoy.cds_path)  # type: ignore[union-attr]

    async def _watch(self) -> None:
        async for stamp in changes(self.path, self.watch_s, since=self._stamp):
            self._stamp = stamp
            await self.reload("file changed")

    async def _watch_models(self) -> None:
        """A model file replaced in place leaves the policy's text alone but not the digest the audit
        line records: look at the local model files (a stat each) every ``MODEL_WATCH_S``."""
        while True:
            await asyncio.sleep(max(self.watch_s, MODEL_WATCH_S))
            try:
                changed = await asyncio.to_thread(self._models_changed, self.holder.policy)
            except Exception:
                log.debug("cannot look at the model files", exc_info=True)
                continue
            if changed:
                await self.reload("model file changed")

    @staticmethod
    def _models_changed(policy: Policy) -> bool:
        return model_digests_now(policy) != dict(policy.model_digests)

    # ---- one reload

    async def reload(self, trigger: str = "reload") -> bool:
        """Apply the file as it is now; True when a new policy serves. Never raises."""
        asked = time.monotonic()
        async with self._lock:
            started = time.monotonic()
            self._parse_s = 0.0
            lag = LoopLag()
            probe = asyncio.get_running_loop().create_task(lag.run(), name="cohortgate-reload-loop-lag")
            try:
                return await self._reload(trigger)
            except Exception as exc:  # anything unexpected: the same refusal as a bad file
                self.holder.failed(exc, trigger, reason="internal")
                return False
            finally:
                probe.cancel()
                self.last_loop_lag_s = lag.max_s
                log.info(
                    "policy reload (%s) took %.0f ms (parsing %.0f ms, %.0f ms waiting for the one before);"
                    " event loop lag at most %.1f ms meanwhile",
                    trigger,
                    (time.monotonic() - started) * 1000,
                    self._parse_s * 1000,
                    (started - asked) * 1000,
                    lag.max_s * 1000,
                )

    async def _reload(self, trigger: str) -> bool:
        holder = self.holder
        serving: Policy = holder.policy
        try:
            raw = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            holder.failed(exc, trigger, reason="unreadable")
            return False
        if hashlib.sha256(raw).hexdigest() == serving.digest and not await asyncio.to_thread(
            self._models_changed, serving
        ):
            log.debug("policy reload (%s): %s unchanged", trigger, self.path)
            return False
        try:
            parsing = time.monotonic()
            new = await asyncio.to_thread(parse_policy, raw, str(self.path), self.path.resolve().parent)
            self._parse_s = time.monotonic() - parsing
            commit = await asyncio.to_thread(self.prepare, serving, new) if self.prepare is not None else None
        except Exception as exc:
            holder.failed(exc, trigger)
            return False
        change = cluster_change(serving.backends, new.backends)
        if self.envoy is not None and not await self._add_clusters(serving, new, change, trigger):
            return False
        if commit is not None:
            commit()
        holder.install(new)  # one reference; follow() re-applies the controller's weights in the same call
        if self.envoy is not None and change.removed:
            self._lingering.append((time.monotonic() + self.grace_s, serving.backends))
            self._spawn(self._trim_later(), "cohortgate-cds-trim")
        return True

    def _still_in_envoy(self) -> tuple[Backend, ...]:
        now = time.monotonic()
        self._lingering = [(until, b) for until, b in self._lingering if until > now]
        return union_backends(*(b for _, b in self._lingering))

    async def _add_clusters(self, serving: Policy, new: Policy, change: ClusterChange, trigger: str) -> bool:
        envoy = self.envoy
        assert envoy is not None
        if not change.added and not change.changed:
            return True
        started = time.monotonic()
        # The new policy's backends first: a cluster whose endpoint changed is written as the new one.
        union = union_backends(new.backends, serving.backends, self._still_in_envoy())
        await envoy.write(union, new.path)  # not cancelled on the limit: a late write would undo the revert
        written = time.monotonic()
        limit = confirm_limit(self.confirm_s, len(union))
        try:
            left = limit - (time.monotonic() - started)
            if left <= 0:
                raise ClustersNotConfirmed(f"writing the clusters alone took more than {limit:.1f}s")
            await envoy.confirm(change.added | change.changed, left)
        except ClustersNotConfirmed as exc:
            self.holder.failed(exc, trigger, reason="envoy")
            with contextlib.suppress(Exception):  # back to what is named; Envoy drops the unconfirmed ones
                await envoy.write(union_backends(serving.backends, self._still_in_envoy()), serving.path)
            return False
        log.info(
            "Envoy confirmed %d new and %d changed cluster(s) in %.0f ms (%d in the set, handed over in %.0f ms)",
            len(change.added),
            len(change.changed),
            (time.monotonic() - started) * 1000,
            len(union),
            (written - started) * 1000,
        )
        return True

    async def _trim_later(self) -> None:
        await asyncio.sleep(self.grace_s + 0.01)
        async with self._lock:
            policy = self.holder.policy
            assert self.envoy is not None
            try:
                if await self.envoy.write(union_backends(policy.backends, self._still_in_envoy()), policy.path):
                    log.info("Envoy clusters trimmed to the serving policy %s", policy.digest[:12])
            except Exception:
                log.exception("cannot trim Envoy's clusters (%s; extra clusters stay)", self.envoy.cds_path)
