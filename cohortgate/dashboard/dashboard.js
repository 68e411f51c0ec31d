// cohortgate dashboard: renders the document the controller pushes (event "state" on /api/events).
// No framework, no network but this origin; charts are hand-written SVG.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#4c6ef5", "#f76707", "#2f9e44", "#ae3ec9", "#1098ad", "#e8590c"];
const ACTION_COLORS = { rollback: "#e03131", promote: "#2f9e44", halt: "#f59f00", resume: "#1c7ed6", hold: "#868e96", policy_reload: "#7048e8" };
const TOKEN_KEY = "cohortgate.admin-token";
const RANGE_KEY = "cohortgate.chart-range";
const AUTO_MIN_S = 120;
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let range = sessionStorage.getItem(RANGE_KEY) || "auto";
let lastDoc = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const pct = (x, d = 1) => (x === null || x === undefined ? "–" : (100 * x).toFixed(d) + " %");
const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(2) + " ms" : Math.round(x) + " ms");
const pval = (x) => (x === null || x === undefined ? "–" : x < 0.001 ? x.toExponential(1) : x.toPrecision(2));

// ---------------------------------------------------------------- charts

// The span a route's charts cover: the chosen range, or (auto) two minutes stretched back to keep the
// route's latest audit event (a rollback, a promotion) in view, up to the history the controller keeps.
function horizonFor(route, doc) {
  if (range !== "auto") return Math.min(+range, doc.horizon_s);
  const latest = route.markers.reduce((t, m) => Math.max(t, m.ts), 0);
  const back = latest ? doc.generated_at - latest + 20 : 0;
  return Math.min(doc.horizon_s, Math.max(AUTO_MIN_S, back));
}

function chart({ title, series, index, index2, fmt, markers, now, horizon, colorOf }) {
  const W = 360, H = 120, L = 4, R = 4, T = 16, B = 14;
  let first = now;
  for (const pts of Object.values(series)) if (pts.length && pts[0][0] < first) first = pts[0][0];
  for (const m of markers) if (m.ts >= now - horizon && m.ts < first) first = m.ts;  // markers stay in view
  horizon = Math.min(horizon, Math.max(30, now - first + 2));  // zoom in while there is little history
  const x0 = now - horizon;
  const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  let max = 0;
  for (const pts of Object.values(series)) for (const p of pts) {
    for (const i of [index, index2]) if (i !== undefined && p[i] !== null && p[i] > max) max = p[i];
  }
  const yMax = max > 0 ? max * 1.15 : 1;
  const X = (t) => L + ((t - x0) / horizon) * (W - L - R);
  const Y = (v) => H - B - (v / yMax) * (H - T - B);
  for (let g = 1; g <= 3; g++) box.append(svg("line", { x1: L, x2: W - R, y1: Y((yMax * g) / 4), y2: Y((yMax * g) / 4), class: "grid" }));
  box.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  for (const m of markers) {
    if (m.ts < x0 || m.ts > now) continue;
    const line = svg("line", { x1: X(m.ts), x2: X(m.ts), y1: T - 4, y2: H - B, class: "marker", stroke: ACTION_COLORS[m.action] || "#495057" });
    line.append(svg("title", {}, `${m.time} ${m.action} ${m.variant || ""} by ${m.actor}: ${m.reason}`));
    const right = X(m.ts) > W - 60;
    box.append(line, svg("text", { x: X(m.ts) + (right ? -2 : 2), y: T + 4, class: "marker-label" + (right ? " end" : ""), fill: ACTION_COLORS[m.action] || "#495057" }, m.action));
  }
  for (const [name, pts] of Object.entries(series)) {
    for (const [i, dashed] of [[index, false], [index2, true]]) {
      if (i === undefined) continue;
      let d = "", pen = false;
      for (const p of pts) {
        if (p[i] === null || p[i] === undefined) { pen = false; continue; }
        const t = p[0] + 0.5;
        d += `${pen ? "L" : "M"}${X(t).toFixed(1)},${Y(p[i]).toFixed(1)}`;
        pen = true;
      }
      if (d) box.append(svg("path", { d, class: dashed ? "line dashed" : "line", stroke: colorOf(name) }));
    }
  }
  box.append(svg("text", { x: L + 2, y: 11, class: "chart-title" }, title));
  box.append(svg("text", { x: W - R - 2, y: 11, class: "chart-max" }, max > 0 ? "max " + fmt(max) : "no data"));
  box.append(svg("text", { x: L + 2, y: H - 3, class: "chart-axis" }, horizon >= 90 ? `−${Math.round(horizon / 60)} min` : `−${Math.round(horizon)} s`));
  box.append(svg("text", { x: W - R - 2, y: H - 3, class: "chart-axis end" }, "now"));
  return box;
}

// ---------------------------------------------------------------- actions

function flash(text, level) {
  const f = document.getElementById("flash");
  f.hidden = false;
  f.className = "flash " + level;
  f.textContent = text;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.hidden = true; }, 8000);
}

async function act(verb, route, variant) {
  const headers = { "Content-Type": "application/json", "X-Cohortgate-Actor": "dashboard" };
  if (token) headers.Authorization = "Bearer " + token;
  const body = variant ? { route, variant } : { route };
  const what = `${verb} ${variant ? variant + " on " : ""}${route}`;
  try {
    const resp = await fetch("/api/actions/" + verb, { method: "POST", headers, body: JSON.stringify(body), credentials: "omit" });
    const data = await resp.json();
    if (resp.ok) {
      const n = (data.changes || []).length;
      flash(`${what}: ${n ? "done" : "nothing changed"}; weights now ${JSON.stringify(data.state && data.state.weights)}`, "ok");
    } else {
      const e = data.error || {};
      flash(`${what} refused: ${e.message || "error"} (${resp.status} ${e.code || ""})`, "error");
    }
  } catch (err) {
    flash(`${what} failed: ${err}`, "error");
  }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  act(b.dataset.action, b.dataset.route, b.dataset.variant || null);
});

function setupToken() {
  const form = document.getElementById("tokenform");
  const input = document.getElementById("token");
  const state = document.getElementById("tokenstate");
  const show = () => { state.textContent = token ? "token set (this tab only)" : "no token: actions will be refused"; };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = input.value.trim();
    input.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    show();
  });
  document.getElementById("forget").addEventListener("click", () => { token = ""; sessionStorage.removeItem(TOKEN_KEY); show(); });
  show();
}

// ---------------------------------------------------------------- panels

function variantRows(route, doc, colorOf) {
  return route.variants.map((v) => {
    const w = v.weight === null || v.weight === undefined ? "–" : v.weight + " %";
    const ev = v.evidence;
    const verdict = v.control ? el("span", { class: "muted" }, "control: the baseline every challenger is tested against")
      : el("div", {},
        el("span", { class: "badge sig-" + ((v.verdict && v.verdict.signal) || "none") }, (v.verdict && v.verdict.signal) || "no verdict yet"), " ",
        el("span", {}, (v.verdict && v.verdict.reason) || ""),
        v.phase === "rolled_back" || v.phase === "halted" ? el("div", { class: "why" }, "why: ", v.reason) : null,
        el("div", { class: "evidence" },
          `samples ${ev.samples} (step ${ev.step_samples ?? "–"}, min ${ev.min_samples ?? "–"}) · always-valid p: errors ${pval(ev.p_error)}, latency ${pval(ev.p_latency)} · α ${ev.alpha ?? "–"}`),
        ev.tripped.length ? el("div", { class: "tripped" }, "tripped: " + ev.tripped.join("; ")) : null);
    const actions = [];
    if (doc.allow_actions && !v.control) {
      actions.push(el("button", { class: "danger", "data-action": "rollback", "data-route": route.name, "data-variant": v.name, disabled: v.phase === "rolled_back" }, "Rollback"));
      actions.push(el("button", { "data-action": "promote", "data-route": route.name, "data-variant": v.name, disabled: v.phase === "rolled_back" || v.phase === "promoted" }, "Promote"));
    }
    return el("tr", { "data-variant": v.name, class: v.enabled ? "" : "disabled" },
      el("td", {}, el("span", { class: "swatch", style: `background:${colorOf(v.name)}` }), " ", el("b", {}, v.name)),
      el("td", {}, el("span", { class: "badge ph-" + v.phase }, v.phase.replace("_", " "))),
      el("td", { class: "weight" },
        el("span", { class: "eff", "data-weight": v.weight }, w),
        el("span", { class: "muted" }, ` policy ${v.policy_weight ?? "–"} %`),
        el("div", { class: "bar" }, el("i", { style: `width:${v.weight || 0}%;background:${colorOf(v.name)}` }),
          el("b", { class: "tick", style: `left:${v.policy_weight || 0}%`, title: "policy weight" }))),
      el("td", { class: "num", "data-rps": v.rps }, v.rps),
      el("td", { class: "num", "data-requests": v.window.requests ?? 0 }, v.window.requests ?? 0),
      el("td", { class: "num" }, pct(v.window.error_rate, 2)),
      el("td", { class: "num" }, ms(v.window.p50_ms)),
      el("td", { class: "num" }, ms(v.window.p99_ms)),
      el("td", { class: "verdict" }, verdict),
      el("td", { class: "actions" }, actions));
  });
}

function table(head, rows, emptyText) {
  if (!rows.length) return el("p", { class: "empty" }, emptyText);
  return el("table", { class: "small" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
}

// Model quality (issue 20): drift per feature per variant, the segment table, four-fifths ratios.
function qualityPanel(q) {
  const t = q.thresholds;
  return el("div", { class: "quality" },
    el("h3", {}, `Drift (PSI > ${t.psi ?? "–"}, JS > ${t.js ?? "–"}, Wasserstein > ${t.wasserstein ?? "–"} sd; min ${t.min_samples})`),
    q.notice ? el("p", { class: "notice error" }, q.notice) : null,
    table(["variant", "compared", "feature", "PSI", "JS", "Wasserstein", "chi-square p", "over threshold"], q.drift, "no quality reports yet"),
    el("h3", {}, `Segments (margin ${t.margin} odds; always-valid p errors / slow)`),
    table(["segment", "variant", "requests", "error rate", "p95", "p"], q.segments, "no segments declared"),
    q.impact.length ? el("h3", {}, `Four-fifths rule (floor ${t.four_fifths})`) : null,
    q.impact.length ? table(["variant", "segment", "lowest", "highest", "ratio", "upper bound"], q.impact, "") : null);
}

// A bandit route: weights per arm over the last updates, posterior means, IPW estimates (issue 21);
// on a segmented route one small table per segment: its weights over the same updates, now, its posterior.
function allocationPanel(a) {
  const when = (t) => new Date(t * 1000).toISOString().slice(11, 19);
  const iv = (m, ci) => (m == null ? "–" : `${pct(m)} [${ci[0] == null ? "–" : pct(ci[0])}, ${ci[1] == null ? "–" : pct(ci[1])}]`);
  return el("div", { class: "allocation" },
    el("h3", {}, "Allocation over time (bandit: " + a.title + ")"),
    a.held ? el("p", { class: "muted" }, a.held) : null,
    table(["arm", ...a.times.map(when)], a.over_time.map(([arm, ...w]) => [arm, ...w.map((x) => x + "%")]), "no update yet"),
    table(["arm", "units", "posterior mean [95 %]", "IPW mean [95 %]"],
      a.arms_now.map(([arm, n, m, ci, ipw, ici]) => [arm, n, iv(m, ci), iv(ipw, ici)]), "no rewards yet"),
    a.segments.length ? el("h3", {}, "Per segment (contextual bandit): weights over time, now, posterior") : null,
    ...a.segments.map((s) => el("div", { class: "allocation-segment", "data-segment": s.name },
      table([`segment ${s.name}`, ...a.times.map(when), "now", "units", "posterior mean [95 %]"],
        s.over_time.map(([arm, ...w], i) => {
          const [, now, n, m, ci] = s.arms_now[i];
          return [arm, ...w.map((x) => (x == null ? "–" : x + "%")), now == null ? "–" : now + "%", n, iv(m, ci)];
        }), "no update yet"))),
    el("p", { class: "muted" }, a.weighting));
}

function routeCard(route, doc) {
  const names = route.variants.map((v) => v.name);
  const colorOf = (n) => COLORS[Math.max(0, names.indexOf(n)) % COLORS.length];
  const card = el("section", { class: "card route", id: "route-" + route.name, "data-route": route.name });
  const ro = route.rollout ? ` · rollout of ${route.rollout.variant}: ${route.rollout.steps.join(" → ")} %, every ${route.rollout.interval_s} s` : "";
  card.append(el("div", { class: "route-head" },
    el("h2", {}, route.name),
    el("span", { class: "badge st-" + route.status }, route.status),
    el("span", { class: "muted" }, `version ${route.version} · last change by ${route.updated_by || "policy"}${ro}`),
    doc.allow_actions ? el("button", { "data-action": "resume", "data-route": route.name }, "Resume") : null));
  if (route.empty) card.append(el("p", { class: "empty big" }, route.empty));
  card.append(el("table", { class: "variants" },
    el("thead", {}, el("tr", {}, ["variant", "phase", "weight (effective vs policy)", "req/s", "requests (60 s)", "errors", "p50", "p99", "verdict and evidence", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, variantRows(route, doc, colorOf))));
  const now = doc.generated_at;
  const common = { series: route.series, markers: route.markers, now, horizon: horizonFor(route, doc), colorOf };
  card.append(el("div", { class: "charts" },
    chart({ ...common, title: "requests/s", index: 1, fmt: (x) => x.toFixed(0) }),
    chart({ ...common, title: "error rate", index: 2, fmt: (x) => pct(x) }),
    chart({ ...common, title: "latency p50 — / p99 - -", index: 3, index2: 4, fmt: ms })));
  const srm = route.srm;
  card.append(el("div", { class: "grid3" },
    el("div", {}, el("h3", {}, "Sample ratio"), el("span", { class: "badge srm-" + srm.state }, srm.state), " ", el("span", {}, srm.text)),
    el("div", {}, el("h3", {}, "Shadows"), table(["shadow", "pairs", "agreement", "latency Δ mean / p95"],
      route.shadows.map((s) => [s.name, s.pairs, pct(s.agreement), s.latency_delta_ms ? `${ms(s.latency_delta_ms.mean)} / ${ms(s.latency_delta_ms.p95)}` : "–"]),
      "no shadows on this route")),
    el("div", {}, el("h3", {}, "By region"), table(["region", "requests", "errors"], route.regions, "no requests yet"))));
  if (route.features) card.append(el("div", { class: "features" }, el("h3", {}, "Feature fallbacks (online features not joined)"),
    table(["variant", "reports", "fallback rate", "reasons"],
      route.features.map((f) => [f.name, f.reports, pct(f.rate), f.reasons || "–"]), "no sidecar reports yet")));
  if (route.quality) card.append(qualityPanel(route.quality));
  if (route.outcomes) card.append(liftPanel(route.outcomes));
  if (route.allocation) card.append(allocationPanel(route.allocation));
  return card;
}

// ---------------------------------------------------------------- outcome metrics (lift panels)

const signed = (x) => (x === null || x === undefined ? "–" : (x >= 0 ? "+" : "−") + Math.abs(100 * x).toFixed(2) + " %");
const band = (iv) => (iv ? `[${iv[0] === null ? "−∞" : signed(iv[0])}, ${iv[1] === null ? "+∞" : signed(iv[1])}]` : "–");

// Relative lift over time: the always-valid band (shaded; an infinite bound at the edge), the estimate,
// zero, and a guardrail's margin (dashed red).
function liftChart(m) {
  const W = 560, H = 150, L = 52, R = 4, T = 16, B = 14;
  const pts = m.points.filter((p) => p[1] !== null);
  const title = `${m.metric}: ${m.challenger} vs ${m.control}`;
  const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart lift-chart", role: "img", "aria-label": title + ", relative lift with its always-valid band" });
  box.append(svg("text", { x: 2, y: 11, class: "chart-title" }, title));
  if (!pts.length) { box.append(svg("text", { x: L, y: H / 2, class: "chart-axis" }, "no looks yet")); return box; }
  const est = pts.map((p) => p[1]);
  const spread = Math.max(Math.max(...est) - Math.min(...est), Math.max(...est.map(Math.abs)), 0.01);
  let lo = Math.min(0, ...est), hi = Math.max(0, ...est);
  for (const p of pts) { if (p[2] !== null) lo = Math.min(lo, p[2]); if (p[3] !== null) hi = Math.max(hi, p[3]); }
  if (m.margin !== null) { lo = Math.min(lo, m.margin); hi = Math.max(hi, m.margin); }
  lo = Math.max(lo, Math.min(...est) - 4 * spread); hi = Math.min(hi, Math.max(...est) + 4 * spread);
  if (hi - lo < 1e-9) { lo -= 0.01; hi += 0.01; }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0], span = t1 - t0 || 1;
  const X = (t) => L + ((t - t0) / span) * (W - L - R);
  const Y = (v, edge) => { const c = Math.min(Math.max(v === null ? edge : v, lo), hi); return T + ((hi - c) / (hi - lo)) * (H - T - B); };
  const upper = pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[3], hi).toFixed(1)}`);
  const lower = pts.slice().reverse().map((p) => `${X(p[0]).toFixed(1)},${Y(p[2], lo).toFixed(1)}`);
  box.append(svg("polygon", { points: upper.concat(lower).join(" "), class: "lift-band" }));
  box.append(svg("line", { x1: L, x2: W - R, y1: Y(0, 0), y2: Y(0, 0), class: "axis" }));
  if (m.margin !== null && m.margin >= lo && m.margin <= hi) {
    box.append(svg("line", { x1: L, x2: W - R, y1: Y(m.margin, 0), y2: Y(m.margin, 0), class: "lift-margin" }));
  }
  box.append(svg("path", { d: pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1], 0).toFixed(1)}`).join(""), class: "line lift-line" }));
  for (const v of [lo, hi]) box.append(svg("text", { x: L - 3, y: Y(v, v) + 3, class: "chart-axis end" }, signed(v)));
  const mins = (t1 - t0) / 60;
  box.append(svg("text", { x: L, y: H - 3, class: "chart-axis" }, mins >= 1.5 ? `${Math.round(mins)} min of looks` : `${Math.round(t1 - t0)} s of looks`));
  box.append(svg("text", { x: W - R - 2, y: H - 3, class: "chart-axis end" }, "now"));
  return box;
}

// Served predictions joined with late labels: accuracy, log-loss, MAE per variant (fixed horizon, 95 %).
function labelTable(rows) {
  const stat = (x, f) => (x ? `${f(x.value)} [${x.interval[0] === null ? "–" : f(x.interval[0])}, ${x.interval[1] === null ? "–" : f(x.interval[1])}]` : "–");
  const num = (x) => x.toFixed(3);
  return el("div", { class: "labels", "data-labels": rows.length },
    el("h3", {}, "Model accuracy from labels (95 % intervals, fixed horizon)"),
    table(["variant", "labels", "accuracy", "log-loss", "MAE", "vs control"], rows.map((r) => [
      r.variant, r.labels, stat(r.accuracy, (x) => pct(x, 1)), stat(r.log_loss, num), stat(r.mae, num),
      Object.entries(r.vs_control).map(([k, d]) => `${k} ${stat(d, k === "accuracy" ? (x) => signed(x) : num)}`).join("; ") || "–"]),
    "no labels yet"));
}

function liftPanel(o) {
  const exp = o.experiment;
  const panel = el("div", { class: "outcomes", "data-outcomes": o.metrics.length },
    el("h3", {}, "Outcome metrics: lift against control, always-valid band"),
    exp ? el("p", { class: "catalog" }, el("b", {}, exp.hypothesis), el("span", { class: "muted" }, ` · owner ${exp.owner} · started ${exp.start}${exp.primary_metric ? " · decides on " + exp.primary_metric : ""}`)) : null);
  if (o.empty) panel.append(el("p", { class: "empty" }, o.empty));
  else panel.append(el("div", { class: "lifts" }, o.metrics.map((m) => el("div", { class: "lift", "data-metric": m.metric, "data-challenger": m.challenger, "data-verdict": m.verdict },
    liftChart(m),
    el("div", { class: "lift-text" },
      el("span", { class: "badge v-" + m.verdict }, m.verdict.replace("_", " ")), " ",
      el("b", {}, signed(m.lift)), " ", el("span", {}, band(m.interval)), el("span", { class: "muted" }, " always valid"),
      el("div", { class: "evidence" }, `${m.role} · ${m.kind || ""} · fixed horizon ${band(m.fixed)} · units ${m.units.challenger ?? 0} / ${m.units.control ?? 0}${m.planned_units ? " of " + m.planned_units + " planned" : ""}`),
      m.reason ? el("div", { class: "why" }, m.reason) : null)))));
  if (o.labels && o.labels.length) panel.append(labelTable(o.labels));
  return panel;
}

function renderDenials(doc) {
  const d = doc.denials;
  const body = document.querySelector("#denials .body");
  body.replaceChildren(
    el("p", {}, el("b", { "data-denials": d.total }, d.total), " refused since the controller started, ", el("b", {}, d.last_60s), " in the last minute"),
    el("div", { class: "grid2" },
      table(["denial code", "requests"], d.by_code, "no denials"),
      table(["region", "requests"], d.by_region, "no denials")));
}

function renderTimeline(doc) {
  const list = document.querySelector("#timeline .body");
  if (!doc.audit.length) { list.replaceChildren(el("li", { class: "empty" }, "no audit events yet")); return; }
  list.replaceChildren(...doc.audit.map((r) => {
    const e = r.evidence || {};
    const bits = [];
    if (e.samples !== undefined) bits.push(`samples ${e.samples}`);
    if (e.error_rate !== undefined && e.error_rate !== null) bits.push(`error rate ${pct(e.error_rate)}`);
    if (e.p_error !== undefined) bits.push(`p errors ${pval(e.p_error)}`);
    if (e.p_latency !== undefined) bits.push(`p latency ${pval(e.p_latency)}`);
    return el("li", { "data-action": r.action },
      el("time", {}, r.time), " ",
      el("span", { class: "badge", style: `background:${ACTION_COLORS[r.action] || "#495057"}` }, r.action), " ",
      el("b", {}, [r.route, r.variant].filter(Boolean).join(" / ")), " ",
      el("span", { class: "muted" }, `by ${r.actor}`),
      r.weights ? el("span", { class: "muted" }, ` → ${Object.entries(r.weights).map(([k, v]) => `${k} ${v}%`).join(", ")}`) : null,
      el("div", { class: "why" }, r.reason), bits.length ? el("div", { class: "evidence" }, bits.join(" · ")) : null);
  }));
}

function render(doc) {
  lastDoc = doc;
  const c = doc.controller;
  document.getElementById("meta").textContent =
    `controller ${c.name || "?"}${c.leader ? " (leader)" : ""} · store ${c.store || "?"} · ${c.events ?? 0} events · policy ${c.policy_digest || "?"} · ${doc.time}`;
  document.getElementById("tokenform").hidden = !doc.allow_actions;
  document.getElementById("notices").replaceChildren(...doc.notices.map((n) => el("div", { class: "notice " + n.level }, n.text)));
  const routes = document.getElementById("routes");
  routes.replaceChildren(...(doc.routes.length ? doc.routes.map((r) => routeCard(r, doc)) : [el("p", { class: "empty" }, "no routes")]));
  renderDenials(doc);
  renderTimeline(doc);
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/events");
  es.addEventListener("state", (ev) => {
    conn.textContent = "live";
    conn.className = "pill ok";
    render(JSON.parse(ev.data));
  });
  es.addEventListener("error", () => {
    conn.textContent = lastDoc ? `disconnected since ${new Date().toLocaleTimeString()}, retrying…` : "cannot reach the controller, retrying…";
    conn.className = "pill error";
  });
}

function setupRange() {
  const select = document.getElementById("range");
  select.value = range;
  select.addEventListener("change", () => {
    range = select.value;
    sessionStorage.setItem(RANGE_KEY, range);
    if (lastDoc) render(lastDoc);
  });
}

// The server inlines the current document, so the first paint shows the state, not "connecting…".
function renderSnapshot() {
  const snapshot = document.getElementById("snapshot");
  if (snapshot) render(JSON.parse(snapshot.textContent));
}

setupToken();
setupRange();
renderSnapshot();
connect();
