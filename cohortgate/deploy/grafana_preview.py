"""The Grafana dashboard's panels as a static page, from a real Prometheus, without Grafana.

`cohortgate grafana render` writes a dashboard model; whether its queries show anything depends on
the metrics a running stack exports. This runs every panel's PromQL against a Prometheus (the same
variable and interval substitutions Grafana makes: ``$route``/``$variant`` as "All",
``$__rate_interval``, ``$__range``) and lays the answers out on the dashboard's grid as inline SVG:
a look at the dashboard where no Grafana runs, and a test that the panels have data.

Fetching is in ``fetch``; ``page`` is pure (panels in, HTML out).
"""

from __future__ import annotations

import html
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: Grafana's "All" for a multi-value variable with ``allValue: .*``
ALL = ".*"
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True, slots=True)
class Series:
    legend: str
    points: tuple[tuple[float, float], ...]  # (unix seconds, value), NaN dropped


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    kind: str  # "timeseries" or "stat"
    unit: str
    grid: tuple[int, int, int, int]  # x, y, w, h in Grafana's 24-column units
    series: tuple[Series, ...]
    row: str = ""

    @property
    def has_data(self) -> bool:
        return any(s.points for s in self.series)


def substitute(expr: str, *, range_s: int, rate_interval_s: int) -> str:
    """A panel's PromQL as Grafana sends it with every variable on "All"."""
    return (
        expr.replace("$route", ALL)
        .replace("$variant", ALL)
        .replace("$__rate_interval", f"{rate_interval_s}s")
        .replace("$__range", f"{range_s}s")
    )


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format (a missing label reads as empty, as in Grafana)."""
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or json.dumps(labels, sort_keys=True)


Getter = Callable[[str], dict[str, Any]]


def _http_get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def fetch(
    prometheus: str,
    dashboard: dict[str, Any],
    *,
    end: float,
    range_s: int = 900,
    step_s: int = 5,
    rate_interval_s: int = 60,
    get: Getter = _http_get,
) -> list[Panel]:
    """Every panel of ``dashboard`` with the series Prometheus answers for its targets."""
    api = prometheus.rstrip("/") + "/api/v1"
    panels: list[Panel] = []
    row = ""
    for p in dashboard["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        series: list[Series] = []
        for target in p.get("targets", []):
            query = substitute(target["expr"], range_s=range_s, rate_interval_s=rate_interval_s)
            if p["type"] == "stat":
                url = f"{api}/query?" + urllib.parse.urlencode({"query": query, "time": end})
            else:
                params = {"query": query, "start": end - range_s, "end": end, "step": step_s}
                url = f"{api}/query_range?" + urllib.parse.urlencode(params)
            doc = get(url)
            if doc.get("status") != "success":
                raise ValueError(f"panel {p['title']!r}: Prometheus refused {query!r}: {doc.get('error')}")
            for result in doc["data"]["result"]:
                values = result.get("values") or ([result["value"]] if "value" in result else [])
                points = tuple((float(t), float(v)) for t, v in values if v not in ("NaN", "+Inf", "-Inf"))
                series.append(Series(legend(target.get("legendFormat", ""), result["metric"]), points))
        g = p["gridPos"]
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        panels.append(Panel(p["title"], p["type"], unit, (g["x"], g["y"], g["w"], g["h"]), tuple(series), row))
    return panels


# ------------------------------------------------------------------------------------- the page

_COLOURS = ("#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a")
_W, _H, _PAD = 560, 170, 34


def _fmt(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "percent":
        return f"{value:.0f}%"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.1f}/s"
    return f"{value:.3g}"


def _chart(panel: Panel) -> str:
    drawn = [s for s in panel.series if s.points]
    if not drawn:
        return '<div class="empty">No data</div>'
    if panel.kind == "stat":
        cells = "".join(
            f'<div class="stat"><b>{_fmt(s.points[-1][1], panel.unit)}</b><span>{html.escape(s.legend)}</span></div>'
            for s in drawn
        )
        return f'<div class="stats">{cells}</div>'
    ts = [t for s in drawn for t, _ in s.points]
    vs = [v for s in drawn for _, v in s.points]
    t0, t1 = min(ts), max(ts)
    lo, hi = min(0.0, min(vs)), max(vs)
    hi = hi if hi > lo else lo + 1.0

    def xy(t: float, v: float) -> str:
        x = _PAD + (t - t0) / ((t1 - t0) or 1.0) * (_W - _PAD - 6)
        y = 6 + (1 - (v - lo) / (hi - lo)) * (_H - 24)
        return f"{x:.1f},{y:.1f}"

    lines = "".join(
        f'<polyline fill="none" stroke="{_COLOURS[i % len(_COLOURS)]}" stroke-width="1.6" '
        f'points="{" ".join(xy(t, v) for t, v in s.points)}"/>'
        for i, s in enumerate(drawn)
    )
    grid = "".join(
        f'<line x1="{_PAD}" x2="{_W - 6}" y1="{y}" y2="{y}" class="grid"/>'
        f'<text x="2" y="{y + 4}" class="axis">{_fmt(val, panel.unit)}</text>'
        for y, val in ((6, hi), (6 + (_H - 24) / 2, (hi + lo) / 2), (_H - 18, lo))
    )
    keys = "".join(
        f'<span><i style="background:{_COLOURS[i % len(_COLOURS)]}"></i>{html.escape(s.legend)}</span>'
        for i, s in enumerate(drawn)
    )
    return f'<svg viewBox="0 0 {_W} {_H}" preserveAspectRatio="none">{grid}{lines}</svg><div class="keys">{keys}</div>'


def page(panels: Iterable[Panel], *, title: str = "cohortgate", note: str = "") -> str:
    """The panels on Grafana's grid (24 columns, rows of 8 units), as one self-contained HTML page."""
    cells = []
    for p in panels:
        x, y, w, h = p.grid
        cells.append(
            f'<section style="grid-column:{x + 1} / span {w};grid-row:{y + 1} / span {h}">'
            f"<h3>{html.escape(p.title)}</h3>{_chart(p)}</section>"
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{background:#111217;color:#ccccdc;font:13px Inter,Helvetica,Arial,sans-serif;margin:16px}}
h1{{font-size:18px;margin:0 0 4px}} p.note{{color:#8e8e9e;margin:0 0 12px}}
main{{display:grid;grid-template-columns:repeat(24,1fr);grid-auto-rows:28px;gap:8px}}
section{{background:#181b1f;border:1px solid #2c3235;border-radius:4px;padding:6px 8px;overflow:hidden}}
h3{{font-size:13px;font-weight:500;margin:0 0 4px}} svg{{width:100%;height:150px}}
.grid{{stroke:#2c3235}} .axis{{fill:#8e8e9e;font-size:9px}} .empty{{color:#8e8e9e;padding:60px 0;text-align:center}}
.keys span{{margin-right:10px;font-size:11px}}
.keys i{{display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle}}
.stats{{display:flex;flex-wrap:wrap;gap:10px}} .stat{{display:flex;flex-direction:column}}
.stat b{{font-size:26px;color:#73bf69}}
</style></head><body><h1>{html.escape(title)}</h1><p class="note">{html.escape(note)}</p>
<main>{"".join(cells)}</main></body></html>"""
