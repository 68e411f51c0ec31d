"""The controller API's contract as an OpenAPI 3.1 document (served at ``/openapi.json``).

Written once as data, next to ``api.py`` and checked against it: ``tests/contracts`` asserts that
every route ``make_app`` registers is documented and nothing else, and fuzzes a running controller
with schemathesis against this document (statuses, bodies, the bearer requirement). The dashboard's
document (``cohortgate.dashboard.openapi``) reuses the action and error schemas from here, since it
mounts the same action handler.
"""

from __future__ import annotations

from typing import Any

from cohortgate import __version__
from cohortgate.core.contract import HEADER_OUTCOMES, OUTCOMES_PATH, QUALITY_REPORTS_PATH

OPENAPI_PATH = "/openapi.json"
#: (method, path) of every operation; the paths ``make_app`` registers, plus this document.
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/status"),
    ("GET", "/audit"),
    ("POST", "/actions/rollback"),
    ("POST", "/actions/promote"),
    ("POST", "/actions/resume"),
    ("POST", "/reports"),
    ("POST", QUALITY_REPORTS_PATH),
    ("POST", OUTCOMES_PATH),
    ("GET", OUTCOMES_PATH),
    ("GET", OPENAPI_PATH),
)
#: Answered without the admin token (the API's ``OPEN_PATHS``, plus this document).
OPEN = frozenset({"/healthz", "/metrics", OPENAPI_PATH})

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def json_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error(description: str) -> dict[str, Any]:
    return json_response(ref("error"), description)


_PHASES = ["running", "promoting", "promoted", "rolled_back", "halted"]

#: Schemas both the controller API and the dashboard answer with.
SCHEMAS: dict[str, Any] = {
    "error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "variant_action": {
        "type": "object",
        "required": ["route", "variant"],
        "properties": {
            "route": {"type": "string"},
            "variant": {"type": "string"},
            "actor": {"type": "string", "description": "Who asked (audited; cut to 100 characters)."},
        },
    },
    "route_action": {
        "type": "object",
        "required": ["route"],
        "properties": {"route": {"type": "string"}, "actor": {"type": "string"}},
    },
    "route_state": {
        "type": "object",
        "required": ["route", "weights", "variants", "version", "updated_at", "updated_by", "status"],
        "properties": {
            "route": {"type": "string"},
            "weights": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}},
            "variants": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["phase", "step", "since", "reason"],
                    "properties": {
                        "phase": {"type": "string", "enum": _PHASES},
                        "step": {"type": "integer"},
                        "since": {"type": "number"},
                        "reason": {"type": "string"},
                        "resume_to": {"anyOf": [{"type": "string", "enum": _PHASES}, {"type": "null"}]},
                    },
                },
            },
            "version": {"type": "integer"},
            "updated_at": {"type": "number"},
            "updated_by": {"type": "string"},
            "status": {"type": "string", "enum": _PHASES},
        },
    },
    "action_result": {
        "type": "object",
        "required": ["changes", "state"],
        "properties": {
            "changes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["variant", "action", "from", "to", "weights"],
                    "properties": {
                        "variant": {"type": "string"},
                        "action": {"type": "string"},
                        "from": {"type": "string", "enum": _PHASES},
                        "to": {"type": "string", "enum": _PHASES},
                        "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
                    },
                },
            },
            "state": ref("route_state"),
        },
    },
    "status": {
        "type": "object",
        "description": "Per route and variant: weight, phase, windows, verdicts, SRM, shadows.",
        "required": ["generated_at", "controller", "routes"],
        "properties": {
            "generated_at": {"type": "number"},
            "controller": {
                "type": "object",
                "required": ["name", "leader", "store"],
                "properties": {
                    "name": {"type": "string"},
                    "leader": {"type": "boolean"},
                    "store": {"type": "string", "enum": ["ok", "unreachable"]},
                    "served_by": {"type": "string"},
                },
            },
            "routes": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["status", "version", "variants"],
                    "properties": {
                        "status": {"type": "string", "enum": _PHASES},
                        "version": {"type": "integer"},
                        "variants": {"type": "object", "additionalProperties": {"type": "object"}},
                    },
                },
            },
        },
    },
    "report": {
        "type": "object",
        "description": "A sidecar's shadow report (sidecar.report.ShadowReport.to_json); one without a "
        "variant is counted as rejected.",
        "properties": {
            "route": {"type": "string"},
            "variant": {"type": "string"},
            "status": {"type": "integer"},
            "latency_ms": {"type": "number"},
            "request_id": {"type": "string"},
            "ts": {"type": "number"},
            "model": {"type": "string"},
            "digest": {"type": "string"},
            "output_digests": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}

BEARER = {"admin": {"type": "http", "scheme": "bearer", "description": "The admin token from --token-file."}}
GATEWAY = {
    "gateway": {
        "type": "apiKey",
        "in": "header",
        "name": HEADER_OUTCOMES,
        "description": "POST /outcomes only: the gateway's mark on a request it allowed on an outcomes route "
        "(an exposure token for that route under $COHORTGATE_EXPOSURE_KEY, at most 60 s old).",
    },
}
_AUTH = [{"admin": []}]
UNAUTHENTICATED = error("No valid admin bearer token.")


def _action(op_id: str, summary: str, body: str) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "summary": summary,
        "security": _AUTH,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}},
        "responses": {
            "200": json_response(ref("action_result"), "What changed, and the route's state now."),
            "400": error("The body is not JSON, or lacks route (and variant)."),
            "401": UNAUTHENTICATED,
            "404": error("No such route or variant."),
            "409": error("The transition is not allowed from the variant's phase."),
            "503": error("The state store cannot be reached."),
        },
    }


def action_operations() -> dict[str, dict[str, Any]]:
    """The three manual actions by verb (the dashboard mounts the same handler)."""
    return {
        "rollback": _action("rollback", "Roll a variant back to 0 % (its users return to control).", "variant_action"),
        "promote": _action("promote", "Promote a variant (to its rollout's last step).", "variant_action"),
        "resume": _action("resume", "Hand the route back to the policy file's weights.", "route_action"),
    }


_LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
#: The exposure token's shape (cohortgate.core.exposure): version, route, variant, unit, time, id, MAC.
_TOKEN = rf"^1\.{_LABEL}\.{_LABEL}\.[0-9a-zA-Z_-]{{1,64}}\.[0-9a-f]{{1,12}}\.[0-9a-zA-Z_-]{{8}}\.[0-9a-zA-Z_-]{{22}}$"
_OUTCOME = {
    "type": "object",
    "required": ["exposure", "metric", "value"],
    "properties": {
        "exposure": {
            "type": "string",
            "description": "The x-cohortgate-exposure token of the response (a token of another shape: 400).",
            "pattern": _TOKEN,
        },
        "metric": {"type": "string", "description": "A metric the route declares."},
        "value": {"type": "number"},
    },
}
_STATUSES = ["accepted", "duplicate", "unknown_metric", "bad_record", "malformed", "forged", "expired", "not_yet_valid"]


def outcome_operations() -> dict[str, Any]:
    """POST /outcomes (client outcomes, through an outcomes route) and GET /outcomes (the ledger's lift)."""
    return {
        "post": {
            "operationId": "post_outcomes",
            "summary": "Outcomes with exposure tokens: one (answered with its status) or a batch (202, per item).",
            "security": [{"admin": []}, {"gateway": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                _OUTCOME,
                                {"type": "array", "description": "A batch: an item that is not an outcome is counted."},
                                {
                                    "type": "object",
                                    "required": ["outcomes"],
                                    "properties": {"outcomes": {"type": "array"}},
                                },
                            ]
                        },
                        "example": {
                            "exposure": "1.shop.v1.0123456789abcdef.6b11b154.A8huSQdt.x",
                            "metric": "c",
                            "value": 1,
                        },
                    }
                },
            },
            "responses": {
                "200": json_response(
                    {"type": "object", "required": ["status"], "properties": {"status": {"const": "duplicate"}}},
                    "Already counted (same exposure and metric).",
                ),
                "202": json_response(
                    {
                        "type": "object",
                        "description": "One outcome: its status; a batch: accepted, each item's status, counts.",
                        "properties": {
                            "status": {"const": "accepted"},
                            "accepted": {"type": "integer", "minimum": 0},
                            "statuses": {"type": "array", "items": {"type": "string", "enum": _STATUSES}},
                            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                        },
                    },
                    "Accepted (one), or counted (a batch).",
                ),
                "400": error("Not JSON, not an outcome, or the token is malformed."),
                "401": UNAUTHENTICATED,
                "403": error("The exposure token is forged, altered, expired or not yet valid (code says which)."),
                "413": error("More than 10 000 outcomes, or a body over 4 MiB."),
                "422": error("The token's route declares no such metric."),
            },
        },
        "get": {
            "operationId": "get_outcomes",
            "summary": "The outcome ledger: lift and verdict per metric and challenger (one look), counts by status.",
            "security": _AUTH,
            "parameters": [{"name": "route", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "200": json_response(
                    {
                        "type": "object",
                        "required": ["results", "counts", "window_s"],
                        "properties": {
                            "results": {"type": "array", "items": {"type": "object"}},
                            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                            "exposures": {
                                "type": "object",
                                "description": "The access log's exposures (every answered request of a route "
                                "with metrics) by status: accepted, duplicate, or dropped (forged, expired, "
                                "not_yet_valid, malformed, mismatch, unmeasured).",
                                "additionalProperties": {"type": "integer"},
                            },
                            "window_s": {"type": "number"},
                            "design": {
                                "type": "object",
                                "description": "Per route: variants and weights, metrics, alpha, rollout plan and "
                                "the experiment's catalog entry (controller/report.py design_of).",
                                "additionalProperties": {"type": "object"},
                            },
                            "history": {
                                "type": "object",
                                "description": "Per route: each metric and challenger's lift over time, points "
                                "[t, rel, av_lo, av_hi, fh_lo, fh_hi, units_challenger, units_control] "
                                "(controller/lift_history.py).",
                                "additionalProperties": {"type": "array", "items": {"type": "object"}},
                            },
                            "labels": {
                                "type": "object",
                                "description": "Per route: accuracy, log-loss, MAE per variant from served "
                                "predictions joined with labels (controller/labels.py).",
                                "additionalProperties": {"type": "array", "items": {"type": "object"}},
                            },
                            "predictions_pending": {
                                "type": "integer",
                                "description": "Served predictions still waiting for their label.",
                            },
                        },
                    },
                    "The results.",
                ),
                "401": UNAUTHENTICATED,
                "404": error("No such route."),
            },
        },
    }


def build() -> dict[str, Any]:
    """The controller API's document."""
    text = {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness and leadership.",
                "security": [],
                "responses": {
                    "200": json_response(
                        {
                            "type": "object",
                            "required": ["ok", "leader", "name"],
                            "properties": {
                                "ok": {"const": True},
                                "leader": {"type": "boolean"},
                                "name": {"type": "string"},
                            },
                        },
                        "Alive.",
                    )
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Controller and ALS metrics.",
                "security": [],
                "responses": {"200": text},
            }
        },
        "/status": {
            "get": {
                "operationId": "status",
                "summary": "The status `cohortgate status` and the dashboard show (the leader's when following).",
                "security": _AUTH,
                "responses": {"200": json_response(ref("status"), "The status."), "401": UNAUTHENTICATED},
            }
        },
        "/audit": {
            "get": {
                "operationId": "audit",
                "summary": "Audit records, newest first.",
                "security": _AUTH,
                "parameters": [
                    {"name": "route", "in": "query", "required": False, "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "Clamped to 1..1000; default 50.",
                        "schema": {"type": "integer"},
                    },
                ],
                "responses": {
                    "200": json_response(
                        {
                            "type": "object",
                            "required": ["records"],
                            "properties": {"records": {"type": "array", "items": {"type": "object"}}},
                        },
                        "The records.",
                    ),
                    "400": error("limit is not an integer."),
                    "401": UNAUTHENTICATED,
                    "503": error("The state store cannot be reached."),
                },
            }
        },
        **{f"/actions/{verb}": {"post": op} for verb, op in action_operations().items()},
        "/reports": {
            "post": {
                "operationId": "reports",
                "summary": "Sidecar shadow reports (loopback only).",
                "security": _AUTH,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "description": "One report (the report schema) or a list of them (413 past 10 000); "
                                "an item that cannot be read as a report is counted as rejected, not refused.",
                                "anyOf": [{"type": "array"}, {"type": "object"}],
                            },
                            "example": [
                                {"route": "tabular", "variant": "canary", "status": 200, "latency_ms": 5.0, "ts": 1.0}
                            ],
                        }
                    },
                },
                "responses": {
                    "202": json_response(
                        {
                            "type": "object",
                            "required": ["accepted", "rejected"],
                            "properties": {
                                "accepted": {"type": "integer", "minimum": 0},
                                "rejected": {"type": "integer", "minimum": 0},
                            },
                        },
                        "Counted: reports that could not be read are rejected, not failed.",
                    ),
                    "400": error("The body is not JSON, or neither an object nor a list."),
                    "401": UNAUTHENTICATED,
                    "403": error("Not from loopback."),
                    "413": error("More than 10 000 reports, or a body over 4 MiB."),
                },
            }
        },
        QUALITY_REPORTS_PATH: {
            "post": {
                "operationId": "quality",
                "summary": "Sidecar quality reports: drift sketches per window (loopback only; docs/quality.md).",
                "security": _AUTH,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "description": "One QualityReport (cohortgate.core.sketch: model, variant, route, "
                                "window_start, window_end, inputs, outputs, violations; optional `segments`: "
                                '{"SEGMENT=VALUE": {"positive": n, "total": n}}) or a list of them (413 past 10 000).',
                                "anyOf": [{"type": "array"}, {"type": "object"}],
                            },
                        }
                    },
                },
                "responses": {
                    "202": json_response(
                        {
                            "type": "object",
                            "required": ["accepted", "rejected"],
                            "properties": {
                                "accepted": {"type": "integer", "minimum": 0},
                                "rejected": {"type": "integer", "minimum": 0},
                                "errors": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "Counted: a report that cannot be read, or names no route with a quality block, is rejected.",
                    ),
                    "400": error("The body is not JSON, or neither an object nor a list."),
                    "401": UNAUTHENTICATED,
                    "403": error("Not from loopback."),
                    "413": error("More than 10 000 reports, or a body over 4 MiB."),
                },
            }
        },
        OUTCOMES_PATH: outcome_operations(),
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {"200": json_response({"type": "object"}, "The OpenAPI 3.1 document.")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cohortgate controller API",
            "version": __version__,
            "description": "Loopback JSON API of the controller (the CLI and the dashboard use it). Every "
            'error is JSON {"error": {"code", "message"}} with its status, never a stack trace; every '
            "path but /healthz, /metrics and /openapi.json needs the admin bearer token (401 otherwise, "
            "unknown paths included).",
        },
        "security": _AUTH,
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {**BEARER, **GATEWAY}},
    }
