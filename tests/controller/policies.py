"""Small policies for the controller tests (backends need not exist: nothing here connects to them)."""

from __future__ import annotations

from pathlib import Path

from cohortgate.core.policy import Policy, parse_policy


def policy_text(
    weights: tuple[int, ...] = (90, 10),
    steps: list[int] | None = (10, 25, 50, 100),  # type: ignore[assignment]
    interval_s: float = 30,
    min_samples: int = 200,
    max_error_rate: float = 0.05,
    max_p99_ms: float | None = 250,
    shadow: bool = True,
    base_port: int = 18100,
) -> str:
    names = ["control", "canary", "beta"][: len(weights)]
    lines = [
        "version: 1",
        "jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}",
        "routes:",
        "  - name: tabular",
        "    match: {model: tabular}",
        "    cohorts: {unit: {claim: sub}, salt: controller-tests}",
        "    residency: {source: {claim: residency}, on_missing_region: fallback_control}",
        "    variants:",
    ]
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        lines += [
            f"      - name: {name}",
            f"        weight: {w}",
            f"        backends: [{{url: 'http://127.0.0.1:{base_port + 1 + i}', region: eu}}]",
        ]
    if shadow:
        lines += [
            "    shadows:",
            "      - name: challenger",
            "        percent: 100",
            f"        backends: [{{url: 'http://127.0.0.1:{base_port + 9}', region: eu}}]",
        ]
    p99 = "null" if max_p99_ms is None else max_p99_ms
    lines += [
        f"    guardrails: {{max_error_rate: {max_error_rate}, max_p99_ms: {p99}, min_samples: {min_samples}}}",
    ]
    if steps:
        lines += [f"    rollout: {{variant: canary, steps: {list(steps)}, interval_s: {interval_s}}}"]
    return "\n".join(lines) + "\n"


def make_policy(**kwargs) -> Policy:
    return parse_policy(policy_text(**kwargs), filename="controller-test.yaml", base_dir=Path("/tmp"))


def write_policy(path: Path, **kwargs) -> Path:
    path.write_text(policy_text(**kwargs))
    return path
