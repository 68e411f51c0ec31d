"""A served model's data contract at work: check each request, count violations, sketch each window.

``QualityGate`` sits on the infer path. ``check_inputs`` runs the contract over the request's
tensors (``sidecar.contract``), counts what broke (per feature and rule, for /metrics and the
report) and, in ``enforce`` mode, raises the 422. Accepted inputs and the model's outputs are
appended to a bounded buffer -- references, no copy -- and turned into sketches a block at a time
(``flush``, at most ``max_buffer_rows`` rows), so the hot path pays a list append, not a histogram.
Every request is checked and counted -- in ``enforce`` mode before the model sees it, which must
answer 422: by the batcher, one vector check per batch (``screen``; request by request only when the
batch breaks a rule), or per request where no batcher screens; in ``observe`` mode (and for
outputs, never refused) many requests at a time at the next flush (or /metrics scrape), so one
vectorised check serves up to ``max_buffer_rows`` rows. One served request in ``sketch_every`` is
sketched (a deterministic systematic sample, inputs and outputs of the same requests). A window's
sketches are count tables until ``take`` (``contract.Tally``). By default ``sketch_every`` grows with
the contract's width, ``ceil(features / SKETCH_FEATURES)``, so sketching costs about as much per
request for a 512-column model as for a 64-column one; the report's ``rows`` are the rows sketched.
``take`` closes the window and returns its ``QualityReport`` (cohortgate.core.sketch): counts only,
never a raw value. With the request's segment label (``x-cohortgate-segment``, set by the gateway)
and a contract that names a positive class, every request also counts, per ``segment=value``, its
rows and those predicted positive: the controller's four-fifths rule reads them (``segments``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from cohortgate.core.sketch import QualityReport
from sidecar.contract import Contract, Findings
from sidecar.metrics import SidecarMetrics

MAX_SEGMENT_KEYS = 256  # distinct segment=value keys per window; the gateway sends declared values only
SKETCH_FEATURES = 64  # features sketched per request, about, by default (see sketch_every)
DEFAULT_BUFFER_ROWS = 1024  # rows sketched per flush: a flush holds the event loop a few ms


class QualityGate:
    """Check, count and sketch for one (model, variant); used from the event loop's thread only."""

    def __init__(
        self,
        contract: Contract,
        *,
        model: str,
        variant: str,
        route: str | None = None,
        metrics: SidecarMetrics | None = None,
        max_buffer_rows: int = DEFAULT_BUFFER_ROWS,
        sketch_every: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.contract = contract
        self.model, self.variant, self.route = model, variant, route
        self._metrics = metrics
        self._max_rows = max_buffer_rows
        self._clock = clock
        self._used_in = sorted({r.index for r in contract._input_rules})
        self._used_out = sorted({r.index for r in contract._output_rules})
        width = len(contract.inputs) + len(contract.outputs)
        self.sketch_every = sketch_every or max(1, math.ceil(width / SKETCH_FEATURES))
        self._seen = 0
        self.screened = False  # True: the batcher runs ``screen`` on each batch, so enforce mode checks there
        self._reset(clock())
        if metrics is not None:
            metrics.on_scrape = self.flush  # a scrape sees every request counted

    def _reset(self, start: float) -> None:
        self.window_start = start
        self.requests = 0
        self.rows = 0
        self.violations: dict[str, dict[str, int]] = {}
        self.segments: dict[str, dict[str, int]] = {}
        self._inputs = self.contract.tally("inputs")
        self._outputs = self.contract.tally("outputs")
        self._buf_in: list[Sequence[np.ndarray]] = []
        self._buf_out: list[Sequence[np.ndarray]] = []
        self._unchecked_in: list[Sequence[np.ndarray]] = []  # observe mode: checked at the next flush
        self._unchecked_out: list[Sequence[np.ndarray]] = []
        self._buffered = 0

    # Hot path ------------------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[np.ndarray], rows: int) -> Sequence[np.ndarray] | None:
        """Count what the inputs break; raise ``ContractViolation`` (422) when the contract enforces
        (unless the batcher screens for us: ``screened``). The inputs when this request is in the
        sketch sample, else None: pass it to ``observe_outputs``, which sketches only what was served."""
        self.requests += 1
        if self.contract.enforce:
            if not self.screened:
                findings = self.contract.check_inputs(inputs)
                if findings is not None:
                    raise self._refuse(findings)
        elif self._used_in:  # nothing to refuse: check many requests at once, at the next flush
            self._unchecked_in.append(inputs)
            self._grow(rows)
        self._seen += 1
        if self._seen < self.sketch_every:
            return None
        self._seen = 0
        return inputs

    def screen(self, merged: Sequence[np.ndarray], rows: Sequence[int]) -> list[BaseException | None] | None:
        """The batcher's admission check (``Batcher.screen``) in enforce mode: one vector check of the
        whole batch; only a batch that breaks a rule is checked request by request."""
        if self.contract.check_inputs(merged) is None:
            return None
        refused: list[BaseException | None] = []
        start = 0
        for n in rows:
            findings = self.contract.check_inputs([t[start : start + n] for t in merged])
            start += n
            refused.append(None if findings is None else self._refuse(findings))
        return refused

    def _refuse(self, findings: Findings) -> BaseException:
        self._count(findings, "input")
        if self._metrics is not None:
            self._metrics.contract_rejected += 1
        return self.contract.refuse(findings)

    def observe_outputs(
        self, outputs: Sequence[np.ndarray], rows: int, sketch: Sequence[np.ndarray] | None = None, segment: str = ""
    ) -> None:
        """Count what the model's outputs break (never refused); sketch the request's inputs and
        outputs when ``sketch`` (``check_inputs``' answer) holds its inputs; count its positive
        predictions under each of ``segment``'s ``name=value`` pairs."""
        if segment and self.contract.positive is not None:
            self._count_segments(segment, self.contract.count_positive(outputs) or 0, rows)
        if self._used_out:  # never refused: checked many at once, at the next flush
            self._unchecked_out.append(outputs)
            self._grow(rows)
        if sketch is not None:
            self.rows += rows
            if self._used_in:
                self._buf_in.append(sketch)
                self._grow(rows)
            if self._used_out:
                self._buf_out.append(outputs)
                self._grow(rows)

    def _count_segments(self, label: str, positive: int, rows: int) -> None:
        for key in label.split(";"):
            name, eq, value = key.partition("=")
            if not (eq and name and value):
                continue
            cell = self.segments.get(key)
            if cell is None:
                if len(self.segments) >= MAX_SEGMENT_KEYS:
                    continue
                cell = self.segments[key] = {"positive": 0, "total": 0}
            cell["positive"] += positive
            cell["total"] += rows

    def _grow(self, rows: int) -> None:
        self._buffered += rows
        if self._buffered >= self._max_rows:
            self.flush()

    def _count(self, findings: Findings, side: str) -> None:
        counter = self._metrics.contract_violations if self._metrics is not None else None
        for feature, rules in findings.counts.items():
            mine = self.violations.setdefault(feature, {})
            for rule, n in rules.items():
                mine[rule] = mine.get(rule, 0) + n
                if counter is not None:
                    counter[(side, feature, rule)] += n

    # Windows -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Check what waits (observe mode, outputs) and sketch what is buffered, into the window."""
        if self._unchecked_in:
            findings = self.contract.check_inputs(_stack(self._unchecked_in, self._used_in))  # type: ignore[arg-type]
            if findings is not None:
                self._count(findings, "input")
        if self._unchecked_out:
            findings = self.contract.check_outputs(_stack(self._unchecked_out, self._used_out))  # type: ignore[arg-type]
            if findings is not None:
                self._count(findings, "output")
        self._unchecked_in, self._unchecked_out = [], []
        if self._buf_in:
            self._inputs.add(_stack(self._buf_in, self._used_in))
        if self._buf_out:
            self._outputs.add(_stack(self._buf_out, self._used_out))
        self._buf_in, self._buf_out, self._buffered = [], [], 0

    def take(self, now: float | None = None) -> QualityReport:
        """Close the window: its report, and a fresh window from ``now``."""
        end = self._clock() if now is None else now
        self.flush()
        report = QualityReport(
            self.model,
            self.variant,
            self.window_start,
            end,
            self._inputs.sketches(),
            self._outputs.sketches(),
            self.violations,
            self.route,
            self.rows,
            self.requests,
            self.segments,
        )
        self._reset(end)
        return report


def _stack(buffer: Sequence[Sequence[np.ndarray]], used: Sequence[int]) -> dict[int, np.ndarray]:
    out = {}
    for i in used:
        parts = [b[i] for b in buffer]
        out[i] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out
