"""An experiment's result as a document: built from data, rendered as JSON, CSV, Markdown or HTML.

`document` joins what the controller knows about one route -- the design (variants, weights,
metrics, alpha, rollout plan, the catalog entry), its state, the traffic per arm, the SRM check,
each metric's lift with its always-valid and fixed-horizon intervals, and the lift over time -- into
one JSON-able dict. The same dict comes from a running controller (``cohortgate report ROUTE``),
from a journal offline (``--journal --policy``) and from the archive of a finished experiment
(``--archived``), so the three read alike. The renderers are pure text functions: plots are SVG
drawn here (no plotting library), inline in HTML, files beside the Markdown.

No I/O here: the CLI (`cohortgate.cli.report`) reads and writes.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cohortgate.core.policy import Route
from cohortgate.core.stats import srm_check

REPORT_VERSION = 1
FORMATS = ("md", "html", "csv", "json")
TERMINAL = frozenset({"promoted", "rolled_back"})
SRM_ALPHA = 1e-3  # the controller's default (ControllerConfig.srm_alpha)
CSV_COLUMNS = (
    "route",
    "metric",
    "role",
    "challenger",
    "control",
    "units_challenger",
    "units_control",
    "value_control",
    "value_challenger",
    "lift_absolute",
    "lift_relative",
    "always_valid_lo",
    "always_valid_hi",
    "fixed_horizon_lo",
    "fixed_horizon_hi",
    "p_always_valid",
    "alpha",
    "cuped",
    "verdict",
    "reason",
)


# ---------------------------------------------------------------------- the document


def design_of(route: Route, alpha: float = 0.05) -> dict[str, Any]:
    """The experiment's design as the policy states it."""
    exp = route.experiment
    return {
        "control": route.control.name,
        "variants": [{"name": v.name, "weight": v.weight} for v in route.variants],
        "metrics": [
            {
                "name": m.name,
                "kind": m.kind,
                "direction": m.direction,
                "role": m.role,
                "margin": m.margin,
                "margin_abs": m.margin_abs,
                "planned_units": m.planned_units,
                "attribution_window_s": m.attribution_window_s,
                "covariate": m.covariate,
            }
            for m in route.metrics
        ],
        "alpha": alpha,
        "rollout": None
        if route.rollout is None
        else {
            "variant": route.rollout.variant,
            "steps": list(route.rollout.steps),
            "interval_s": route.rollout.interval_s,
        },
        "experiment": None
        if exp is None
        else {
            "hypothesis": exp.hypothesis,
            "owner": exp.owner,
            "primary_metric": exp.primary_metric,
            "start": exp.start,
        },
    }


def srm_from_units(units: Mapping[str, int], weights: Mapping[str, int], alpha: float = SRM_ALPHA) -> dict[str, Any]:
    """The SRM check on the ledger's units per arm (offline, where no controller ran one)."""
    live = [v for v, w in weights.items() if w > 0]
    counts = [int(units.get(v, 0)) for v in live]
    if len(live) < 2 or sum(counts) == 0:
        return {"checked": False, "reason": "fewer than two arms with units"}
    r = srm_check(counts, [weights[v] for v in live], alpha)
    return {
        "checked": True,
        "variants": live,
        "counts": dict(zip(live, counts, strict=True)),
        "weights": {v: weights[v] for v in live},
        "chi2": r.chi2,
        "p_chi2": r.p_chi2,
        "p_always_valid": r.p_always_valid,
        "alpha": alpha,
        "mismatch": r.mismatch,
        "source": "outcome ledger units",
    }


def _units(results: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        u = r.get("units") or {}
        out[r["control"]] = max(out.get(r["control"], 0), int(u.get("control") or 0))
        out[r["challenger"]] = max(out.get(r["challenger"], 0), int(u.get("challenger") or 0))
    return out


def _primary(design: Mapping[str, Any]) -> str | None:
    exp = design.get("experiment") or {}
    if exp.get("primary_metric"):
        return str(exp["primary_metric"])
    return next((m["name"] for m in design.get("metrics", ()) if m.get("role") == "primary"), None)


def decisions(
    design: Mapping[str, Any], results: Sequence[Mapping[str, Any]], phases: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per challenger: its rollout phase, the primary metric's verdict, the guardrails', in one sentence."""
    primary = _primary(design)
    out = []
    challengers = [v["name"] for v in design.get("variants", ())[1:]]
    for c in challengers:
        mine = [r for r in results if r["challenger"] == c]
        prim = next((r for r in mine if r["metric"] == primary), None)
        guards = [r for r in mine if r["role"] == "guardrail"]
        phase = (phases.get(c) or {}).get("phase")
        parts = [f"{c}: {phase or 'no state'}"]
        if prim is not None:
            parts.append(f"primary {prim['metric']} {prim['verdict']} ({_lift_text(prim)})")
        elif primary:
            parts.append(f"primary {primary}: no outcomes yet")
        if guards:
            parts.append("guardrails " + ", ".join(f"{g['metric']} {g['verdict']}" for g in guards))
        out.append(
            {
                "challenger": c,
                "phase": phase,
                "reason": (phases.get(c) or {}).get("reason") or "",
                "primary": None if prim is None else {"metric": prim["metric"], "verdict": prim["verdict"]},
                "guardrails": {g["metric"]: g["verdict"] for g in guards},
                "text": "; ".join(parts),
            }
        )
    return out


def document(
    route: str,
    *,
    design: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]] = (),
    status: Mapping[str, Any] | None = None,
    counts: Mapping[str, int] | None = None,
    labels: Sequence[Mapping[str, Any]] = (),
    srm: Mapping[str, Any] | None = None,
    generated_at: float,
    source: str,
) -> dict[str, Any]:
    """One route's report (see the module docstring). ``status``: the route's part of ``/status``;
    ``srm``: the controller's check, else one is run on the ledger's units against the weights."""
    status = status or {}
    variants = status.get("variants") or {}
    phases = {
        name: {k: v.get(k) for k in ("phase", "weight", "step", "since", "reason")} for name, v in variants.items()
    }
    units = _units(results)
    if srm is None or not srm.get("checked"):
        weights = {
            v["name"]: int((variants.get(v["name"]) or {}).get("weight", v["weight"])) for v in design["variants"]
        }
        offline = srm_from_units(units, weights) if units else None
        srm = offline if offline and offline["checked"] else (srm or offline or {"checked": False, "reason": "no data"})
    looks = [p[0] for s in history for p in s.get("points", ())]
    challengers = [v["name"] for v in design["variants"][1:]]
    finished = bool(challengers) and all((phases.get(c) or {}).get("phase") in TERMINAL for c in challengers)
    return {
        "report_version": REPORT_VERSION,
        "route": route,
        "generated_at": generated_at,
        "source": source,
        "experiment": design.get("experiment"),
        "design": dict(design),
        "state": {
            "status": status.get("status"),
            "version": status.get("version"),
            "updated_at": status.get("updated_at"),
            "variants": phases,
            "finished": finished,
        },
        "dates": {
            "start": (design.get("experiment") or {}).get("start"),
            "first_look": min(looks) if looks else None,
            "last_look": max(looks) if looks else None,
            "generated": _iso(generated_at),
        },
        "traffic": {
            "units": units,
            "requests_in_window": {n: (v.get("window") or {}).get("requests") for n, v in variants.items()},
        },
        "srm": dict(srm),
        "results": [dict(r) for r in results],
        "history": [dict(s) for s in history],
        "counts": dict(counts or {}),
        "labels": [dict(x) for x in labels],  # model accuracy from late labels, per variant (labels.py)
        "decisions": decisions(design, results, phases),
    }


# ---------------------------------------------------------------------- text helpers


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))


def _pct(v: Any, signed: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "∞" if v is not None else "-"
    return f"{float(v):+.2%}" if signed else f"{float(v):.2%}"


def _interval(pair: Sequence[Any] | None) -> str:
    lo, hi = (pair or (None, None))[:2]
    lo_t = "-∞" if lo is None else _pct(lo)
    hi_t = "+∞" if hi is None else _pct(hi)
    return f"[{lo_t}, {hi_t}]"


def _lift_text(r: Mapping[str, Any]) -> str:
    return f"{_pct((r.get('lift') or {}).get('relative'))} {_interval(r.get('interval_always_valid'))}"


def _value(v: Any) -> str:
    return "-" if v is None else f"{float(v):.4g}"


def srm_text(srm: Mapping[str, Any]) -> str:
    if not srm.get("checked"):
        return f"not checked: {srm.get('reason') or 'no data'}"
    counts = ", ".join(f"{k} {v}" for k, v in (srm.get("counts") or {}).items())
    weights = ", ".join(f"{k} {v}%" for k, v in (srm.get("weights") or {}).items())
    stats = (
        f"chi2 {srm.get('chi2', 0):.2f}, p {srm.get('p_chi2', 1):.3g}, "
        f"always-valid p {srm.get('p_always_valid', 1):.3g}"
    )
    verdict = "MISMATCH: the assignment is broken, do not trust the lifts" if srm.get("mismatch") else "fits"
    return f"{verdict}: units {counts} vs weights {weights} ({stats})"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """A text sparkline (for terminals): one block per value, blank where a value is missing."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    return "".join(
        " " if v is None or not math.isfinite(v) else SPARK[min(7, int((v - lo) / span * 7.999))] for v in values
    )


# ---------------------------------------------------------------------- SVG


def _metric_decl(doc: Mapping[str, Any], metric: str) -> Mapping[str, Any]:
    return next((m for m in doc["design"].get("metrics", ()) if m["name"] == metric), {})


def signed_margin(decl: Mapping[str, Any]) -> float | None:
    """A relative guardrail margin as a line on the lift axis: below 0 when higher is better, above
    when lower is; None for other roles and absolute margins (not on the relative scale)."""
    if decl.get("role") != "guardrail" or decl.get("margin") is None or decl.get("margin_abs"):
        return None
    m = float(decl["margin"])
    return -m if decl.get("direction", "increase") == "increase" else m


def svg_lift(
    series: Mapping[str, Any], decl: Mapping[str, Any] | None = None, width: int = 640, height: int = 220
) -> str:
    """Relative lift over time with its always-valid band (shaded), zero and, for a guardrail, the
    margin (dashed). Infinite bounds are drawn at the plot's edge."""
    decl = decl or {}
    pts = [p for p in series.get("points", ()) if p[1] is not None]
    title = f"{series['metric']}: {series['challenger']} vs control, relative lift (always-valid band)"
    pad_l, pad_r, pad_t, pad_b = 56, 12, 26, 30
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">'
        f"<title>{html.escape(title)}</title>"
        f'<rect width="{width}" height="{height}" fill="#fff"/>'
        f'<text x="{pad_l}" y="16" font-size="12">{html.escape(title)}</text>'
    )
    if not pts:
        return head + f'<text x="{pad_l}" y="{pad_t + h / 2}">no looks yet</text></svg>'
    margin = signed_margin(decl)
    finite = [v for p in pts for v in (p[1], p[2], p[3]) if v is not None]
    lo, hi = min([*finite, 0.0] + ([margin] if margin is not None else [])), max([*finite, 0.0])
    # the band's first looks can be huge: centre the scale on the estimate's range when so
    est = [p[1] for p in pts]
    spread = max(max(est) - min(est), abs(max(est, key=abs)), 0.01)
    lo, hi = max(lo, min(est) - 4 * spread, -10.0), min(hi, max(est) + 4 * spread, 10.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    t0, t1 = pts[0][0], pts[-1][0]
    tspan = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return float(pad_l + (t - t0) / tspan * w)

    def y(v: float | None, edge: float) -> float:
        v = edge if v is None else min(max(v, lo), hi)
        return float(pad_t + (hi - v) / (hi - lo) * h)

    upper = " ".join(f"{x(p[0]):.1f},{y(p[3], hi):.1f}" for p in pts)
    lower = " ".join(f"{x(p[0]):.1f},{y(p[2], lo):.1f}" for p in reversed(pts))
    line = " ".join(f"{x(p[0]):.1f},{y(p[1], 0):.1f}" for p in pts)
    parts = [
        head,
        f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
        f'<polygon points="{upper} {lower}" fill="#4a7bd0" fill-opacity="0.25" stroke="none"/>',
        f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(0.0, 0):.1f}" y2="{y(0.0, 0):.1f}" stroke="#333"/>',
    ]
    if margin is not None and lo <= margin <= hi:
        ym = y(margin, margin)
        parts.append(
            f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{ym:.1f}" y2="{ym:.1f}" stroke="#c33" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{pad_l + w - 4}" y="{ym - 3:.1f}" text-anchor="end" fill="#c33">margin {_pct(margin)}</text>'
        )
    parts.append(f'<polyline points="{line}" fill="none" stroke="#1d3f8a" stroke-width="1.5"/>')
    for v in (lo, 0.0, hi):
        parts.append(f'<text x="{pad_l - 4}" y="{y(v, v) + 4:.1f}" text-anchor="end">{_pct(v)}</text>')
    n_last = pts[-1][6] + pts[-1][7]
    parts.append(f'<text x="{pad_l}" y="{height - 8}">{html.escape(_iso(t0))}</text>')
    parts.append(
        f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end">{html.escape(_iso(t1))} · {n_last} units</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def svg_intervals(results: Sequence[Mapping[str, Any]], width: int = 640) -> str:
    """Each metric and challenger's lift: always-valid interval (thick) and fixed-horizon (thin)."""
    rows = [r for r in results if (r.get("lift") or {}).get("relative") is not None]
    row_h, pad_l, pad_r, pad_t = 26, 190, 16, 26
    height = pad_t + row_h * max(1, len(rows)) + 24
    title = "relative lift: always-valid interval (thick), fixed-horizon (thin)"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{title}" font-family="sans-serif" font-size="11"><title>{title}</title>'
        f'<rect width="{width}" height="{height}" fill="#fff"/><text x="8" y="16" font-size="12">{title}</text>'
    ]
    if not rows:
        out.append(f'<text x="8" y="{pad_t + 16}">no results yet</text></svg>')
        return "".join(out)
    vals = [0.0]
    for r in rows:
        vals.append(r["lift"]["relative"])
        vals += [
            v
            for v in (*(r.get("interval_always_valid") or ()), *(r.get("interval_fixed_horizon") or ()))
            if v is not None
        ]
    est = [r["lift"]["relative"] for r in rows]
    spread = max(max(abs(v) for v in est), 0.01)
    lo, hi = max(min(vals), -6 * spread), min(max(vals), 6 * spread)
    w = width - pad_l - pad_r

    def x(v: float | None, edge: float) -> float:
        v = edge if v is None else min(max(v, lo), hi)
        return float(pad_l + (v - lo) / (hi - lo) * w)

    colour = {"win": "#1a7f37", "non_inferior": "#1a7f37", "loss": "#c33", "inferior": "#c33"}
    out.append(
        f'<line x1="{x(0.0, 0):.1f}" x2="{x(0.0, 0):.1f}" y1="{pad_t}" y2="{pad_t + row_h * len(rows)}" stroke="#333"/>'
    )
    for i, r in enumerate(rows):
        yc = pad_t + row_h * i + row_h / 2
        c = colour.get(r.get("verdict", ""), "#555")
        av = r.get("interval_always_valid") or (None, None)
        fh = r.get("interval_fixed_horizon") or (None, None)
        label = html.escape(f"{r['metric']} · {r['challenger']} ({r.get('verdict')})")
        out.append(f'<text x="{pad_l - 6}" y="{yc + 4:.1f}" text-anchor="end">{label}</text>')
        out.append(f'<line x1="{x(fh[0], lo):.1f}" x2="{x(fh[1], hi):.1f}" y1="{yc:.1f}" y2="{yc:.1f}" stroke="{c}"/>')
        out.append(
            f'<line x1="{x(av[0], lo):.1f}" x2="{x(av[1], hi):.1f}" y1="{yc:.1f}" y2="{yc:.1f}" '
            f'stroke="{c}" stroke-width="5" stroke-opacity="0.5"/>'
        )
        out.append(f'<circle cx="{x(r["lift"]["relative"], 0):.1f}" cy="{yc:.1f}" r="3.5" fill="{c}"/>')
    yb = pad_t + row_h * len(rows) + 16
    for v in (lo, 0.0, hi):
        out.append(f'<text x="{x(v, v):.1f}" y="{yb}" text-anchor="middle">{_pct(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def plot_files(doc: Mapping[str, Any], stem: str) -> dict[str, str]:
    """The SVG plots of a report, by file name (``STEM-lift-METRIC-CHALLENGER.svg``, ``STEM-intervals.svg``)."""
    files = {f"{stem}-intervals.svg": svg_intervals(doc["results"])}
    for s in doc["history"]:
        files[f"{stem}-lift-{s['metric']}-{s['challenger']}.svg"] = svg_lift(s, _metric_decl(doc, s["metric"]))
    return files


# ---------------------------------------------------------------------- renderers


def render_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def render_csv(doc: Mapping[str, Any]) -> str:
    """One row per metric and challenger (the intervals as fractions of control)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in doc["results"]:
        av = r.get("interval_always_valid") or (None, None)
        fh = r.get("interval_fixed_horizon") or (None, None)
        writer.writerow(
            [
                r["route"],
                r["metric"],
                r["role"],
                r["challenger"],
                r["control"],
                r["units"]["challenger"],
                r["units"]["control"],
                r["value"]["control"],
                r["value"]["challenger"],
                r["lift"]["absolute"],
                r["lift"]["relative"],
                av[0],
                av[1],
                fh[0],
                fh[1],
                r.get("p_always_valid"),
                r.get("alpha"),
                r.get("cuped"),
                r.get("verdict"),
                r.get("reason", ""),
            ]
        )
    return buf.getvalue()


def _design_rows(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    d = doc["design"]
    rows = [
        ("variants", ", ".join(f"{v['name']} {v['weight']}%" for v in d["variants"]) + f" (control: {d['control']})"),
        ("alpha", f"{d['alpha']:g} over all challengers (Bonferroni per challenger)"),
    ]
    ro = d.get("rollout")
    if ro:
        rows.append(("rollout plan", f"{ro['variant']}: steps {ro['steps']} %, at least {ro['interval_s']:g} s each"))
    for m in d["metrics"]:
        bits = [m["kind"], m["role"], m["direction"], f"planned {m['planned_units']} units"]
        if m.get("margin") is not None:
            bits.append(f"margin {m['margin']:g}" if m.get("margin_abs") else f"margin {m['margin']:.2%}")
        if m.get("covariate"):
            bits.append(f"CUPED on {m['covariate']}")
        rows.append((f"metric {m['name']}", ", ".join(bits)))
    return rows


def _result_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for r in doc["results"]:
        rows.append(
            [
                r["metric"],
                r["role"],
                r["challenger"],
                f"{r['units']['challenger']} / {r['units']['control']}",
                f"{_value(r['value']['challenger'])} / {_value(r['value']['control'])}",
                _pct(r["lift"]["relative"]),
                _interval(r.get("interval_always_valid")),
                _interval(r.get("interval_fixed_horizon")),
                r.get("verdict", ""),
            ]
        )
    return rows


LABEL_HEAD = ["variant", "labels", "accuracy", "log-loss", "MAE", "RMSE", "vs control"]


def _stat_text(stat: Mapping[str, Any] | None, fmt: str = ".4f") -> str:
    if not stat:
        return "-"
    lo, hi = stat.get("interval") or (None, None)
    bounds = "" if lo is None or hi is None else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{stat['value']:{fmt}}{bounds}"


def _label_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for x in doc.get("labels") or ():
        vs = x.get("vs_control") or {}
        diff = "; ".join(f"{k} {_stat_text(v, '+.4f')}" for k, v in vs.items()) or "-"
        rmse = "-" if x.get("rmse") is None else f"{x['rmse']:.4f}"
        rows.append(
            [
                x["variant"],
                str(x["labels"]),
                _stat_text(x.get("accuracy")),
                _stat_text(x.get("log_loss")),
                _stat_text(x.get("mae")),
                rmse,
                diff,
            ]
        )
    return rows


RESULT_HEAD = [
    "metric",
    "role",
    "challenger",
    "units (chal. / ctrl)",
    "value (chal. / ctrl)",
    "lift",
    "always-valid interval",
    "fixed-horizon interval",
    "verdict",
]


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return out


def _title(doc: Mapping[str, Any]) -> str:
    return f"Experiment report: route {doc['route']}"


def render_markdown(doc: Mapping[str, Any], stem: str | None = None) -> str:
    """Markdown; with ``stem`` the plots are linked as the files `plot_files(doc, stem)` names, else a
    text sparkline of the lift stands in for each."""
    exp = doc.get("experiment") or {}
    lines = [f"# {_title(doc)}", ""]
    if exp:
        lines += [f"**Hypothesis:** {_md_escape(exp['hypothesis'])}  ", f"**Owner:** {_md_escape(exp['owner'])}  "]
    lines += [
        f"**Started:** {doc['dates']['start'] or '-'} · first look {_iso(doc['dates']['first_look'])} · "
        f"last look {_iso(doc['dates']['last_look'])}  ",
        f"**Generated:** {doc['dates']['generated']} from {_md_escape(doc['source'])}  ",
        f"**State:** {doc['state'].get('status') or '-'}{' (finished)' if doc['state'].get('finished') else ''}",
        "",
        "## Decision",
        "",
    ]
    lines += [
        f"- {_md_escape(d['text'])}" + (f" -- {_md_escape(d['reason'])}" if d["reason"] else "")
        for d in doc["decisions"]
    ]
    if not doc["decisions"]:
        lines.append("- no challenger")
    lines += ["", "## Design", "", *_md_table(["", ""], _design_rows(doc))]
    units = doc["traffic"]["units"]
    lines += ["", "## Traffic and sample ratio", ""]
    lines += (
        _md_table(["variant", "units (outcome ledger)"], [[v, n] for v, n in units.items()])
        if units
        else ["no units yet"]
    )
    lines += ["", f"SRM check: {_md_escape(srm_text(doc['srm']))}", "", "## Metrics", ""]
    lines += _md_table(RESULT_HEAD, _result_rows(doc)) if doc["results"] else ["no outcomes yet"]
    if doc.get("labels"):
        lines += ["", "## Model accuracy from labels", "", *_md_table(LABEL_HEAD, _label_rows(doc))]
        lines += ["", "Served predictions joined with labels that arrived later; 95 % intervals, fixed horizon."]
    lines += [
        "",
        "Intervals are relative to control. The always-valid interval (Howard et al. 2021) holds however often "
        "the experiment was looked at and is what decides; the fixed-horizon one is for reference only.",
        "",
        "## Lift over time",
        "",
    ]
    if stem is not None:
        lines.append(f"![intervals]({stem}-intervals.svg)")
        lines.append("")
    for s in doc["history"]:
        name = f"{s['metric']} · {s['challenger']}"
        if stem is not None:
            lines.append(f"![{name}]({stem}-lift-{s['metric']}-{s['challenger']}.svg)")
        else:
            lines.append(f"- {name}: `{sparkline([p[1] for p in s['points']])}`")
    if not doc["history"]:
        lines.append("no looks recorded")
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}"
    "th{background:#f4f4f4}.win,.non_inferior{color:#1a7f37}.loss,.inferior{color:#c33}"
    ".mismatch{color:#c33;font-weight:bold}figure{margin:1em 0}"
)


def _h_table(head: Sequence[str], rows: Sequence[Sequence[Any]], verdict_col: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = f' class="{html.escape(str(c))}"' if i == verdict_col else ""
            cells.append(f"<td{cls}>{html.escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def render_html(doc: Mapping[str, Any]) -> str:
    """One self-contained page: no scripts, no external requests, the plots inline as SVG."""
    e = html.escape
    exp = doc.get("experiment") or {}
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(_title(doc))}</title>'
        f"<style>{_CSS}</style></head><body><h1>{e(_title(doc))}</h1>"
    ]
    if exp:
        parts.append(f"<p><b>Hypothesis:</b> {e(exp['hypothesis'])}<br><b>Owner:</b> {e(exp['owner'])}</p>")
    d = doc["dates"]
    parts.append(
        f"<p><b>Started:</b> {e(str(d['start'] or '-'))} · first look {e(_iso(d['first_look']))} · "
        f"last look {e(_iso(d['last_look']))}<br><b>Generated:</b> {e(d['generated'])} from {e(doc['source'])}<br>"
        f"<b>State:</b> {e(str(doc['state'].get('status') or '-'))}"
        f"{' (finished)' if doc['state'].get('finished') else ''}</p>"
    )
    parts.append("<h2>Decision</h2><ul>")
    for dec in doc["decisions"] or [{"text": "no challenger", "reason": ""}]:
        parts.append(f"<li>{e(dec['text'])}{' — ' + e(dec['reason']) if dec['reason'] else ''}</li>")
    parts.append("</ul><h2>Design</h2>" + _h_table(["", ""], _design_rows(doc)))
    units = doc["traffic"]["units"]
    parts.append("<h2>Traffic and sample ratio</h2>")
    parts.append(
        _h_table(["variant", "units (outcome ledger)"], list(units.items())) if units else "<p>no units yet</p>"
    )
    cls = ' class="mismatch"' if doc["srm"].get("mismatch") else ""
    parts.append(f"<p{cls}>SRM check: {e(srm_text(doc['srm']))}</p><h2>Metrics</h2>")
    parts.append(
        _h_table(RESULT_HEAD, _result_rows(doc), verdict_col=8) if doc["results"] else "<p>no outcomes yet</p>"
    )
    if doc.get("labels"):
        parts.append("<h2>Model accuracy from labels</h2>" + _h_table(LABEL_HEAD, _label_rows(doc)))
    parts.append(
        "<p>Intervals are relative to control. The always-valid interval holds however often the experiment was "
        "looked at and is what decides; the fixed-horizon one is for reference only.</p>"
    )
    parts.append(f"<figure>{svg_intervals(doc['results'])}</figure><h2>Lift over time</h2>")
    for s in doc["history"]:
        parts.append(f"<figure>{svg_lift(s, _metric_decl(doc, s['metric']))}</figure>")
    if not doc["history"]:
        parts.append("<p>no looks recorded</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def render(doc: Mapping[str, Any], fmt: str, stem: str | None = None) -> str:
    """The document in ``fmt`` (one of `FORMATS`)."""
    if fmt == "json":
        return render_json(doc)
    if fmt == "csv":
        return render_csv(doc)
    if fmt == "md":
        return render_markdown(doc, stem)
    if fmt == "html":
        return render_html(doc)
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
