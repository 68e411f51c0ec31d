"""The outcome side of the controller's loop: the ledger and its journal in, the judge's evidence out.

One `OutcomeGate` per controller. It owns the `OutcomeLedger` that ``POST /outcomes`` feeds
(controller/outcomes_api.py shares it) and its journal, and once per interval:

1. ``poll``: appends what the API accepted since the last interval to the journal (of the access
   log's exposures, a unit's first per route and variant, and on a ratio route one count line per
   unit for the rest: outcomes.py says why), and ingests what others appended there (``cohortgate
   outcomes import`` rows in the file; server-side producers' ``XADD`` on the Redis stream);
2. ``look``: computes each metric's lift for every challenger (one look of the always-valid
   sequences: their running intersections narrow);
3. ``evidence``: hands the judge one `OutcomeEvidence` per metric of a challenger -- the judge
   (pure) turns a primary loss or an inferior guardrail into a rollback, holds a step until every
   guardrail metric is non-inferior, and promotes on a primary win when the rollout says
   ``promote_on_win`` (judge.py);
4. ``decisions``: an audit record whenever a metric's verdict changes (win, loss, non_inferior,
   inferior, inconclusive), with its evidence (lift, always-valid interval, units), so a verdict
   that moves no weight -- an inconclusive guardrail, a win without ``promote_on_win`` -- is on the
   timeline too.

The journal is chosen at start: the Redis stream when the state store is Redis (every controller
replica reads the same one), else the JSON-lines file given (``cohortgate controller
--outcomes-journal``), else none (outcomes live in memory only). A journal that cannot be read or
written is retried every interval; accepted outcomes wait in memory meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cohortgate.controller import outcomes as O
from cohortgate.controller.judge import Evidence, OutcomeEvidence
from cohortgate.core import lift as L
from cohortgate.core.policy import Policy
from cohortgate.store.redis import redis_errors

log = logging.getLogger(__name__)

#: Verdicts worth an audit record when a metric reaches them (``pending`` is the absence of one).
DECIDED = frozenset(v.value for v in L.Verdict if v is not L.Verdict.PENDING)


def metric_specs(policy: Policy) -> dict[str, list[L.MetricSpec]]:
    """The policy's metric declarations as the ledger reads them, by route."""
    return {
        r.name: [
            L.MetricSpec(
                name=m.name,
                kind=m.kind,  # type: ignore[arg-type]
                direction=m.direction,  # type: ignore[arg-type]
                role=m.role,  # type: ignore[arg-type]
                margin=m.margin,
                margin_abs=m.margin_abs,
                planned_units=m.planned_units,
                covariate=m.covariate,
            )
            for m in r.metrics
        ]
        for r in policy.routes
        if r.metrics
    }


def attribution_window(policy: Policy) -> float:
    """The ledger's one window: the longest any metric declares (the default when none does)."""
    return max((m.attribution_window_s for r in policy.routes for m in r.metrics), default=O.DEFAULT_WINDOW_S)


def outcome_evidence(spec: L.MetricSpec, r: O.MetricResult) -> OutcomeEvidence:
    """One ledger result as the judge reads it."""
    return OutcomeEvidence(
        metric=r.metric,
        role=r.role,
        verdict=r.decision.verdict.value,
        lift=r.rel,
        interval=(r.bounds.rel_lo, r.bounds.rel_hi),
        units=r.units_challenger + r.units_control,
        planned_units=spec.planned_units,
        reason=r.decision.reason,
        margin=spec.margin,
    )


class OutcomeGate:
    """The ledger, its journal, and the per-interval look the judge reads (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        keys: Sequence[bytes] | None = None,
        journal_path: Path | str | None = None,
        alpha: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = O.OutcomeLedger({}, {}, keys, alpha=alpha, clock=clock)
        self.journal_path = Path(journal_path) if journal_path else None
        self.journal: O.FileJournal | O.RedisJournal | None = None
        self.journal_ok: bool | None = None
        self.replayed = 0
        self.latest: dict[str, list[O.MetricResult]] = {}  # route -> this interval's look
        self._verdicts: dict[tuple[str, str, str], str] = {}
        self.set_policy(policy)

    @classmethod
    def from_env(
        cls, policy: Policy, journal_path: Path | str | None = None, clock: Callable[[], float] = time.time
    ) -> OutcomeGate:
        """Keys from ``$COHORTGATE_EXPOSURE_KEY`` (none: every token refused)."""
        return cls(policy, O.keys_from_env(), journal_path=journal_path, clock=clock)

    def with_outcomes(self, route: str, variant: str, ev: Evidence) -> Evidence:
        """``ev`` with the challenger's outcome metrics added (what the loop hands the judge)."""
        return replace(ev, outcomes=self.evidence(route, variant)) if route in self.latest else ev

    def set_policy(self, policy: Policy) -> None:
        """Read metrics, controls and the attribution window from ``policy`` (a reload may add metrics)."""
        ledger = self.ledger
        ledger.metrics = {route: {m.name: m for m in specs} for route, specs in metric_specs(policy).items()}
        ledger.controls = {r.name: r.control.name for r in policy.routes if r.kind == "model"}
        ledger.window_s = attribution_window(policy)
        for route in set(self.latest) - set(ledger.metrics):
            self.latest.pop(route, None)

    async def start(self, store: Any) -> None:
        """Choose the journal (the store's Redis, else the file) and replay it into the ledger."""
        client = getattr(store, "client", None)
        if client is not None:
            self.journal = O.RedisJournal(client)
        elif self.journal_path is not None:
            self.journal = O.FileJournal(self.journal_path)
        before = sum(self.ledger.counts.values())
        await self.poll()
        self.replayed = sum(self.ledger.counts.values()) - before
        if self.journal is not None:
            log.info(
                "outcome journal %r: %d records replayed (%s)", self.journal, self.replayed, dict(self.ledger.counts)
            )

    async def poll(self) -> None:
        """Append what the API accepted to the journal, then ingest what others appended to it."""
        journal = self.journal
        self.ledger.flush_exposure_counts()  # the interval's later exposures: one count line per unit
        if journal is None:
            self.ledger.unjournaled.clear()  # no journal: the ledger in memory is all there is
            return
        try:
            records = await journal.read_new()
            self.ledger.ingest_many(records, journal=False)
            pending = self.ledger.unjournaled
            if pending:
                await journal.append(pending)
                del pending[: len(pending)]
        except (OSError, *redis_errors()) as exc:
            if self.journal_ok is not False:
                log.warning("outcome journal %r unavailable (%s); accepted outcomes kept in memory", journal, exc)
            self.journal_ok = False
            return
        if self.journal_ok is False:
            log.warning("outcome journal %r reachable again", journal)
        self.journal_ok = True

    def restart(self, route: str, variant: str, now: float, journal: bool = True) -> None:
        """A rolled-back challenger was resumed: its outcome experiment starts afresh (journaled when
        ``journal``: the leader's call; a follower adopting the same state only forgets locally)."""
        self.ledger.ingest({"kind": "restart", "route": route, "variant": variant, "t": now}, journal)
        for key in [k for k in self._verdicts if k[0] == route and k[1] == variant]:
            del self._verdicts[key]

    def look(self, route: str) -> list[O.MetricResult]:
        """One look at every metric and challenger of ``route`` (nothing when it declares no metric)."""
        results = self.ledger.results(route) if route in self.ledger.metrics else []
        self.latest[route] = results
        return results

    def evidence(self, route: str, variant: str) -> tuple[OutcomeEvidence, ...]:
        """The challenger's metrics at this interval's look, for the judge."""
        specs = self.ledger.metrics.get(route, {})
        return tuple(
            outcome_evidence(specs[r.metric], r)
            for r in self.latest.get(route, ())
            if r.challenger == variant and r.metric in specs
        )

    def decisions(self, route: str, now: float, actor: str, policy_digest: str) -> list[dict[str, Any]]:
        """Audit records for the metrics whose verdict changed at this look (see the module docstring)."""
        records = []
        for r in self.latest.get(route, ()):
            key = (route, r.challenger, r.metric)
            verdict = r.decision.verdict.value
            before = self._verdicts.get(key, L.Verdict.PENDING.value)
            if verdict == before:
                continue
            self._verdicts[key] = verdict
            if verdict not in DECIDED:
                continue
            records.append(
                {
                    "ts": now,
                    "route": route,
                    "variant": r.challenger,
                    "action": "outcome",
                    "signal": verdict,
                    "actor": actor,
                    "from": before,
                    "to": verdict,
                    "metric": r.metric,
                    "reason": f"{r.role} metric {r.metric}: {verdict}: {r.decision.reason}",
                    "evidence": {"outcome": r.to_json()},
                    "policy_digest": policy_digest,
                }
            )
        return records

    def summary(self, route: str) -> Mapping[str, Any]:
        """For the controller's status: the journal and each metric's verdict at the last look."""
        return {
            "journal": None if self.journal is None else repr(self.journal),
            "journal_ok": self.journal_ok,
            "metrics": [
                {"metric": r.metric, "challenger": r.challenger, "verdict": r.decision.verdict.value}
                for r in self.latest.get(route, ())
            ],
        }
