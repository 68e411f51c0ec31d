"""`grafana preview`: the dashboard's queries as Grafana sends them, and the panels on a page."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from cohortgate.cli import main
from cohortgate.deploy import grafana
from cohortgate.deploy.grafana_preview import ALL, Panel, Series, fetch, legend, page, substitute


def test_variables_and_intervals_are_substituted_like_grafana_with_all_selected():
    expr = 'sum(rate(x{route=~"$route", variant=~"$variant"}[$__rate_interval])) + increase(y[$__range])'
    out = substitute(expr, range_s=900, rate_interval_s=60)
    assert out == f'sum(rate(x{{route=~"{ALL}", variant=~"{ALL}"}}[60s])) + increase(y[900s])'
    for q in grafana.queries(grafana.dashboard()):
        assert "$" not in substitute(q, range_s=60, rate_interval_s=60)


def test_legend_fills_labels_and_falls_back_to_the_label_set():
    assert legend("{{route}}/{{variant}}", {"route": "tabular", "variant": "canary"}) == "tabular/canary"
    assert legend("{{ code }}", {"code": "forbidden"}) == "forbidden"
    assert legend("", {"a": "1"}) == '{"a": "1"}'


class FakePrometheus:
    """Answers like Prometheus' HTTP API: one series for the weights panel, nothing for the rest."""

    def __init__(self) -> None:
        self.asked: list[dict[str, list[str]]] = []

    def __call__(self, url: str) -> dict:
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        self.asked.append(params)
        query = params["query"][0]
        if "cohortgate_variant_weight" in query and "max by" in query:
            values = [[1000.0, "90"], [1005.0, "NaN"], [1010.0, "10"]]
            return {"status": "success", "data": {"result": [{"metric": {"route": "r", "variant": "c"}, "values": values}]}}  # fmt: skip  # noqa: E501
        if "bad" in query:
            return {"status": "error", "error": "parse error"}
        return {"status": "success", "data": {"result": []}}


def test_fetch_asks_every_target_over_the_range_and_keeps_numbers_only():
    prom = FakePrometheus()
    panels = fetch("http://p:9090", grafana.dashboard(), end=1010.0, range_s=10, step_s=5, get=prom)
    targets = [t for p in grafana.dashboard()["panels"] for t in p.get("targets", [])]
    assert len(prom.asked) == len(targets)
    weights = next(p for p in panels if p.title == "Effective weights")
    assert weights.has_data and weights.series[0].points == ((1000.0, 90.0), (1010.0, 10.0))
    assert weights.series[0].legend == "r/c" and weights.row == "Traffic"
    assert sum(p.has_data for p in panels) == 1
    ranged = [a for a in prom.asked if "start" in a]
    assert all(a["start"] == ["1000.0"] and a["end"] == ["1010.0"] and a["step"] == ["5"] for a in ranged)


def test_a_refused_query_names_its_panel():
    doc = grafana.dashboard()
    doc["panels"][1]["targets"][0]["expr"] = "bad("
    with pytest.raises(ValueError, match=doc["panels"][1]["title"]):
        fetch("http://p:9090", doc, end=1.0, get=FakePrometheus())


def test_the_page_draws_data_and_says_no_data():
    drawn = Panel("Weights", "timeseries", "percent", (0, 1, 12, 8), (Series("r/<c>", ((1.0, 90.0), (2.0, 10.0))),))
    empty = Panel("Queue", "timeseries", "short", (12, 1, 12, 8), (Series("q", ()),))
    stat = Panel("Rollbacks", "stat", "short", (0, 9, 8, 8), (Series("r/c rollback", ((2.0, 1.0),)),))
    html = page([drawn, empty, stat], note="3 panels")
    assert html.count("<polyline") == 1 and "No data" in html and "r/&lt;c&gt;" in html
    assert "<b>1</b>" in html and "grid-column:13 / span 12" in html


def test_the_command_says_why_when_prometheus_is_unreachable(tmp_path, capsys):
    out = tmp_path / "p.html"
    code = main(["grafana", "preview", "--prometheus-url", "http://127.0.0.1:9", "--out", str(out)])
    assert code == 1 and not out.exists()
    assert "cannot query http://127.0.0.1:9" in capsys.readouterr().err
    json.dumps(grafana.dashboard())  # the model the page is built from stays JSON
