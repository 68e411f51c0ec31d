"""The controller's decisions as traces: each rollback, promotion, halt or resume it commits is one
span, ``cohortgate.controller.<action>``, carrying the evidence the judge acted on.

A decision answers no request, so its span is a root of its own trace (service
``cohortgate-controller``); a trace backend finds them by name or by ``cohortgate.route``. Off unless
the controller was given a collector; the controller then holds no `Tracing` and never imports
opentelemetry. Attributes are the audit record's: route, variant, action, signal, actor kind (never
an operator's name), phases, weights, reason and the evidence (as JSON: p-values, counts, guardrail
values), policy digest and state version.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cohortgate.support.tracing import Tracing

log = logging.getLogger(__name__)

SPAN_PREFIX = "cohortgate.controller."


def decision_attributes(record: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes from one audit record (`Controller._commit`'s): scalars as they are, mappings
    as compact JSON; the actor reduced to its kind (``controller``, ``operator``, ``api``)."""
    actor = str(record.get("actor", ""))
    kind = actor.split(":", 1)[0]
    reason = str(record.get("reason", ""))
    if actor and actor != kind:
        reason = reason.replace(actor, kind)  # a manual action's reason names its operator
    attributes: dict[str, Any] = {
        "cohortgate.route": record["route"],
        "cohortgate.variant": record["variant"],
        "cohortgate.action": record["action"],
        "cohortgate.signal": record["signal"],
        "cohortgate.actor": kind,
        "cohortgate.phase.from": record["from"],
        "cohortgate.phase.to": record["to"],
        "cohortgate.reason": reason,
        "cohortgate.weights.before": json.dumps(record.get("weights_before", {}), sort_keys=True),
        "cohortgate.weights.after": json.dumps(record.get("weights_after", {}), sort_keys=True),
        "cohortgate.evidence": json.dumps(record.get("evidence", {}), sort_keys=True, default=str),
    }
    if record.get("version") is not None:
        attributes["cohortgate.state_version"] = int(record["version"])
    if record.get("policy_digest"):
        attributes["cohortgate.policy_digest"] = str(record["policy_digest"])
    return attributes


def record_decision(tracing: Tracing, record: Mapping[str, Any]) -> None:
    """One span for a committed decision; never fails the controller."""
    try:
        now = time.time_ns()
        tracing.span(SPAN_PREFIX + str(record["action"]), {}, now, now, decision_attributes(record))
    except Exception:  # tracing must never stop a rollback
        log.debug("cannot record a decision span", exc_info=True)
