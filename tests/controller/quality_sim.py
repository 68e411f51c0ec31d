"""Planted quality scenarios, driven through the controller's own code (tests and bench/bench_quality.py).

`QualitySim` runs a real `Controller` (in-process store and sink, simulated clock): each simulated
second it ingests request events carrying the processor's segment label, posts each variant's
`QualityReport` for that second (sketches of seeded draws) to the controller's `QualityMonitor`,
and ticks. Behaviour is given per variant as plain functions of the time, so a scenario reads as
what it plants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cohortgate.controller.loop import Controller
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.core.sketch import NumericSketch, QualityReport
from cohortgate.store.events import REQUEST, Event, InProcessSink
from cohortgate.store.state import InProcessState

EDGES = tuple(float(e) for e in np.linspace(-4, 4, 17))


def quality_policy(
    weights: tuple[int, ...] = (50, 50), quality: str = "{}", max_error_rate: float = 0.5, alpha: float = 0.05
) -> Policy:
    names = ["control", "canary", "beta"][: len(weights)]
    lines = [
        "version: 1",
        "jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}",
        "routes:",
        "  - name: tabular",
        "    match: {model: tabular}",
        "    variants:",
    ]
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        lines.append(
            f"      - {{name: {name}, weight: {w}, backends: [{{url: 'http://127.0.0.1:{18201 + i}', region: eu}}]}}"
        )
    lines.append(f"    guardrails: {{max_error_rate: {max_error_rate}, alpha: {alpha}}}")
    lines.append(f"    quality: {quality}")
    return parse_policy("\n".join(lines) + "\n", filename="quality-test.yaml", base_dir=Path("/tmp"))


SEGMENTS = "{segments: [{name: device, source: header, key: x-device, values: [ios, android]}]}"


@dataclass
class Behaviour:
    """One variant: error rate per device value, input mean per time, positive rate per device."""

    error: Callable[[float, str], float] = lambda t, device: 0.02
    input_mean: Callable[[float], float] = lambda t: 0.0
    positive: Callable[[float, str], float] = lambda t, device: 0.5


@dataclass
class QualitySim:
    policy: Policy
    behaviours: dict[str, Behaviour]
    seed: int = 0
    rps: int = 200  # requests a second over the route (split by the current weights)
    rows: int = 100  # input rows a variant's sidecar sketches a second
    devices: tuple[str, ...] = ("ios", "android")
    now: float = 1_000.0
    changes: list = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # requests served, per variant

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.store = InProcessState()
        self.controller = Controller(self.policy, self.store, InProcessSink(), clock=lambda: self.now)

    async def start(self) -> QualitySim:
        await self.controller.start()
        return self

    def weights(self) -> dict[str, int]:
        return dict(self.controller.states["tabular"].weights)

    def second(self) -> None:
        t = self.now
        weights = self.weights()
        names = [n for n in weights if weights[n] > 0]
        shares = np.array([weights[n] for n in names], dtype=float) / 100
        variant = self.rng.choice(len(names), size=self.rps, p=shares)
        device = self.rng.choice(len(self.devices), size=self.rps)
        u = self.rng.random(self.rps)
        events = []
        for i in range(self.rps):
            name, dev = names[variant[i]], self.devices[device[i]]
            failed = u[i] < self.behaviours[name].error(t, dev)
            events.append(Event(REQUEST, "tabular", name, 503 if failed else 200, 5.0, segment=f"device={dev}", ts=t))
            self.requests[name] = self.requests.get(name, 0) + 1
        self.controller.ingest(events, t)
        monitor = self.controller.quality
        for name in names:
            b = self.behaviours[name]
            x = self.rng.normal(b.input_mean(t), 1.0, self.rows)
            report = QualityReport(
                "tabular", name, t, t + 1, {"x": NumericSketch.of(x, EDGES)}, route="tabular", rows=self.rows
            )
            served = {
                d: int(((variant == names.index(name)) & (device == k)).sum()) for k, d in enumerate(self.devices)
            }
            positives = {
                f"device={d}": {"positive": int(self.rng.binomial(n, b.positive(t, d))), "total": n}
                for d, n in served.items()
            }
            monitor.add_report(report, positives)

    async def run(self, seconds: int, until: Callable[[QualitySim], bool] | None = None) -> int:
        """Simulate up to ``seconds``; returns how many ran (fewer when ``until`` held)."""
        for i in range(seconds):
            self.second()
            self.now += 1
            self.changes += await self.controller.tick(self.now)
            if until is not None and until(self):
                return i + 1
        return seconds

    def phase(self, variant: str = "canary") -> str:
        return self.controller.states["tabular"].variants[variant].phase.value
