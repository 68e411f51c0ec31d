"""Each child's command line as `up` runs it (and reruns it after a crash), without a process."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cohortgate.core.contract import TOKEN_FILE_ENV, UNIT_SALT_ENV
from cohortgate.local.banner import BannerFacts, banner, demo_lines, status_command, token_command
from cohortgate.local.plan import SidecarSpec
from cohortgate.local.recipes import (
    Layout,
    controller_recipe,
    envoy_args,
    envoy_recipe,
    gateway_recipe,
    sidecar_recipe,
    traffic_recipe,
)

PORTS = {"controller": 19480, "dashboard": 19481, "gateway_metrics": 19482, "envoy": 18443}


def layout(redis: str | None = None, **kw) -> Layout:
    return Layout(
        state_dir=Path("/srv/state"),
        certs_dir=Path("/srv/certs"),
        ports=PORTS,
        processor_socket="/srv/state/processor.sock",
        als_socket="/srv/state/als.sock",
        gateway_policy=Path("/srv/state/policy.yaml"),
        controller_policy=Path("/srv/state/controller-policy.yaml"),
        redis=redis,
        unit_salt="s4lt",
        python="/venv/bin/python",
        **kw,
    )


def spec(fault_rate: float = 0.0, shadow: bool = False) -> SidecarSpec:
    return SidecarSpec(
        name="sidecar-tabular-canary-eu",
        url="http://127.0.0.1:8102",
        port=8102,
        model_path="/srv/models/tabular-canary.onnx",
        model_name="tabular",
        variant="canary",
        route="tabular",
        region="eu",
        shadow=shadow,
        fault_rate=fault_rate,
    )


def flag(argv: tuple[str, ...], name: str) -> str:
    """The value after ``name``; fails the test when the flag is absent."""
    assert name in argv, argv
    return argv[argv.index(name) + 1]


def test_a_sidecar_serves_its_model_on_its_port_and_reports_shadows_to_the_controller_or_redis():
    recipe = sidecar_recipe(spec(), 40001, layout())
    assert recipe.argv[:3] == ("/venv/bin/python", "-m", "cohortgate.cli") and recipe.argv[3] == "sidecar"
    assert flag(recipe.argv, "--port") == "40001" and flag(recipe.argv, "--name") == "tabular"
    assert flag(recipe.argv, "--model") == "/srv/models/tabular-canary.onnx"
    assert flag(recipe.argv, "--variant") == "canary"
    assert flag(recipe.argv, "--report-to") == "http://127.0.0.1:19480/reports"
    assert "--fault-rate" not in recipe.argv
    # the controller's /reports wants the admin token: without it every report was refused (401)
    assert recipe.env[TOKEN_FILE_ENV] == "/srv/state/admin.token"
    assert recipe.endpoint == "http://127.0.0.1:40001" and recipe.log_path == Path(
        "/srv/state/logs/sidecar-tabular-canary-eu.log"
    )
    assert recipe.info["port"] == 40001 and recipe.info["policy_url"] == "http://127.0.0.1:8102"
    with_redis = sidecar_recipe(spec(), 40001, layout(redis="redis://127.0.0.1:6390/0"))
    assert flag(with_redis.argv, "--report-to") == "redis://127.0.0.1:6390/0"


def test_the_demo_canary_gets_its_fault_knob_and_onset():
    recipe = sidecar_recipe(spec(fault_rate=0.3), 40001, layout(canary_fault_after_s=20.0))
    assert flag(recipe.argv, "--fault-rate") == "0.3" and flag(recipe.argv, "--fault-after") == "20.0"


def test_the_controller_follows_its_own_policy_file_not_the_gateways():
    recipe = controller_recipe(layout())
    assert flag(recipe.argv, "--policy") == "/srv/state/controller-policy.yaml"
    assert flag(recipe.argv, "--listen") == "127.0.0.1:19480"
    assert flag(recipe.argv, "--dashboard") == "127.0.0.1:19481"
    assert flag(recipe.argv, "--als") == "uds:/srv/state/als.sock"
    assert flag(recipe.argv, "--state-file") == "/srv/state/state.json"
    assert "--allow-actions" in recipe.argv and "--redis" not in recipe.argv
    assert flag(controller_recipe(layout(redis="redis://r")).argv, "--redis") == "redis://r"


def test_the_gateway_gets_the_unit_salt_in_its_environment_and_drops_a_stale_socket_before_each_start():
    recipe = gateway_recipe(layout(), Path("/srv/state/envoy/cds.yaml"))
    assert flag(recipe.argv, "--policy") == "/srv/state/policy.yaml"
    assert flag(recipe.argv, "--listen") == "uds:/srv/state/processor.sock"
    assert flag(recipe.argv, "--envoy-xds") == "/srv/state/processor.sock.xds"  # delta CDS by default
    assert "--envoy-cds" not in recipe.argv
    assert flag(recipe.argv, "--envoy-admin") == "unix:/srv/state/envoy-admin.sock"  # 0600: only this user
    by_file = gateway_recipe(layout(delta_cds=False), Path("/srv/state/envoy/cds.yaml"))
    assert flag(by_file.argv, "--envoy-cds") == "/srv/state/envoy/cds.yaml" and "--envoy-xds" not in by_file.argv
    assert flag(recipe.argv, "--metrics") == "127.0.0.1:19482"
    assert flag(recipe.argv, "--state-file") == "/srv/state/state.json"  # embedded: the controller's file
    assert recipe.env == {UNIT_SALT_ENV: "s4lt"} and "s4lt" not in recipe.argv  # never on a command line
    assert recipe.stale_paths == ("/srv/state/processor.sock",)
    shared = gateway_recipe(layout(redis="redis://r"), Path("/srv/state/envoy/cds.yaml"))
    assert flag(shared.argv, "--redis") == "redis://r"
    assert flag(shared.argv, "--state-file") == "/srv/state/gateway-state.json"  # its own copy


def test_envoy_drains_every_connection_at_once_for_two_seconds():
    assert envoy_args() == ("--drain-time-s", "2", "--drain-strategy", "immediate")
    recipe = envoy_recipe(layout(), Path("/b.yaml"), Path("/cds.yaml"), concurrency=2)
    assert recipe.endpoint == "https://127.0.0.1:18443" and recipe.info["admin"] == "unix:/srv/state/envoy-admin.sock"
    assert recipe.argv[-4:] == envoy_args()


def test_the_demo_traffic_runs_against_the_state_dir():
    recipe = traffic_recipe(layout(), "tabular")
    assert flag(recipe.argv, "--state-dir") == "/srv/state" and flag(recipe.argv, "--model") == "tabular"


def test_a_restart_runs_the_same_command_again():
    """A recipe is a value: the second start of a child is exactly its first."""
    assert gateway_recipe(layout(), Path("/cds")) == gateway_recipe(layout(), Path("/cds"))


# ------------------------------------------------------------------------------ the banner


def run_doc() -> dict:
    return {
        "state_dir": "/srv/state",
        "logs": "/srv/state/logs",
        "policy": {"effective": "/srv/state/policy.yaml"},
        "ports": {"controller": 19480},
        "endpoints": {
            "gateway": "https://127.0.0.1:18443",
            "envoy_admin": "unix:/srv/state/envoy-admin.sock",
            "dashboard": "http://127.0.0.1:19481/",
            "controller_api": "http://127.0.0.1:19480",
            "gateway_metrics": "http://127.0.0.1:19482/metrics",
            "processor": "uds:/srv/state/processor.sock",
            "access_log": "uds:/srv/state/als.sock",
        },
        "children": {"envoy": {"pid": 11}, "controller": {"pid": 12}, "gateway": {"pid": None}},
        "certs": {
            "dir": "/srv/certs",
            "ca": "/srv/certs/ca.crt",
            "clients": {"app-demo": {"cert": "/srv/certs/clients/app-demo.crt", "key": "/srv/certs/k.key"}},
        },
    }


def test_the_banner_prints_a_command_that_mints_a_token_never_a_token():
    facts = BannerFacts(
        took_s=12.3, transport="grpc", redis=None, state_dir=Path("/srv/state"), sidecars=[(spec(), 40001)],
        model="tabular",
    )  # fmt: skip
    text = "\n".join(banner(run_doc(), facts))
    assert "eyJ" not in text  # no JWT on stdout
    mint = "cohortgate token --certs /srv/certs --sub alice --residency eu --scope predict --ttl 1h"
    assert f'-H "Authorization: Bearer $({mint})"' in text
    assert "https://127.0.0.1:18443/v2/models/tabular/infer" in text
    assert "cohortgate is up in 12.3s (embedded, no Redis)." in text
    assert "tabular variant canary (eu)" in text and "http://127.0.0.1:40001" in text
    assert "pid 11" in text and "pid None" not in text  # a child between restarts shows no pid
    assert "--state-dir /srv/state" in text


def test_the_token_command_names_an_issuer_and_audience_only_when_they_are_not_the_defaults():
    assert "--issuer" not in token_command(Path("/c"), "bob")
    command = token_command(Path("/c"), "bob", issuer="https://idp.example", audience="scoring")
    assert "--issuer https://idp.example --audience scoring" in command


@pytest.mark.parametrize(
    ("port", "state", "want"),
    [
        (9480, Path(".cohortgate"), "cohortgate status --watch"),
        (19480, Path("/srv/state"), "cohortgate status --watch --api http://127.0.0.1:19480 --token-file "
         "/srv/state/admin.token"),
    ],
)  # fmt: skip
def test_the_status_command_carries_the_flags_this_stack_needs(port, state, want):
    assert status_command(port, state) == want


def test_the_demo_says_the_canary_goes_bad_counted_from_its_first_request():
    lines = demo_lines(
        [spec(fault_rate=0.3), spec()], fault_after_s=20, traffic_log=Path("/srv/state/logs/traffic.log"),
        dashboard="http://127.0.0.1:19481/", status="cohortgate status --watch",
    )  # fmt: skip
    text = "\n".join(lines)
    assert "tabular/canary fails 30% of its requests from 20 s after its first request on" in text
    assert text.count("fails") == 1


def test_the_demo_canary_stays_healthy_for_its_onset_counted_from_its_first_request():
    """The stack may take a minute to start on a busy machine: the 20 s start with the traffic."""
    from sidecar.faults import FaultInjector

    now = [0.0]
    faults = FaultInjector(1.0, after_s=20.0, clock=lambda: now[0])
    now[0] = 50.0  # the stack took 50 s to start; the demo's traffic arrives now
    assert not faults.fail_next()
    now[0] = 69.9
    assert not faults.fail_next()
    now[0] = 70.0
    assert faults.fail_next() and faults.count == 1


def test_gateway_workers_reach_the_gateway_and_its_readiness_probe() -> None:
    one = gateway_recipe(layout(), Path("/srv/state/envoy/cds.json"))
    assert "--workers" not in one.argv and one.stale_paths == ("/srv/state/processor.sock",)
    four = gateway_recipe(layout(gateway_workers=4), Path("/srv/state/envoy/cds.json"))
    assert four.argv[four.argv.index("--workers") + 1] == "4"
    assert four.endpoint == "uds:/srv/state/processor.sock.w0"  # what `up` waits for: a worker's own socket
    assert four.stale_paths == tuple(f"/srv/state/processor.sock.w{i}" for i in range(4))


# ------------------------------------------------------------------------------ the quality demo


def test_the_quality_demo_traffic_plants_its_drift_with_the_traffic_commands_own_flag():
    """`up --demo-drift SPEC` hands SPEC to `cohortgate traffic --drift` unchanged, and the real CLI reads it."""
    from cohortgate.cli import build_parser
    from cohortgate.cli.traffic import Drift

    recipe = traffic_recipe(layout(), "tabular", drift="feature=0,after=30s,variant=canary")
    assert flag(recipe.argv, "--drift") == "feature=0,after=30s,variant=canary"
    args = build_parser().parse_args(list(recipe.argv[recipe.argv.index("traffic") :]))
    assert args.drift == Drift(0, 30.0, 1.5, "canary")
    assert "--drift" not in traffic_recipe(layout(), "tabular").argv


def test_up_demo_drift_is_a_demo_with_a_healthy_canary():
    """The drift demo's rollback must come from drift alone: no fault is planted beside it."""
    from cohortgate.cli import build_parser
    from cohortgate.cli.up import stack_options

    parse = build_parser().parse_args
    drift = stack_options(parse(["up", "--demo-drift", "feature=0,after=30s,variant=canary"]))
    assert drift.demo and drift.demo_drift == "feature=0,after=30s,variant=canary"
    assert drift.canary_fault_rate == 0.0 and drift.canary_fault_after_s == 0.0
    plain = stack_options(parse(["up", "--demo"]))
    assert plain.canary_fault_rate > 0 and not plain.demo_drift
    # a typo fails `up` itself, not its traffic child minutes later
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse(["up", "--demo-drift", "feature=x"])


def test_the_quality_demo_banner_says_what_drifts_and_what_to_expect():
    lines = demo_lines(
        [spec()], fault_after_s=0, traffic_log=Path("/srv/state/logs/traffic.log"), dashboard=None,
        status="cohortgate status", drift="feature=0,after=30s,variant=canary",
    )  # fmt: skip
    text = "\n".join(lines)
    assert "input drift (feature=0,after=30s,variant=canary)" in text and "fails" not in text
