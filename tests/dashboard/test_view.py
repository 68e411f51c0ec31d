"""The dashboard's pure shaping: per-second series, denial counts, guardrail and SRM sentences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cohortgate.dashboard.view import Recorder, denial_code, srm_view, tripped_guardrails, view
from cohortgate.store.events import REQUEST, Event

T0 = 1_700_000_000


def req(variant: str = "canary", status: int = 200, latency: float = 10.0, region: str = "eu") -> Event:
    return Event(REQUEST, "tabular", variant, status, latency, region=region, unit="u")


def denied(status: int) -> Event:
    return Event(REQUEST, "", "", status, 1.0)


def test_series_has_one_point_per_completed_second_and_zeros_for_quiet_ones():
    r = Recorder(horizon_s=60, clock=lambda: T0)
    for i in range(10):
        r.observe(req(status=500 if i < 2 else 200, latency=float(i + 1)), now=T0 + 0.5)
    r.observe(req(), now=T0 + 3.2)
    pts = r.series("tabular", "canary", now=T0 + 4.1)
    assert [p[0] for p in pts] == [T0, T0 + 1, T0 + 2, T0 + 3]  # T0+4 is still filling
    _t, n, err, p50, p99 = pts[0]
    assert (n, err) == (10, 0.2) and 5.0 <= p50 <= 6.0 and 9.0 <= p99 <= 10.0
    assert pts[1] == [T0 + 1, 0, None, None, None]
    assert pts[3][1] == 1
    assert r.last_rate("tabular", "canary", now=T0 + 4.1) == 1
    assert r.last_rate("tabular", "canary", now=T0 + 9) == 0
    assert r.series("tabular", "control", now=T0 + 4) == []


def test_old_seconds_fall_off_the_horizon():
    r = Recorder(horizon_s=5)
    r.observe(req(), now=T0)
    r.observe(req(), now=T0 + 20)
    pts = r.series("tabular", "canary", now=T0 + 21)
    assert [p[0] for p in pts] == list(range(T0 + 16, T0 + 21))


def test_regions_and_denials_are_counted():
    r = Recorder()
    r.observe(req(region="eu", status=503), now=T0)
    r.observe(req(region="us"), now=T0)
    r.observe(req(region=""), now=T0)
    r.observe(Event(REQUEST, "tabular", "canary", 200, 1.0, shadow_of="control"), now=T0)  # a mirror: not counted
    for s in (401, 401, 403, 451, 418):
        r.observe_denial(denied(s), now=T0 + 1)
    assert dict(r.regions["tabular"]) == {"eu": 1, "us": 1, "unknown": 1}
    assert dict(r.region_errors["tabular"]) == {"eu": 1}
    d = r.denials(now=T0 + 2)
    assert d["total"] == 5 and d["last_60s"] == 5
    assert d["by_code"][0] == ["unauthenticated", 2]
    assert {c for c, _ in d["by_code"]} == {"unauthenticated", "forbidden", "residency_unavailable", "http_418"}
    assert d["by_region"] == [["unknown", 5]]


@given(st.integers(0, 999))
def test_every_status_has_a_denial_code(status):
    code = denial_code(status)
    assert code and " " not in code


GUARDS = {"alpha": 0.05, "min_samples": 100, "max_error_rate": 0.05, "max_p99_ms": 300}


def test_tripped_guardrails_name_the_test_or_the_limit():
    quiet = {"p_error": 0.5, "p_latency": 0.9, "window": {"requests": 500, "error_rate": 0.01, "p99_ms": 120}}
    assert tripped_guardrails(quiet, GUARDS) == []
    errors = {**quiet, "p_error": 0.001}
    assert tripped_guardrails(errors, GUARDS)[0].startswith("error-rate sequential test")
    limits = {**quiet, "window": {"requests": 500, "error_rate": 0.2, "p99_ms": 900}}
    assert [t.split()[0] for t in tripped_guardrails(limits, GUARDS)] == ["max_error_rate", "max_p99_ms"]
    few = {**quiet, "window": {"requests": 50, "error_rate": 0.2, "p99_ms": 900}}
    assert tripped_guardrails(few, GUARDS) == []  # absolute limits wait for min_samples


def test_srm_sentences():
    assert srm_view(None)["state"] == "unchecked"
    assert "fewer than two" in srm_view({"checked": False, "reason": "fewer than two live variants"})["text"]
    doc = {"checked": True, "counts": {"a": 60, "b": 40}, "weights": {"a": 50, "b": 50}, "chi2": 4.0,
           "p_chi2": 0.04, "p_always_valid": 0.001, "mismatch": True}  # fmt: skip
    v = srm_view(doc)
    assert v["state"] == "mismatch" and "a 60, b 40" in v["text"] and "halted" in v["text"]
    assert srm_view({**doc, "mismatch": False})["state"] == "ok"


def status_doc(requests: int = 0, store: str = "ok", leader: bool = True) -> dict:
    window = {"requests": requests, "errors": 0, "error_rate": 0.0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    return {
        "generated_at": T0,
        "controller": {
            "name": "c1",
            "leader": leader,
            "store": store,
            "pending_writes": [],
            "policy_digest": "ab" * 32,
        },
        "routes": {
            "tabular": {
                "status": "promoting",
                "version": 3,
                "guardrails": GUARDS,
                "srm": {"checked": False, "reason": "too few units (3)"},
                "variants": {
                    "control": {"weight": 100, "enabled": True, "window": window, "phase": "control"},
                    "canary": {
                        "weight": 0,
                        "enabled": False,
                        "window": window,
                        "phase": "rolled_back",
                        "reason": "error rate 30%",
                        "p_error": 0.001,
                        "p_latency": 1.0,
                    },
                },
                "shadows": {"challenger": {"pairs": 4, "agreement": 0.75, "latency_delta_ms": None}},
            }
        },
    }


def test_view_says_when_there_is_no_traffic_and_when_the_store_is_down():
    r = Recorder()
    doc = view(status_doc(), policy_weights={"tabular": {"control": 90, "canary": 10}}, recorder=r, audit=[],
               now=T0, store_down_since=T0 - 65)  # fmt: skip
    route = doc["routes"][0]
    assert route["empty"] == "no traffic yet on route tabular"
    assert [(v["name"], v["weight"], v["policy_weight"]) for v in route["variants"]] == [
        ("control", 100, 90),
        ("canary", 0, 10),
    ]
    assert route["variants"][1]["evidence"]["tripped"][0].startswith("error-rate")
    assert route["shadows"] == [
        {"name": "challenger", "pairs": 4, "agreement": 0.75, "latency_delta_ms": None, "shadow_errors": 0}
    ]
    texts = [n["text"] for n in doc["notices"]]
    assert any(t.startswith("controller cannot reach the state store (Redis) since ") for t in texts)
    r.observe(req(), now=T0)
    doc = view(status_doc(requests=1), policy_weights={}, recorder=r, audit=[], now=T0 + 2)
    assert doc["routes"][0]["empty"] is None and doc["notices"] == []


def test_view_puts_audit_records_on_the_timeline_and_on_their_route():
    rec = {"ts": T0 + 1, "route": "tabular", "variant": "canary", "action": "rollback", "actor": "manual:cli:ann",
           "reason": "rollback by manual:cli:ann", "weights_after": {"control": 100, "canary": 0},
           "evidence": {"window": {"requests": 40, "error_rate": 0.3, "p99_ms": 80}, "p_error": 0.001}}  # fmt: skip
    reload = {"ts": T0 + 2, "route": "", "action": "policy_reload", "actor": "controller:c1", "reason": "a -> b"}
    doc = view(status_doc(), policy_weights={}, recorder=Recorder(), audit=[rec, reload], now=T0 + 3)
    assert [a["action"] for a in doc["audit"]] == ["policy_reload", "rollback"]
    marker = doc["routes"][0]["markers"][0]
    assert marker["actor"] == "manual:cli:ann" and marker["evidence"]["samples"] == 40
    assert marker["evidence"]["p_error"] == 0.001


def test_view_without_a_status_and_as_a_follower():
    doc = view(None, policy_weights={}, recorder=Recorder(), audit=[], now=T0)
    assert doc["routes"] == [] and "no controller status" in doc["notices"][0]["text"]
    doc = view(status_doc(leader=False), policy_weights={}, recorder=Recorder(), audit=[], now=T0)
    assert any("not the leader" in n["text"] for n in doc["notices"])


def test_view_raises_safe_mode_and_control_breach_alerts_as_notices():
    status = status_doc()
    status["controller"]["safe_mode"] = "no readable state file (state.json: garbage)"
    status["routes"]["tabular"]["alert"] = {"kind": "control_breach", "reason": "control error rate 9% > 5%"}
    doc = view(status, policy_weights={}, recorder=Recorder(), audit=[], now=T0)
    errors = [n["text"] for n in doc["notices"] if n["level"] == "error"]
    assert any(t.startswith("SAFE MODE: no readable state file") for t in errors)
    assert "tabular: experiment halted: control error rate 9% > 5%" in errors
