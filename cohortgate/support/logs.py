"""Rate-limited logging for warnings that repeat once per request while something stays broken.

A sidecar whose Redis is down used to write one WARNING per request (1 334 lines in 10 s, issue
17.6), drowning every other line. `Throttle` logs the first occurrence of a kind of message at
once, then at most one line per ``every_s`` seconds for that kind, saying how many were held back;
`Throttle.resolved` logs the tally still held back when the condition ends (so the last counts are
never lost) and re-arms the kind, so the next failure is logged at once again.

The kind (``key``) defaults to the message template, so ``"sink failed: %s"`` with different
exception texts is one kind. Thread-safe; the hot path is one lock and one clock read.

`configure` sets up a process's service log as text or as ECS JSON (``--log-format ecs``, Elastic's
own ``ecs-logging`` formatter, so Filebeat and Fluent Bit ship the lines unchanged), and
`audit_to_ecs` maps a gateway audit record to ECS fields (docs/observability.md has the table).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

#: default seconds between two lines of one kind
EVERY_S = 30.0


@dataclass(slots=True)
class _Kind:
    last: float  # when a line of this kind was last written
    held: int = 0  # occurrences not written since then


class Throttle:
    """First occurrence at once, then one line per ``every_s`` with the count held back in between."""

    def __init__(
        self, logger: logging.Logger, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object, key: str | None = None) -> bool:
        """Log ``msg % args`` unless a line of this kind was written less than ``every_s`` ago.

        Returns whether a line was written. A written line after held-back ones ends with
        ``(N more like this in the last S s)``.
        """
        now = self.clock()
        kind_key = msg if key is None else key
        with self._lock:
            kind = self._kinds.get(kind_key)
            if kind is None:
                self._kinds[kind_key] = _Kind(now)
                held = 0
            elif now - kind.last < self.every_s:
                kind.held += 1
                return False
            else:
                held, since = kind.held, now - kind.last
                kind.last, kind.held = now, 0
        if held:
            self.logger.log(level, msg + " (%d more like this in the last %.0f s)", *args, held, since)
        else:
            self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: object, key: str | None = None) -> bool:
        return self.log(logging.WARNING, msg, *args, key=key)

    def error(self, msg: str, *args: object, key: str | None = None) -> bool:
        return self.log(logging.ERROR, msg, *args, key=key)

    def resolved(self, key: str, msg: str, *args: object, level: int = logging.INFO) -> bool:
        """The condition of kind ``key`` ended: log ``msg`` with the tally held back (if the kind was
        seen at all) and re-arm it. Returns whether a line was written."""
        with self._lock:
            kind = self._kinds.pop(key, None)
        if kind is None:
            return False
        if kind.held:
            self.logger.log(level, msg + " (%d more warnings held back before this)", *args, kind.held)
        else:
            self.logger.log(level, msg, *args)
        return True

    def held(self, key: str) -> int:
        """Occurrences of kind ``key`` not yet written (for tests and status)."""
        with self._lock:
            kind = self._kinds.get(key)
            return 0 if kind is None else kind.held


# ------------------------------------------------------------------ service logs: text or ECS

#: ``--log-format`` choices
LOG_FORMATS = ("text", "ecs")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ecs_formatter(service: str) -> logging.Formatter:
    """ECS JSON lines (``@timestamp``, ``log.level``, ``message``, ``ecs.version``, ``log.*``,
    ``process.*``, ``error.*``) with ``service.name`` and ``event.dataset`` = ``cohortgate.<service>``.
    A record's ``extra={"trace.id": ...}`` becomes ``trace.id``."""
    import ecs_logging

    return ecs_logging.StdlibFormatter(
        extra={
            "service.name": f"cohortgate-{service}",
            "service.type": "cohortgate",
            "event.dataset": f"cohortgate.{service}",
        },
        exclude_fields=("log.original",),  # the message, once
    )


def configure(service: str, level: str = "info", log_format: str = "text", stream: IO[str] | None = None) -> None:
    """The root logger of a process: one handler on ``stream`` (stderr) in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(ecs_formatter(service) if log_format == "ecs" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# ------------------------------------------------------------------ the audit trail in ECS

#: the ECS version ecs-logging's StdlibFormatter writes; the audit documents follow the same (a test
#: keeps the two equal)
ECS_VERSION = "1.6.0"

#: the gateway's audit outcome -> (event.type, event.outcome)
_AUDIT_OUTCOMES = {"allow": ("allowed", "success"), "deny": ("denied", "failure"), "error": ("error", "failure")}


def audit_to_ecs(record: Mapping[str, Any]) -> dict[str, Any]:
    """One gateway audit record (gateway/audit.py `FIELDS`, subject already hashed) as an ECS document.

    ECS has no field for a route or variant, so those live under the custom ``cohortgate.*`` namespace
    (ECS reserves no top-level name of that kind); the hashed subject is ``user.id``, never the raw one.
    """
    event_type, outcome = _AUDIT_OUTCOMES.get(record["outcome"], ("info", "unknown"))
    doc: dict[str, Any] = {
        "@timestamp": record["time"],
        "ecs.version": ECS_VERSION,
        "message": f"{record['outcome']} {record['route'] or '-'}/{record['variant'] or '-'} {record['reason']}",
        "event": {
            "kind": "event",
            "category": ["web"],
            "type": [event_type],
            "action": "route-decision",
            "outcome": outcome,
            "reason": record["reason"],
            "dataset": "cohortgate.audit",
            "module": "cohortgate",
        },
        "service": {"name": "cohortgate-gateway", "type": "cohortgate"},
        "http": {"request": {"id": record["request_id"]}, "response": {"status_code": record["status"]}},
        "cohortgate": {
            "route": record["route"],
            "variant": record["variant"],
            "region": record["region"],
            "shadows": record["shadows"],
            "identity": record["identity"],
        },
    }
    if record.get("subject") is not None:
        doc["user"] = {"id": record["subject"]}
    if record.get("identity"):
        doc["client"] = {"user": {"id": record["identity"]}}
    if record.get("trace_id"):
        doc["trace"] = {"id": record["trace_id"]}
    if record.get("model_digest"):  # the routed model: ECS has no model field, so under cohortgate.*
        doc["cohortgate"]["model"] = {"digest": record["model_digest"]}
    return doc
