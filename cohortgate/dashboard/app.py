"""The dashboard's aiohttp adapter, served by the controller next to its JSON API.

    GET  /                        the page (index.html, dashboard.js, dashboard.css: package data),
                                  with the current document inline, so its first paint shows the state
    GET  /api/state               the page document once (JSON)
    GET  /api/events              Server-Sent Events: ``event: state`` with the document, on every
                                  controller interval and at once on a state change
    POST /api/actions/rollback    {"route", "variant"}  } only with ``--allow-actions`` (403 otherwise);
    POST /api/actions/promote     {"route", "variant"}  } ``Authorization: Bearer TOKEN`` required:
    POST /api/actions/resume      {"route"}             } 401 without one, 403 with a wrong one
    GET  /openapi.json            this OpenAPI 3.1 document (dashboard/openapi.py)

Reads need no token: the dashboard binds to loopback only and answers only requests whose Host is a
loopback name (a DNS-rebinding page cannot read it). Actions need the admin token in a header, never
a cookie, so another site cannot forge one (no CSRF), and run the controller API's own handler, so
they are audited exactly like ``cohortgate rollback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from cohortgate.controller.api import CONTROLLER_KEY, action_handler, status_document
from cohortgate.controller.loop import Controller
from cohortgate.controller.outcomes_api import OutcomesService
from cohortgate.controller.report import design_of
from cohortgate.core.rollout import Signal
from cohortgate.dashboard.openapi import OPENAPI_PATH
from cohortgate.dashboard.openapi import build as build_openapi
from cohortgate.dashboard.view import Recorder, view
from cohortgate.store.events import REQUEST, Event, EventSource
from cohortgate.store.state import StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_PORT = 9481
ASSETS = {
    "/": ("index.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}
ACTIONS = {"rollback": (Signal.ROLLBACK, True), "promote": (Signal.PROMOTE, True), "resume": (Signal.RESUME, False)}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
DASHBOARD_KEY = web.AppKey("dashboard", object)


class TappedSource:
    """The controller's event source, with every request event it reads shown to ``observe`` too."""

    def __init__(self, inner: EventSource, observe: Callable[[Event], None]) -> None:
        self.inner = inner
        self.observe = observe

    async def read(self, max_events: int, timeout_s: float) -> list[Event]:
        events = await self.inner.read(max_events, timeout_s)
        for e in events:
            if e.kind == REQUEST:
                self.observe(e)
        return events

    async def ack(self) -> None:
        await self.inner.ack()

    def __getattr__(self, name: str) -> Any:  # claim_stale and the like
        return getattr(self.inner, name)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status=status, content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _host_is_loopback(request: web.Request) -> bool:
    host = request.host or ""
    if host.startswith("["):
        name = host[: host.find("]") + 1]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.lower() in LOOPBACK_HOSTS


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Loopback Host only; JSON for every error; security headers on everything."""
    if not _host_is_loopback(request):
        resp: web.StreamResponse = _error(
            403, "bad_host", "the dashboard answers only on a loopback address (127.0.0.1, localhost, ::1)"
        )
    else:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
            resp = _error(exc.status, code, exc.text if exc.status != 404 else f"nothing at {request.path}")
            if "Allow" in exc.headers:  # found by contract fuzzing: a 405 names what is allowed (RFC 9110)
                resp.headers["Allow"] = exc.headers["Allow"]
        except Exception:
            log.exception("dashboard error on %s %s", request.method, request.path)
            resp = _error(500, "internal", "the dashboard could not answer; see the controller's log")
    if not resp.prepared:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
    return resp


def page_with_snapshot(html: bytes, doc: dict[str, Any]) -> bytes:
    """index.html with the document inline (a JSON data block, which the CSP lets through: it is
    never executed), so the page draws the current state before its event stream connects and a
    plain screenshot shows the experiment, not "connecting…"."""
    data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    data = data.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")  # no </script>
    block = b'<script id="snapshot" type="application/json">' + data + b"</script>\n  "
    html = html.replace(b'<script src="/dashboard.js">', block + b'<script src="/dashboard.js">', 1)
    when = doc.get("time", "")
    return html.replace(
        b'<div id="conn" class="pill warn">connecting\xe2\x80\xa6</div>',
        f'<div id="conn" class="pill ok">snapshot {when}</div>'.encode(),
        1,
    )


class Dashboard:
    """Builds the page document and pushes it to every open page."""

    def __init__(
        self,
        controller: Controller,
        recorder: Recorder,
        token: str,
        *,
        allow_actions: bool = False,
        push_s: float | None = None,
        clock: Callable[[], float] = time.time,
        outcomes: OutcomesService | None = None,
    ) -> None:
        self.controller = controller
        self.outcomes = outcomes  # the API's outcome service: its last look and lift history (lift panels)
        self.recorder = recorder
        self.token = token
        self.allow_actions = allow_actions
        self.push_s = push_s if push_s is not None else min(1.0, controller.config.interval_s)
        self.clock = clock
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()
        self.pushes = 0
        self._wake = asyncio.Event()
        self._audit: list[dict[str, Any]] = []
        self._audit_error: str | None = None
        self._store_down_since: float | None = None
        self._assets = {
            path: (resources.files(__package__).joinpath(f).read_bytes(), ct) for path, (f, ct) in ASSETS.items()
        }
        controller.store.watch(lambda _states: self._wake.set())

    # ------------------------------------------------------------------ the document

    async def document(self) -> dict[str, Any]:
        c = self.controller
        now = self.clock()
        status = await status_document(c)
        if c.redis_ok is False:
            self._store_down_since = self._store_down_since or now
        else:
            self._store_down_since = None
        if self._store_down_since is None:
            try:
                self._audit = await c.store.audit(None, 50)
                self._audit_error = None
            except StoreUnavailable as exc:
                self._audit_error = str(exc)
        return view(
            status,
            policy_weights={r.name: {v.name: v.weight for v in r.variants} for r in c.policy.routes},
            recorder=self.recorder,
            audit=self._audit,
            now=now,
            allow_actions=self.allow_actions,
            store_down_since=self._store_down_since,
            audit_error=self._audit_error,
            outcomes=self._outcomes(),
        )

    def _outcomes(self) -> dict[str, dict[str, Any]] | None:
        """Per route with metrics or labels: its design, the last look's results, the lift history and the
        accuracy from labels."""
        service = self.outcomes
        if service is None:
            return None
        out = {}
        for r in self.controller.policy.routes:
            labels = service.ledger.labels.results(r.name, r.control.name)
            if r.metrics or labels:
                out[r.name] = {
                    "design": design_of(r, service.ledger.alpha),
                    "results": service.latest.get(r.name, []),
                    "history": service.history.series(r.name),
                    "labels": labels,
                }
        return out

    async def frame(self) -> bytes:
        return (
            b"event: state\ndata: " + orjson.dumps(await self.document(), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"
        )

    def broadcast(self, data: bytes | None) -> None:
        for q in list(self.subscribers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # a slow page gets the newest document, not a backlog
            q.put_nowait(data)

    async def publish_forever(self) -> None:
        """Every ``push_s`` (the controller's interval, at most 1 s), and at once on a state change."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.push_s)
            self._wake.clear()
            if not self.subscribers:
                continue
            try:
                data = await self.frame()
            except Exception:
                log.exception("dashboard: cannot build the page document")
                continue
            self.pushes += 1
            self.broadcast(data)

    # ------------------------------------------------------------------ handlers

    async def _asset(self, request: web.Request) -> web.Response:
        body, content_type = self._assets[request.path]
        if request.path == "/":
            body = page_with_snapshot(body, await self.document())
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    async def _openapi(self, request: web.Request) -> web.Response:
        return _json(build_openapi())

    async def _state(self, request: web.Request) -> web.Response:
        return _json(await self.document())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no", **SECURITY_HEADERS}
        )
        await resp.prepare(request)
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self.subscribers.add(q)
        try:
            await resp.write(b"retry: 1000\n\n" + await self.frame())
            while True:
                try:
                    data = await asyncio.wait_for(q.get(), 15.0)
                except TimeoutError:
                    data = b": keep-alive\n\n"
                if data is None:
                    break
                await resp.write(data)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.subscribers.discard(q)
        return resp

    async def _action(self, request: web.Request) -> web.StreamResponse:
        verb = request.match_info["verb"]
        if verb not in ACTIONS:
            return _error(404, "not_found", f"no action {verb!r} (rollback, promote, resume)")
        if not self.allow_actions:
            return _error(
                403, "actions_disabled", "this dashboard is read-only; start the controller with --allow-actions"
            )
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "unauthenticated", "an admin bearer token is required for actions")
        if not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            return _error(403, "forbidden", "the admin token is not valid")
        signal, needs_variant = ACTIONS[verb]
        resp = await action_handler(signal, needs_variant)(request)
        self._wake.set()
        return resp

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
        app[CONTROLLER_KEY] = self.controller  # the API's action handler reads it
        app[DASHBOARD_KEY] = self
        for path in ASSETS:
            app.router.add_get(path, self._asset)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/actions/{verb}", self._action)
        app.router.add_get(OPENAPI_PATH, self._openapi)
        app.cleanup_ctx.append(self._publisher)
        app.on_shutdown.append(self._close_streams)
        return app

    async def _publisher(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(self.publish_forever(), name="dashboard-publisher")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _close_streams(self, app: web.Application) -> None:
        self.broadcast(None)
