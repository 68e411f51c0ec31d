"""``POST /outcomes`` and ``GET /outcomes`` on the controller API: client outcomes into the ledger.

Clients post through Envoy (``POST /v1/outcomes`` or whatever path a route of ``kind: outcomes``
matches; mTLS + JWT like any route): the processor marks the request, Envoy rewrites its path to
``/outcomes`` and forwards it here. Who may post:

* **the gateway**, proven by its mark ``x-cohortgate-outcomes``: an exposure token minted for the
  outcomes route itself under ``$COHORTGATE_EXPOSURE_KEY`` (only the gateways and the controller
  hold it; the processor strips a client-sent one, and no response ever carries one), at most
  `PASS_MAX_AGE_S` old; Envoy removes the client's Authorization header, so the admin token is
  never needed on that path;
* anyone with the **admin token** (a server-side producer on the controller's host).

Each outcome is then proven by its own exposure token (forged, altered, expired ones are refused
with a JSON error and counted by reason). A client's ``t`` is ignored: the outcome's time is the
controller's clock, so a client cannot move a stale token back into its attribution window.

Bodies: one ``{"exposure", "metric", "value"}`` (answered with its status: 202 accepted, 200
duplicate, 4xx with the refusal's code), or a batch -- a list of them or ``{"outcomes": [...]}`` --
answered 202 with each item's status and the counts. ``GET /outcomes?route=R`` (admin token): the
ledger's lift per metric and challenger (one look), the outcomes' counts by status and the access
log's exposures' (``exposures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cohortgate.controller import archive as A
from cohortgate.controller import outcomes as O
from cohortgate.controller import report as R
from cohortgate.controller.gating import attribution_window, metric_specs
from cohortgate.controller.lift_history import LiftHistory
from cohortgate.controller.loop import Controller
from cohortgate.core.contract import HEADER_OUTCOMES, OUTCOMES_PATH
from cohortgate.core.exposure import ExposureRefused, Refusal, verify
from cohortgate.core.policy import Policy

log = logging.getLogger(__name__)

MAX_OUTCOMES = 10_000  # per request
PASS_MAX_AGE_S = 60.0  # the gateway's mark is minted per request: older than this is a replay
_REFUSALS = {r.code: r for r in Refusal}
#: A single outcome's status -> (HTTP status, message) when it is not accepted.
_ERRORS = {
    O.UNKNOWN_METRIC: (422, "the route declares no such metric"),
    O.BAD_RECORD: (400, 'give {"exposure": TOKEN, "metric": NAME, "value": NUMBER}'),
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


class OutcomesService:
    """The ledger, kept in step with the controller's current policy (a reload may add metrics)."""

    def __init__(
        self, controller: Controller, keys: tuple[bytes, ...] | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.controller = controller
        self.keys = keys
        self.clock = clock
        # the controller's own ledger: what is posted here is journaled and gates its rollouts (gating.py)
        self.ledger = controller.outcomes.ledger
        if keys is not None:
            self.ledger.keys = tuple(keys)
        self._policy: Policy | None = None
        self._outcome_routes: frozenset[str] = frozenset()
        self.history = LiftHistory()  # each sample's lift, for the dashboard's bands and the report's plots
        self.latest: dict[str, list[dict[str, Any]]] = {}  # route -> the last sample's results (JSON)
        self.archive_dir: Path | None = None  # set: finished experiments are archived here (archive.py)
        self._archived: set[tuple[str, float]] = set()
        self.sync()

    def sync(self) -> O.OutcomeLedger:
        policy = self.controller.policy
        if policy is not self._policy:
            ledger = self.ledger
            ledger.metrics = {route: {m.name: m for m in specs} for route, specs in metric_specs(policy).items()}
            ledger.controls = {r.name: r.control.name for r in policy.routes if r.kind == "model"}
            ledger.window_s = attribution_window(policy)
            self._outcome_routes = frozenset(r.name for r in policy.routes if r.kind == "outcomes")
            self._policy = policy
        return self.ledger

    def gateway_pass(self, mark: str) -> bool:
        """Whether ``mark`` is a fresh token the gateway minted for one of the policy's outcomes routes."""
        if not self.keys or not mark:
            return False
        self.sync()
        try:
            exp = verify(mark, self.keys, self.clock(), PASS_MAX_AGE_S)
        except ExposureRefused:
            return False
        return exp.route in self._outcome_routes

    # ------------------------------------------------------------------ looks, history, archive

    def sample(self, now: float | None = None) -> None:
        """One look at every route with metrics (the API app does this each controller interval): the
        results kept for the dashboard, a point of lift history, and the archive of a finished one."""
        ledger = self.sync()
        now = self.clock() if now is None else now
        for route in self.controller.policy.routes:
            if not route.metrics:
                continue
            # the loop's own look this interval when it made one (gating.py), so sampling adds no look
            looked = getattr(getattr(self.controller, "outcomes", None), "latest", {}).get(route.name)
            results = [r.to_json() for r in (looked if looked is not None else ledger.results(route.name))]
            self.latest[route.name] = results
            self.history.record(now, results)
            self._archive_if_finished(route.name, now)

    def report(
        self, route: str, now: float | None = None, status: dict[str, Any] | None = None, source: str = "controller"
    ) -> dict[str, Any]:
        """The route's report document (`cohortgate.controller.report`) from the last sample."""
        now = self.clock() if now is None else now
        policy_route = self.controller.policy.by_name[route]
        if status is None:
            status = self.controller.status(now)["routes"].get(route)
        return R.document(
            route,
            design=R.design_of(policy_route, self.ledger.alpha),
            results=self.latest.get(route, []),
            history=self.history.series(route),
            status=status,
            counts=dict(self.ledger.counts),
            labels=self.ledger.labels.results(route, policy_route.control.name),
            srm=(status or {}).get("srm"),
            generated_at=now,
            source=source,
        )

    def _archive_if_finished(self, route: str, now: float) -> None:
        if self.archive_dir is None or not self.controller.leader.held:
            return
        state = self.controller.states.get(route)
        if state is None or not state.variants:
            return
        phases = list(state.variants.values())
        if not all(v.phase.value in R.TERMINAL for v in phases):
            return
        finished_at = max(v.since for v in phases)
        if (route, finished_at) in self._archived:
            return
        self._archived.add((route, finished_at))
        try:
            path = A.write(self.archive_dir, route, finished_at, self.report(route, now, source="controller archive"))
        except (OSError, ValueError):
            log.exception("cannot archive the finished experiment on route %s", route)
            return
        if path is not None:
            log.info("experiment on route %s finished: archived in %s", route, path)


SERVICE_KEY = web.AppKey("outcomes", OutcomesService)


def route_of(policy: Policy, route: Any, model: str, variant: str) -> str | None:
    """The route a sidecar's report belongs to: the one it names (``--route``), else the route with that
    variant whose match names its model, else the only route with that variant; None when unclear."""
    candidates = [r for r in policy.routes if r.kind == "model" and any(v.name == variant for v in r.variants)]
    if isinstance(route, str) and route:
        return route if any(r.name == route for r in candidates) else None
    by_model = [r for r in candidates if r.model == model]
    if len(by_model) == 1:
        return by_model[0].name
    return candidates[0].name if len(candidates) == 1 else None


def take_predictions(app: web.Application, items: list[Any]) -> int:
    """The served predictions in sidecar reports (``--report-predictions``) into the ledger, where a
    label imported later meets them (`cohortgate.controller.labels`); how many were kept."""
    service = app.get(SERVICE_KEY)
    if service is None:
        return 0
    ledger, policy, kept = service.sync(), service.controller.policy, 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("prediction"), dict) or not item.get("request_id"):
            continue
        route = route_of(policy, item.get("route"), str(item.get("model", "")), str(item.get("variant", "")))
        if route is None:
            ledger.counts["prediction_without_route"] += 1
            continue
        record = {
            "kind": "prediction",
            "request_id": str(item["request_id"]),
            "route": route,
            "variant": str(item["variant"]),
            "prediction": item["prediction"],
            "t": service.clock(),
        }
        kept += ledger.ingest(record) == O.ACCEPTED
    return kept


def gateway_pass(request: web.Request) -> bool:
    """The API guard's question: a POST to /outcomes carrying the gateway's valid mark."""
    service = request.app.get(SERVICE_KEY)
    return (
        service is not None
        and request.method == "POST"
        and request.path == OUTCOMES_PATH
        and service.gateway_pass(request.headers.get(HEADER_OUTCOMES, ""))
    )


def _record(item: Any) -> dict[str, Any] | None:
    """A client's item as a ledger outcome (only the fields a client may set), or None when malformed."""
    if not isinstance(item, dict):
        return None
    exposure, metric, value = item.get("exposure"), item.get("metric"), item.get("value")
    if not isinstance(exposure, str) or not isinstance(metric, str) or isinstance(value, bool):
        return None
    if not isinstance(value, int | float):
        return None
    return {"kind": "outcome", "exposure": exposure, "metric": metric, "value": value}


def _ingest(ledger: O.OutcomeLedger, item: Any) -> str:
    record = _record(item)
    if record is None:
        ledger.counts[O.BAD_RECORD] += 1
        return O.BAD_RECORD
    return ledger.ingest(record)


async def _post(request: web.Request) -> web.Response:
    ledger = request.app[SERVICE_KEY].sync()
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "bad_request", "the body must be JSON")
    if isinstance(data, dict) and "outcomes" in data and "exposure" not in data:
        data = data["outcomes"]
    if isinstance(data, dict):
        status = _ingest(ledger, data)
        if status == O.ACCEPTED:
            return _json({"status": status}, 202)
        if status == O.DUPLICATE:
            return _json({"status": status}, 200)  # a retry: already counted once
        refusal = _REFUSALS.get(status)
        if refusal is not None:
            return _error(refusal.status, status, f"exposure token refused: {status}")
        code, message = _ERRORS.get(status, (400, status))
        return _error(code, status, message)
    if not isinstance(data, list):
        return _error(400, "bad_request", 'give one outcome, a list of them, or {"outcomes": [...]}')
    if len(data) > MAX_OUTCOMES:
        return _error(413, "payload_too_large", f"at most {MAX_OUTCOMES} outcomes per request")
    statuses = [_ingest(ledger, item) for item in data]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return _json({"accepted": counts.get(O.ACCEPTED, 0), "statuses": statuses, "counts": counts}, 202)


async def _get(request: web.Request) -> web.Response:
    ledger = request.app[SERVICE_KEY].sync()
    route = request.query.get("route")
    if route is not None and route not in request.app[SERVICE_KEY].controller.policy.by_name:
        return _error(404, "not_found", f"no route {route!r}")
    routes = [route] if route is not None else sorted(ledger.metrics)
    results = [r.to_json() for name in routes for r in ledger.results(name)]
    service = request.app[SERVICE_KEY]
    policy = service.controller.policy
    return _json(
        {
            "results": results,
            "counts": dict(ledger.counts),
            # the access log's exposures (every answered request of a route with metrics): accepted,
            # duplicate, and the refusals (forged, expired, mismatch...) counted and dropped
            "exposures": dict(ledger.exposure_counts),
            "window_s": ledger.window_s,
            # added for the report and the dashboard: the design and the lift over time, per route
            "design": {
                name: R.design_of(policy.by_name[name], ledger.alpha) for name in routes if name in policy.by_name
            },
            "history": {name: service.history.series(name) for name in routes},
            # served predictions joined with labels: accuracy / log-loss / MAE per variant (labels.py)
            "labels": {
                r.name: found
                for r in policy.routes
                if (route is None or r.name == route) and (found := ledger.labels.results(r.name, r.control.name))
            },
            "predictions_pending": ledger.labels.pending(),
        }
    )


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    """Sample the ledger each controller interval (see `OutcomesService.sample`)."""
    service = app[SERVICE_KEY]

    async def run() -> None:
        while True:
            await asyncio.sleep(service.controller.config.interval_s)
            try:
                service.sample()
            except Exception:
                log.exception("outcomes: cannot sample the ledger")

    task = asyncio.get_running_loop().create_task(run(), name="outcomes-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def register(app: web.Application, controller: Controller, keys: tuple[bytes, ...] | None = None) -> None:
    """Mount ``/outcomes`` on the controller API; ``keys`` default to ``$COHORTGATE_EXPOSURE_KEY``."""
    app[SERVICE_KEY] = OutcomesService(controller, keys if keys is not None else O.keys_from_env())
    app.router.add_post(OUTCOMES_PATH, _post)
    app.router.add_get(OUTCOMES_PATH, _get)
    app.cleanup_ctx.append(_sampler)
