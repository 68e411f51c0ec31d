"""The controller's small JSON API on loopback (the CLI and the dashboard use it).

    GET  /healthz                 no auth    {"ok": true, "leader": bool}
    GET  /metrics                 no auth    Prometheus exposition (controller + ALS metrics)
    GET  /status                  bearer     per route/variant: weight, phase, windows, verdicts, SRM, shadows
    GET  /audit?route=R&limit=N   bearer     newest first
    POST /actions/rollback        bearer     {"route": R, "variant": V}
    POST /actions/promote         bearer     {"route": R, "variant": V}
    POST /actions/resume          bearer     {"route": R}
    POST /reports                 bearer     sidecar shadow reports: a JSON list (or one object)
    POST /reports/quality         bearer     sidecar quality reports (drift sketches; controller/quality.py)
    POST /outcomes                bearer|gw  client outcomes with exposure tokens (controller/outcomes_api.py)
    GET  /outcomes?route=R        bearer     the outcome ledger's lift per metric and challenger
    GET  /openapi.json            no auth    this API's OpenAPI 3.1 document (controller/openapi.py)

The admin token lives in a file (mode 0600), created on first start; a client proves it can read
that file. Every write needs it, ``/reports`` included: a forged report would skew the
shadow-agreement figures a promotion is judged on, so "any local user" is not enough (the sidecar's
reporter reads the same file; see ``sidecar.report.HttpSink``). Reports also come from loopback only.
Errors are JSON ``{"error": {"code", "message"}}`` with their status; never a stack trace.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cohortgate.controller import outcomes_api
from cohortgate.controller.loop import Controller
from cohortgate.controller.openapi import OPENAPI_PATH
from cohortgate.controller.openapi import build as build_openapi
from cohortgate.core.contract import QUALITY_REPORTS_PATH
from cohortgate.core.rollout import InvalidTransition, Signal
from cohortgate.core.sketch import QualityReport
from cohortgate.store.events import Event, EventSink
from cohortgate.store.state import StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_PORT = 9480
MAX_REPORTS = 10_000

CONTROLLER_KEY = web.AppKey("controller", Controller)
TOKEN_KEY = web.AppKey("token", str)
SINK_KEY = web.AppKey("sink", object)


def load_or_create_token(path: str | Path) -> str:
    """Read the admin token, creating it (0600, 256 random bits) when the file does not exist."""
    p = Path(path)
    try:
        token = p.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status=status, content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _authorized(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), request.app[TOKEN_KEY].encode())


def _loopback(request: web.Request) -> bool:
    peer = request.remote or ""
    if not peer:  # a Unix socket
        return True
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


#: The only paths answered without the admin token: read-only, and nothing in them is secret.
OPEN_PATHS = frozenset({"/healthz", "/metrics", OPENAPI_PATH})


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Auth for everything but health and metrics, and JSON for every error."""
    if request.path not in OPEN_PATHS and not _authorized(request) and not outcomes_api.gateway_pass(request):
        return _error(401, "unauthenticated", "a valid admin bearer token is required")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
        if "Allow" in exc.headers:  # found by contract fuzzing: a 405 names what is allowed (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception:
        log.exception("controller API error on %s %s", request.method, request.path)
        return _error(500, "internal", "the controller could not answer; see its log")


async def _healthz(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER_KEY]
    return _json({"ok": True, "leader": bool(c.leader.held), "name": c.name})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[CONTROLLER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def status_document(c: Controller) -> dict[str, Any]:
    """The status `cohortgate status` and the dashboard show: ours, or the leader's when we follow."""
    doc = c.status()
    if not c.leader.held:  # a follower's windows are empty: show the leader's snapshot when there is one
        try:
            leader_doc = await c.store.read_status()
        except StoreUnavailable:
            leader_doc = None
        if leader_doc is not None:
            leader_doc.setdefault("controller", {})["served_by"] = c.name
            doc = leader_doc
    return doc


async def _openapi(request: web.Request) -> web.Response:
    return _json(build_openapi())


async def _status(request: web.Request) -> web.Response:
    return _json(await status_document(request.app[CONTROLLER_KEY]))


async def _audit(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER_KEY]
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "50"))))
    except ValueError:
        return _error(400, "bad_request", "limit must be an integer")
    try:
        records = await c.store.audit(request.query.get("route") or None, limit)
    except StoreUnavailable as exc:
        return _error(503, "store_unavailable", str(exc))
    return _json({"records": records})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return data


def action_handler(signal: Signal, needs_variant: bool) -> Any:
    """The one handler for manual actions (reads ``CONTROLLER_KEY``); the dashboard mounts it too."""

    async def handler(request: web.Request) -> web.Response:
        c = request.app[CONTROLLER_KEY]
        data = await _body(request)
        route, variant = data.get("route"), data.get("variant")
        if not isinstance(route, str) or (needs_variant and not isinstance(variant, str)):
            return _error(
                400, "bad_request", 'give {"route": ..., "variant": ...}' if needs_variant else 'give {"route": ...}'
            )
        actor = str(data.get("actor") or request.headers.get("X-Cohortgate-Actor") or "api")[:100]
        try:
            changes = await c.manual(signal, route, variant if needs_variant else None, f"manual:{actor}")
        except KeyError as exc:
            return _error(404, "not_found", str(exc).strip("'\""))
        except InvalidTransition as exc:
            return _error(409, "invalid_transition", str(exc))
        except StoreUnavailable as exc:
            return _error(503, "store_unavailable", str(exc))
        return _json(action_result(changes, c.states[route]))

    return handler


def action_result(changes: list[Any], state: Any) -> dict[str, Any]:
    """What an operator's action did, as the API and the embedded CLI both answer it."""
    return {
        "changes": [
            {
                "variant": t.variant,
                "action": t.action,
                "from": t.before.value,
                "to": t.after.value,
                "weights": dict(t.weights_after),
            }
            for t in changes
        ],
        "state": state.to_json(),
    }


async def _reports(request: web.Request) -> web.Response:
    if not _loopback(request):
        return _error(403, "forbidden", "reports are accepted from loopback only")
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "bad_request", "the body must be JSON")
    if not isinstance(data, list | dict):  # found by contract fuzzing: `null` or `5` was "1 rejected", 202
        return _error(400, "bad_request", "the body must be a report object or a list of them")
    items = data if isinstance(data, list) else [data]
    if len(items) > MAX_REPORTS:
        return _error(413, "payload_too_large", f"at most {MAX_REPORTS} reports per request")
    sink: EventSink = request.app[SINK_KEY]  # type: ignore[assignment]
    accepted = 0
    for item in items:
        try:
            sink.emit(Event.from_report(item))
            accepted += 1
        except (KeyError, ValueError, TypeError, AttributeError):
            continue
    outcomes_api.take_predictions(request.app, items)  # --report-predictions: kept for labels (labels.py)
    return _json({"accepted": accepted, "rejected": len(items) - accepted}, 202)


async def _quality(request: web.Request) -> web.Response:
    """Sidecar quality reports (`cohortgate.core.sketch.QualityReport` JSON): same guard as ``/reports``
    (admin token, loopback), since a forged sketch could trip a drift rollback."""
    if not _loopback(request):
        return _error(403, "forbidden", "quality reports are accepted from loopback only")
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "bad_request", "the body must be JSON")
    if not isinstance(data, list | dict):
        return _error(400, "bad_request", "the body must be a quality report object or a list of them")
    items = data if isinstance(data, list) else [data]
    if len(items) > MAX_REPORTS:
        return _error(413, "payload_too_large", f"at most {MAX_REPORTS} reports per request")
    monitor = request.app[CONTROLLER_KEY].quality
    accepted, errors = 0, []
    for item in items:
        try:
            if not isinstance(item, dict):
                raise ValueError("a quality report must be a JSON object")
            report = QualityReport.from_json(item)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        segments = item.get("segments")
        if monitor.add_report(report, segments if isinstance(segments, dict) else None):
            accepted += 1
        else:
            errors.append(f"no route with a quality block serves model {report.model!r} variant {report.variant!r}")
    # counted like /reports: a report that cannot be read or placed is rejected in the answer's counts
    # (with the reason), never a failed request; a sidecar's next window is not held up by it
    return _json({"accepted": accepted, "rejected": len(items) - accepted, "errors": errors[:5]}, 202)


def make_app(controller: Controller, token: str, sink: EventSink) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=4 * 1024 * 1024)
    app[CONTROLLER_KEY] = controller
    app[TOKEN_KEY] = token
    app[SINK_KEY] = sink
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    app.router.add_get("/audit", _audit)
    app.router.add_post("/actions/rollback", action_handler(Signal.ROLLBACK, True))
    app.router.add_post("/actions/promote", action_handler(Signal.PROMOTE, True))
    app.router.add_post("/actions/resume", action_handler(Signal.RESUME, False))
    app.router.add_post("/reports", _reports)
    app.router.add_post(QUALITY_REPORTS_PATH, _quality)
    app.router.add_get(OPENAPI_PATH, _openapi)
    outcomes_api.register(app, controller)  # POST/GET /outcomes: the outcome ledger (controller/outcomes_api.py)
    return app
