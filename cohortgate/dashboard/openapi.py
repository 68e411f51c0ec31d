"""The dashboard's contract as an OpenAPI 3.1 document (served at ``/openapi.json``).

Written once as data and checked against ``Dashboard.make_app`` by ``tests/contracts``. The actions
are the controller API's own (same handler, same schemas, from ``cohortgate.controller.openapi``),
behind the dashboard's extra gates: ``--allow-actions`` (403 ``actions_disabled``) and the bearer
token (401 without one, 403 with a wrong one). Every answer needs a loopback Host (403 ``bad_host``).
"""

from __future__ import annotations

import copy
from typing import Any

from cohortgate import __version__
from cohortgate.controller.openapi import BEARER, SCHEMAS, action_operations, error, json_response, ref

OPENAPI_PATH = "/openapi.json"
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("GET", "/"),
    ("GET", "/dashboard.js"),
    ("GET", "/dashboard.css"),
    ("GET", "/api/state"),
    ("GET", "/api/events"),
    ("POST", "/api/actions/rollback"),
    ("POST", "/api/actions/promote"),
    ("POST", "/api/actions/resume"),
    ("GET", OPENAPI_PATH),
)

_BAD_HOST = error("The Host is not a loopback name (DNS-rebinding guard).")

_PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The page document (cohortgate.dashboard.view.view).",
    "required": ["generated_at", "time", "controller", "allow_actions", "notices", "routes", "denials", "audit"],
    "properties": {
        "generated_at": {"type": "number"},
        "time": {"type": "string"},
        "controller": {"type": "object"},
        "allow_actions": {"type": "boolean"},
        "notices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["level", "text"],
                "properties": {"level": {"enum": ["info", "warn", "error"]}, "text": {"type": "string"}},
            },
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status", "variants"],
                "properties": {
                    "name": {"type": "string"},
                    "status": {"type": "string"},
                    "variants": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
        "denials": {},
        "audit": {"type": "array", "items": {"type": "object"}},
        "horizon_s": {"type": "number"},
    },
}


def _asset(op_id: str, media: str, summary: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": op_id,
            "summary": summary,
            "responses": {
                "200": {"description": summary, "content": {media: {"schema": {"type": "string"}}}},
                "403": _BAD_HOST,
            },
        }
    }


def _dashboard_action(op: dict[str, Any]) -> dict[str, Any]:
    op = copy.deepcopy(op)
    op["operationId"] = "dashboard_" + op["operationId"]
    op["description"] = "Only with --allow-actions; runs the controller API's handler, audited like the CLI."
    op["responses"]["403"] = error("Actions are disabled (actions_disabled), the token is wrong, or a bad Host.")
    return op


def build() -> dict[str, Any]:
    """The dashboard's document."""
    paths: dict[str, Any] = {
        "/": _asset("page", "text/html", "The page."),
        "/dashboard.js": _asset("script", "text/javascript", "The page's script."),
        "/dashboard.css": _asset("stylesheet", "text/css", "The page's style sheet."),
        "/api/state": {
            "get": {
                "operationId": "state",
                "summary": "The page document once.",
                "responses": {"200": json_response(ref("page"), "The document."), "403": _BAD_HOST},
            }
        },
        "/api/events": {
            "get": {
                "operationId": "events",
                "summary": "Server-Sent Events: `event: state` with the page document on every push.",
                "responses": {
                    "200": {
                        "description": "An endless event stream (retry: 1000, keep-alive comments).",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "403": _BAD_HOST,
                },
            }
        },
        **{f"/api/actions/{verb}": {"post": _dashboard_action(op)} for verb, op in action_operations().items()},
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": json_response({"type": "object"}, "The OpenAPI 3.1 document."), "403": _BAD_HOST},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cohortgate dashboard",
            "version": __version__,
            "description": "The dashboard's page and data endpoints, on loopback only. Reads need no "
            'token; actions need --allow-actions and the admin bearer token. Errors are JSON {"error": '
            '{"code", "message"}}.',
        },
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, "page": _PAGE_SCHEMA}, "securitySchemes": BEARER},
    }
