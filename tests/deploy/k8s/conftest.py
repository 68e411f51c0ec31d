"""Renders of the example policy, shared by the offline Kubernetes tests (rendering takes ~1 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import load
from cohortgate.deploy.k8s.render import Rendered, render

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "policies" / "example.yaml"
K8S_VERSION = "1.33.0"  # the Kubernetes release whose schemas every core manifest must satisfy

# The golden configurations: the flags each one stands for are in its name and in GOLDEN_FLAGS.
CONFIGS: dict[str, RenderOptions] = {
    "edge": RenderOptions(image="cohortgate:golden", gpu=frozenset({("tabular", "canary")}), with_redis=True),
    "envoy-gateway": RenderOptions(image="cohortgate:golden", mesh=Mesh.ENVOY_GATEWAY),
    "istio": RenderOptions(image="cohortgate:golden", mesh=Mesh.ISTIO, hosts=("models.example.com",)),
}
GOLDEN_FLAGS = {
    "edge": ["--image", "cohortgate:golden", "--gpu-variant", "tabular/canary", "--with-redis"],
    "envoy-gateway": ["--image", "cohortgate:golden", "--mesh", "envoy-gateway"],
    "istio": ["--image", "cohortgate:golden", "--mesh", "istio", "--host", "models.example.com"],
}


@pytest.fixture(scope="session")
def example() -> tuple:
    return load(EXAMPLE)


@pytest.fixture(scope="session")
def renders(example) -> dict[str, Rendered]:
    policy, raw = example
    return {name: render(policy, raw, options, source=EXAMPLE.name) for name, options in CONFIGS.items()}


def docs(rendered: Rendered, kind: str | None = None) -> list[dict]:
    out = [d for group in rendered.documents.values() for d in group]
    return [d for d in out if kind is None or d["kind"] == kind]


def named(rendered: Rendered, kind: str, name: str) -> dict:
    found = [d for d in docs(rendered, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]
