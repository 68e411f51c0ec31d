"""The controller's decisions as spans (`cohortgate.controller.decision_trace`): one root span per
committed rollback/promote/halt, with the evidence, and no operator name."""

from __future__ import annotations

import json

from cohortgate.controller.decision_trace import decision_attributes, record_decision
from cohortgate.support.tracing import Tracing

RECORD = {
    "ts": 1.0,
    "route": "tabular",
    "variant": "canary",
    "action": "rollback",
    "signal": "harm",
    "actor": "operator:alice@example.com",
    "from": "ramping",
    "to": "rolled_back",
    "weights_before": {"control": 90, "canary": 10},
    "weights_after": {"control": 100, "canary": 0},
    "reason": "error rate: always-valid p 0.001 < 0.05",
    "evidence": {"p_value": 0.001, "requests": 1200, "errors": 40},
    "version": 7,
    "policy_digest": "sha256:abc",
}


def test_a_decision_is_one_root_span_with_its_evidence() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing("controller", None, 0.0, exporter=exporter)  # decisions ignore the ratio
    record_decision(tracing, RECORD)
    tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "cohortgate.controller.rollback"
    assert span.parent is None
    attrs = dict(span.attributes)
    assert (attrs["cohortgate.route"], attrs["cohortgate.variant"]) == ("tabular", "canary")
    assert (attrs["cohortgate.phase.from"], attrs["cohortgate.phase.to"]) == ("ramping", "rolled_back")
    assert json.loads(attrs["cohortgate.evidence"]) == RECORD["evidence"]
    assert json.loads(attrs["cohortgate.weights.after"]) == {"canary": 0, "control": 100}
    assert attrs["cohortgate.state_version"] == 7 and attrs["cohortgate.actor"] == "operator"
    assert "alice" not in repr(attrs)
    assert span.resource.attributes["service.name"] == "cohortgate-controller"
    tracing.shutdown()


def test_a_broken_record_never_raises() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing("controller", None, 0.0, exporter=exporter)
    record_decision(tracing, {"route": "x"})  # no action: logged, not raised
    tracing.provider.force_flush()
    assert exporter.get_finished_spans() == ()
    assert decision_attributes(RECORD | {"version": None})["cohortgate.route"] == "tabular"
    tracing.shutdown()


async def test_the_controller_traces_the_rollback_it_judged_and_an_operators_promotion() -> None:
    """Through the real loop (simulated traffic): the judge's rollback and an operator's promotion each
    become a span, with the evidence the audit record holds."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cohortgate.controller.simulate import Behaviour
    from cohortgate.core.rollout import Phase, Signal
    from tests.controller.policies import make_policy
    from tests.controller.test_loop import Sim, canary_phase

    exporter = InMemorySpanExporter()
    tracing = Tracing("controller", None, 0.0, exporter=exporter)
    sim = await Sim(make_policy(), {"control": Behaviour(0.0), "canary": Behaviour(1.0)}).start()
    sim.controller.tracing = tracing
    await sim.run(60, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    await sim.controller.manual(Signal.RESUME, "tabular", None, "manual:alice")
    tracing.provider.force_flush()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["cohortgate.controller.rollback", "cohortgate.controller.resume"]
    rollback = dict(spans[0].attributes)
    assert rollback["cohortgate.actor"] == "controller" and "error rate" in rollback["cohortgate.reason"]
    assert json.loads(rollback["cohortgate.evidence"])["p_error"] < 0.025
    assert dict(spans[1].attributes)["cohortgate.actor"] == "manual"
    assert not any("alice" in repr(dict(s.attributes)) for s in spans)
    tracing.shutdown()


def test_the_controller_cli_and_up_pass_the_collector() -> None:
    import argparse

    from cohortgate.cli.controller import register
    from cohortgate.local import recipes
    from tests.local.test_recipes import layout

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["controller", "--policy", "p.yaml", "--otlp-endpoint", "http://127.0.0.1:4318"])
    assert args.otlp_endpoint == "http://127.0.0.1:4318"
    argv = recipes.controller_recipe(layout(otlp_endpoint="http://127.0.0.1:4318")).argv
    assert argv[argv.index("--otlp-endpoint") + 1] == "http://127.0.0.1:4318"
    assert "--otlp-endpoint" not in recipes.controller_recipe(layout()).argv
