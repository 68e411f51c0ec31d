"""Delta CDS over gRPC: the gateway serves Envoy its clusters, and a reload waits for Envoy's ACK.

Filesystem CDS made Envoy re-read every cluster on each edit (2 002 clusters: 0.7-1 s on 2 busy cores
for a one-route edit) and the gateway poll admin to learn it had. Incremental xDS
(``envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters``) sends only the clusters that
changed, as protobuf, and Envoy answers each response with a request carrying its ``response_nonce``:
an ACK, or a NACK with ``error_detail`` (Envoy's reason). That answer is the confirmation.

The pure part is `DeltaStream`, one per Envoy stream: what that Envoy has (``known``: sent, and not
known to be refused), what it acknowledged (``acked``), and which responses await an answer (nonce →
what the response carried). ``next(desired)`` says what to send; ``answer(nonce, error)`` records an
ACK or a NACK. It knows no gRPC and is tested by feeding it (tests/gateway/test_xds.py).

`XdsClusters` is the `gateway.reload.Reloader`'s Envoy for this path, with the same two calls as the
file one (``write`` the clusters wanted, ``confirm`` names): ``write`` sets the desired set and wakes
every stream; ``confirm`` returns once every connected Envoy ACKed those names at their desired
version, and raises `ClustersNotConfirmed` on a NACK of them (with Envoy's message), when no Envoy is
connected, or after the limit. A reload refused that way writes the serving clusters back, so the next
response removes (or restores) what the refused one added. Removals of a policy's old clusters are
the later ``write`` of `Reloader._trim_later`.

Envoy acknowledges a CDS update once the clusters exist; a STATIC cluster (a literal IP) is active
by then, but one that must resolve DNS first is still warming (requests to it would fail), so with
an admin address `confirm` also waits until none of the DNS names among them is among Envoy's warming
clusters (``config_dump`` of the warming clusters, asked only when a DNS cluster is new or changed).

An Envoy that (re)connects sends the versions it has (``initial_resource_versions``); it is sent
every desired cluster whose version differs and told to remove the rest, so a restarted gateway
brings Envoy to its policy's full set. CDS is a wildcard subscription: subscribe lists are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cohortgate.core.policy import Backend
from gateway.reload import ClustersNotConfirmed

log = logging.getLogger("cohortgate.xds")

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
UNKNOWN = ""  # a version no cluster has: after a NACK we no longer know what Envoy holds for that name


# ------------------------------------------------------------------------------ the pure part


@dataclass(frozen=True, slots=True)
class Delta:
    """One response to send: these names at these versions, and these names removed."""

    nonce: str
    send: tuple[str, ...]
    remove: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """Envoy's answer to one response: ``error`` is None for an ACK, Envoy's message for a NACK."""

    nonce: str
    sent: Mapping[str, str]  # name -> version the response carried
    removed: frozenset[str]
    error: str | None


@dataclass(slots=True)
class DeltaStream:
    """One Envoy's delta CDS stream: what to send it next, and what it acknowledged."""

    known: dict[str, str] = field(default_factory=dict)  # name -> version Envoy has or was sent
    acked: dict[str, str] = field(default_factory=dict)  # name -> version Envoy acknowledged
    pending: dict[str, tuple[dict[str, str], frozenset[str]]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # name -> the version Envoy NACKed, while it is wanted
    last_error: str | None = None
    _counter: int = 0

    @classmethod
    def resumed(cls, initial_versions: Mapping[str, str]) -> DeltaStream:
        """A stream from an Envoy that already holds these clusters (it says so when it connects)."""
        have = dict(initial_versions)
        return cls(known=dict(have), acked=dict(have))

    def next(self, desired: Mapping[str, str]) -> Delta | None:
        """What to send so that Envoy has exactly ``desired`` (name -> version); None when it has.

        A version Envoy NACKed is not sent again until the caller clears ``rejected`` (a new desired set):
        a refused cluster is not retried in a loop, and the refusal stays visible to `refused`."""
        send = tuple(n for n, v in desired.items() if self.known.get(n) != v and self.rejected.get(n) != v)
        remove = tuple(n for n in self.known if n not in desired)
        if not send and not remove:
            return None
        self._counter += 1
        nonce = str(self._counter)
        for n in send:
            self.known[n] = desired[n]
        for n in remove:
            del self.known[n]
        self.pending[nonce] = ({n: desired[n] for n in send}, frozenset(remove))
        return Delta(nonce, send, remove)

    def answer(self, nonce: str, error: str | None) -> Answer | None:
        """Envoy answered the response ``nonce``; None for a nonce we did not send (or answered already).

        An ACK: Envoy has what it carried. A NACK: Envoy applies the valid part of a delta CDS update and
        refuses the rest, so what it holds for those names is unknown: they are resent (or removed) by the
        next `next`, except the refused versions themselves."""
        sent = self.pending.pop(nonce, None)
        if sent is None:
            return None
        added, removed = sent
        if error is None:
            self.acked.update(added)
            for n in removed:
                self.acked.pop(n, None)
            for n in added:
                self.rejected.pop(n, None)
        else:
            self.last_error = error
            for n, v in added.items():
                self.acked.pop(n, None)
                self.rejected[n] = v
                if self.known.get(n) == v:
                    self.known[n] = UNKNOWN
            for n in removed:
                self.acked.pop(n, None)
                self.known.setdefault(n, UNKNOWN)  # it may still be there: remove it again
        return Answer(nonce, added, removed, error)

    def confirmed(self, wanted: Mapping[str, str]) -> bool:
        """Has Envoy acknowledged every one of these names at this version?"""
        return all(self.acked.get(n) == v for n, v in wanted.items())

    def refused(self, wanted: Mapping[str, str]) -> list[str]:
        """The names of ``wanted`` Envoy NACKed at that very version."""
        return sorted(n for n, v in wanted.items() if self.rejected.get(n) == v)


# ------------------------------------------------------------------------------ the gRPC adapter


class XdsClusters:
    """Serves delta CDS on a Unix socket (0600) and confirms clusters by Envoy's ACK.

    The `gateway.reload.ClusterSink` the CDS file's `EnvoyClusters` also is (``write``, ``confirm``,
    ``close``), plus ``start`` (bind and serve; the Reloader's owner calls it before Envoy starts)."""

    def __init__(
        self, socket_path: str, *, admin_url: str | None = None, upstream_ca: str | None = None, poll_s: float = 0.01
    ) -> None:
        self.socket_path = socket_path
        self.cds_path = f"xds:{socket_path}"  # what the Reloader's log lines name
        self.upstream_ca = upstream_ca
        self.admin = _WarmingCheck(admin_url) if admin_url is not None else None
        self.poll_s = poll_s
        self._resources: dict[str, Any] = {}  # name -> ClusterResource wanted now
        self._desired: dict[str, str] = {}  # name -> version
        self._streams: dict[int, tuple[DeltaStream, asyncio.Event]] = {}
        self._changed = asyncio.Event()  # any stream answered, connected or left
        self._server: Any = None
        self._ids = 0
        self._seeded = False

    # ---- life

    async def start(self, backends: Iterable[Backend] = ()) -> None:
        """Listen; ``backends`` are the clusters a connecting Envoy gets first (none given: a connecting
        Envoy waits for the first ``write``; its initial fetch holds its listeners until then)."""
        import grpc
        from envoy.service.cluster.v3 import cds_pb2_grpc

        from cohortgate.support.files import private_umask

        if backends:
            await self.write(backends, "start")
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a gateway that died
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
        cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(_Servicer(self), server)
        with private_umask():  # only our user (Envoy runs as it) may hand Envoy clusters
            server.add_insecure_port(f"unix:{path}")
            await server.start()
        self._server = server
        log.info("delta CDS served on %s", path)

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(0.5)

    # ---- what the Reloader calls

    async def write(self, backends: Iterable[Backend], source: str) -> bool:
        """Make these the clusters Envoy should have; True when that changed anything. Returns at once:
        the streams send the difference, `confirm` waits for the ACK."""
        from cohortgate.deploy.envoy.resources import cluster_protos

        backends = tuple(backends)
        resources = await asyncio.to_thread(cluster_protos, backends, upstream_ca=self.upstream_ca)
        desired = {name: r.version for name, r in resources.items()}
        if desired == self._desired and self._seeded:
            return False
        self._resources, self._desired, self._seeded = resources, desired, True
        for stream, wake in self._streams.values():
            stream.rejected.clear()  # a new desired set: a NACKed version may be tried once more
            wake.set()
        return True

    async def confirm(self, names: Iterable[str], timeout_s: float) -> None:
        """Return once every connected Envoy ACKed these clusters (and none of them is warming);
        raise `ClustersNotConfirmed` on a NACK, with no Envoy connected, or after ``timeout_s``."""
        wanted = {n: self._desired[n] for n in names if n in self._desired}
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()
            streams = [s for s, _ in self._streams.values()]
            for stream in streams:
                refused = stream.refused(wanted)
                if refused:
                    raise ClustersNotConfirmed(f"Envoy rejected cluster(s) {refused[:3]}: {stream.last_error}")
            if streams and all(s.confirmed(wanted) for s in streams):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                problem = "no Envoy connected" if not streams else f"{len(wanted)} cluster(s) not acknowledged"
                raise ClustersNotConfirmed(f"after {timeout_s:.1f}s: {problem} (delta CDS on {self.socket_path})")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        resolving = {n for n in wanted if getattr(self._resources.get(n), "resolves", False)}  # IPs: active at ACK
        if self.admin is not None and resolving:
            await self.admin.wait_warm(resolving, deadline, self.poll_s)

    @property
    def connected(self) -> int:
        """How many Envoys hold a stream now."""
        return len(self._streams)

    # ---- one stream

    async def stream(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Serve one Envoy: read its answers in a task, send what `DeltaStream.next` says."""
        from envoy.service.discovery.v3 import discovery_pb2

        first = await anext(requests, None)
        if first is None:
            return
        state = DeltaStream.resumed(first.initial_resource_versions)
        wake = asyncio.Event()
        wake.set()
        self._ids += 1
        key = self._ids
        self._streams[key] = (state, wake)
        self._changed.set()
        node = first.node.id or "?"
        log.info("Envoy %s connected for delta CDS (it has %d cluster(s))", node, len(state.known))
        reader = asyncio.get_running_loop().create_task(self._read(requests, state, wake, node))
        try:
            while not reader.done():
                await _wait_either(wake, reader)
                wake.clear()
                if not self._seeded:
                    continue
                delta = state.next(self._desired)
                if delta is None:
                    continue
                resources = [self._resources[n] for n in delta.send]
                yield discovery_pb2.DeltaDiscoveryResponse(
                    type_url=CLUSTER_TYPE_URL,
                    nonce=delta.nonce,
                    resources=[
                        discovery_pb2.Resource(
                            name=r.name, version=r.version, resource={"type_url": r.type_url, "value": r.value}
                        )
                        for r in resources
                    ],
                    removed_resources=list(delta.remove),
                )
                sent, gone = len(delta.send), len(delta.remove)
                log.debug("delta CDS %s to %s: %d sent, %d removed", delta.nonce, node, sent, gone)
        finally:
            reader.cancel()
            self._streams.pop(key, None)
            self._changed.set()
            log.info("Envoy %s left delta CDS", node)

    async def _read(self, requests: AsyncIterator[Any], state: DeltaStream, wake: asyncio.Event, node: str) -> None:
        async for request in requests:
            error = request.error_detail.message if request.HasField("error_detail") else None
            if not request.response_nonce:
                continue
            answer = state.answer(request.response_nonce, error)
            if answer is not None and answer.error is not None:
                log.warning("Envoy %s rejected delta CDS %s: %s", node, answer.nonce, answer.error)
            self._changed.set()
            wake.set()  # after a NACK the names it carried are sent again (or removed)


async def _wait_either(event: asyncio.Event, task: asyncio.Task[Any]) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


class _Servicer:
    """The gRPC face: receives the stream and hands it to `XdsClusters.stream` (nothing else)."""

    def __init__(self, owner: XdsClusters) -> None:
        self.owner = owner

    async def DeltaClusters(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for response in self.owner.stream(request_iterator):  # grpc.aio needs an async generator here
            yield response

    async def StreamClusters(self, request_iterator: Any, context: Any) -> None:
        import grpc

        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "cohortgate serves delta CDS only (DELTA_GRPC)")

    async def FetchClusters(self, request: Any, context: Any) -> None:
        import grpc

        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "cohortgate serves delta CDS only (DELTA_GRPC)")


class _WarmingCheck:
    """Envoy's admin, asked only which clusters are still warming (DNS clusters, after the ACK)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._socket = self.admin_url.removeprefix("unix:") if self.admin_url.startswith("unix:") else None
        self._base = "http://localhost" if self._socket is not None else self.admin_url
        self._session: Any = None

    async def warming(self) -> set[str]:
        import aiohttp

        if self._session is None:
            connector = aiohttp.UnixConnector(path=self._socket) if self._socket is not None else None
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2.0))
        async with self._session.get(f"{self._base}/config_dump?resource=dynamic_warming_clusters") as resp:
            if resp.status != 200:
                raise ClustersNotConfirmed(f"Envoy admin answered {resp.status}")
            body = await resp.read()
        configs = json.loads(body).get("configs", ()) if body else ()
        return {c.get("cluster", {}).get("name", "") for c in configs}

    async def wait_warm(self, names: set[str], deadline: float, poll_s: float) -> None:
        import aiohttp

        while True:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    still = names & await self.warming()
                if not still:
                    return
                problem = f"{len(still)} cluster(s) still warming, e.g. {sorted(still)[:3]}"
            except (TimeoutError, OSError, ValueError, aiohttp.ClientError, ClustersNotConfirmed) as exc:
                problem = f"Envoy admin {self.admin_url} unreachable: {exc or type(exc).__name__}"
            if time.monotonic() >= deadline:
                raise ClustersNotConfirmed(f"acknowledged, but {problem}")
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
