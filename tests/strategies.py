"""Hypothesis strategies shared by the core tests (one place, as attrs does)."""

from __future__ import annotations

from hypothesis import strategies as st

REGIONS = ("eu", "ae", "us", "in")

units = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
salts = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@st.composite
def weights(draw, n: int | None = None) -> list[int]:
    """Integer percentages summing to 100, control first."""
    count = n if n is not None else draw(st.integers(min_value=1, max_value=5))
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=count - 1, max_size=count - 1)))
    edges = [0, *cuts, 100]
    return [edges[i + 1] - edges[i] for i in range(count)]


@st.composite
def ramp(draw) -> tuple[list[int], list[int], int]:
    """Weights before and after one challenger grows at control's expense: (before, after, grown index)."""
    n = draw(st.integers(min_value=2, max_value=3))
    before = draw(weights(n))
    grown = draw(st.integers(min_value=1, max_value=n - 1))
    delta = draw(st.integers(min_value=0, max_value=before[0]))
    after = list(before)
    after[grown] += delta
    after[0] -= delta
    return before, after, grown


@st.composite
def residency_policies(draw) -> str:
    """A random but valid policy YAML with variants and shadows spread over regions."""
    regions = draw(st.lists(st.sampled_from(REGIONS), min_size=1, max_size=4, unique=True))
    n = draw(st.integers(1, 3))
    ws = draw(weights(n))
    port = iter(range(20000, 30000))
    lines = [
        "version: 1",
        "jwt: {issuer: i, audience: a, jwks: jwks.json}",
        "routes:",
        "  - name: r",
        "    match: {model: m}",
        "    residency:",
        f"      on_missing_region: {draw(st.sampled_from(['fallback_control', 'deny']))}",
    ]
    default = draw(st.one_of(st.none(), st.sampled_from(regions)))
    if default is not None:
        lines.append(f"      default_region: {default}")
    lines.append("    variants:")
    for i, w in enumerate(ws):
        name = "control" if i == 0 else f"v{i}"
        own = regions if i == 0 else draw(st.lists(st.sampled_from(regions), min_size=1, unique=True))
        lines.append(f"      - name: {name}")
        lines.append(f"        weight: {w}")
        lines.append("        backends:")
        for region in own:
            lines.append(f"          - {{url: 'http://127.0.0.1:{next(port)}', region: {region}}}")
    shadows = draw(st.integers(0, 2))
    if shadows:
        lines.append("    shadows:")
        for i in range(shadows):
            own = draw(st.lists(st.sampled_from(regions), min_size=1, unique=True))
            lines.append(f"      - name: s{i}")
            lines.append(f"        percent: {draw(st.sampled_from([10, 50, 100]))}")
            lines.append("        backends:")
            for region in own:
                lines.append(f"          - {{url: 'http://127.0.0.1:{next(port)}', region: {region}}}")
    return "\n".join(lines) + "\n"
