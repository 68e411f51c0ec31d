"""The controller's JSON API (aiohttp_client) and the `cohortgate status/rollback/promote/resume` CLI."""

from __future__ import annotations

import asyncio
import json
import stat

import pytest

from cohortgate.cli import main
from cohortgate.controller.api import load_or_create_token, make_app
from cohortgate.controller.loop import Controller
from cohortgate.core.rollout import Phase
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState, RedisState
from sidecar.report import HttpSink, ShadowReport
from tests.controller.policies import make_policy, write_policy

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(aiohttp_client):
    sink = InProcessSink()
    await sink.start()
    controller = Controller(make_policy(), InProcessState(), sink)
    await controller.start()
    client = await aiohttp_client(make_app(controller, TOKEN, sink))
    client.controller = controller
    client.sink = sink
    return client


async def test_everything_but_health_metrics_and_reports_needs_the_token(api):
    for path in ("/status", "/audit"):
        resp = await api.get(path)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthenticated"
    resp = await api.get("/status", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    assert (await api.get("/healthz")).status == 200
    resp = await api.get("/metrics")
    assert resp.status == 200 and "cohortgate_controller_ticks_total" in await resp.text()


REPORT = ShadowReport("r0", "control", "tabular", 200, 5.0, "same", (), 1.0).to_json()
#: Every write endpoint with a body it would act on: a test below checks this list is complete.
WRITES = {
    "/actions/rollback": {"route": "tabular", "variant": "canary"},
    "/actions/promote": {"route": "tabular", "variant": "canary"},
    "/actions/resume": {"route": "tabular"},
    "/reports": [REPORT],
    # a well-formed quality report for a route without a quality block: counted as rejected (202)
    "/reports/quality": [{"model": "tabular", "variant": "canary", "window_start": 0.0, "window_end": 1.0}],
    # a well-formed exposure token under no key: the handler refuses it as forged (403)
    "/outcomes": {"exposure": "1.tabular.canary.ab.5f5e100.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", "metric": "c", "value": 1},
}
BAD_AUTH = (
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"X-Cohortgate-Token": TOKEN},
)


def test_the_write_list_covers_every_post_route():
    app = make_app(Controller(make_policy(), InProcessState(), InProcessSink()), TOKEN, InProcessSink())
    posts = {r.resource.canonical for r in app.router.routes() if r.method == "POST"}
    assert posts == set(WRITES)


@pytest.mark.parametrize("path", sorted(WRITES))
async def test_every_write_endpoint_refuses_a_missing_or_wrong_token_and_does_nothing(api, path):
    """Issue 26: letting POST /actions/* through without a token passed the suite; not any more."""
    version = api.controller.states["tabular"].version
    for headers in BAD_AUTH:
        resp = await api.post(path, json=WRITES[path], headers=headers)
        assert resp.status == 401, (path, headers)
        assert (await resp.json())["error"] == {
            "code": "unauthenticated",
            "message": "a valid admin bearer token is required",
        }
    assert api.controller.states["tabular"].version == version
    assert await api.controller.store.audit() == []
    assert await api.sink.read(100, 0.05) == []
    # the same request with the token reaches its handler, so the refusals above were the token's doing
    resp = await api.post(path, json=WRITES[path], headers=AUTH)
    # resume: nothing is halted; quality: the report names no route with a quality block (rejected, counted)
    expected = {"/reports": 202, "/reports/quality": 202, "/actions/resume": 409, "/outcomes": 403}.get(path, 200)
    assert resp.status == expected, await resp.text()


async def test_status_lists_routes_and_variants(api):
    resp = await api.get("/status", headers=AUTH)
    doc = await resp.json()
    route = doc["routes"]["tabular"]
    assert route["status"] == "promoting"
    assert route["variants"]["control"]["weight"] == 90 and route["variants"]["canary"]["phase"] == "promoting"
    assert doc["controller"]["leader"] is True


async def test_actions_change_state_and_errors_are_json(api):
    resp = await api.post("/actions/rollback", json={"route": "tabular", "variant": "canary"}, headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["changes"][0]["action"] == "rollback" and body["state"]["weights"] == {"control": 100, "canary": 0}
    assert api.controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK

    resp = await api.post("/actions/rollback", json={"route": "tabular", "variant": "canary"}, headers=AUTH)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "invalid_transition"
    resp = await api.post("/actions/promote", json={"route": "nope", "variant": "canary"}, headers=AUTH)
    assert resp.status == 404
    resp = await api.post("/actions/resume", data=b"{not json", headers=AUTH)
    assert resp.status == 400 and "error" in await resp.json()
    resp = await api.post("/actions/resume", json={"route": "tabular"}, headers={**AUTH, "X-Cohortgate-Actor": "ann"})
    assert resp.status == 200

    audit = (await (await api.get("/audit?route=tabular", headers=AUTH)).json())["records"]
    assert [(r["action"], r["actor"]) for r in audit] == [("resume", "manual:ann"), ("rollback", "manual:api")]


async def test_sidecar_reports_are_accepted_in_the_sidecars_own_format(api):
    reports = []
    for i in range(10):
        reports.append(ShadowReport(f"r{i}", "control", "tabular", 200, 5.0, "same", (), 1.0).to_json())
        reports.append(
            ShadowReport(f"r{i}", "challenger", "tabular", 200, 7.0, "same" if i < 9 else "x", (), 1.0).to_json()
        )
    resp = await api.post("/reports", data=json.dumps([*reports, {"nonsense": 1}]), headers=AUTH)
    assert resp.status == 202 and await resp.json() == {"accepted": 20, "rejected": 1}
    api.controller.ingest(await api.sink.read(100, 0.1))
    shadow = (await (await api.get("/status", headers=AUTH)).json())["routes"]["tabular"]["shadows"]["challenger"]
    assert shadow["pairs"] == 10 and shadow["agreement"] == 0.9


async def test_the_sidecars_http_sink_sends_the_admin_token_from_its_file(api, tmp_path, monkeypatch):
    """Issue 16.6: /reports needs the token; the sidecar reads it from $COHORTGATE_TOKEN_FILE."""
    url = str(api.make_url("/reports"))
    report = ShadowReport("r1", "control", "tabular", 200, 5.0, "same", (), 1.0)
    monkeypatch.delenv("COHORTGATE_TOKEN_FILE", raising=False)
    anonymous = HttpSink(url)
    with pytest.raises(RuntimeError, match=r"401: set \$COHORTGATE_TOKEN_FILE"):
        await anonymous.send([report])
    await anonymous.close()
    assert await api.sink.read(10, 0.05) == []

    token_file = tmp_path / "admin.token"
    token_file.write_text("stale\n")
    monkeypatch.setenv("COHORTGATE_TOKEN_FILE", str(token_file))
    sink = HttpSink(url)
    try:
        with pytest.raises(RuntimeError, match="401 with the token from"):
            await sink.send([report])
        assert await api.sink.read(10, 0.05) == []
        token_file.write_text(TOKEN + "\n")  # the controller's token: the file is read again after a 401
        await sink.send([report])
        assert [e.request_id for e in await api.sink.read(10, 0.1)] == ["r1"]
    finally:
        await sink.close()


def test_token_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "dir" / "admin.token"
    token = load_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token


async def test_cli_talks_to_the_api(api, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    base = ["--api", str(api.make_url("")), "--token-file", str(token_file)]

    def cli(*args):
        return main([args[0], *base, *args[1:]])

    assert await asyncio.to_thread(cli, "status") == 0
    out = capsys.readouterr().out
    assert "route tabular: promoting" in out and "canary" in out
    assert await asyncio.to_thread(cli, "promote", "tabular", "canary") == 0
    assert (
        "tabular/canary: promote (promoting -> promoting); weights now control 75%, canary 25%"
        in capsys.readouterr().out
    )
    assert await asyncio.to_thread(cli, "rollback", "tabular", "canary") == 0
    assert await asyncio.to_thread(cli, "rollback", "tabular", "canary") == 1
    assert "cannot rollback tabular/canary while it is rolled_back (409 invalid_transition)" in capsys.readouterr().err
    assert await asyncio.to_thread(cli, "resume", "tabular", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"]["weights"] == {"control": 90, "canary": 10}
    assert await asyncio.to_thread(cli, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["routes"]["tabular"]["version"] == 3

    token_file.write_text("wrong\n")
    assert await asyncio.to_thread(cli, "status") == 1
    assert "401 unauthenticated" in capsys.readouterr().err


@pytest.mark.integration
async def test_cli_talks_to_redis_directly(redis_server, tmp_path, capsys):
    policy_file = write_policy(tmp_path / "policy.yaml")
    base = ["--redis", redis_server.url, "--policy", str(policy_file)]
    assert await asyncio.to_thread(main, ["rollback", *base, "tabular", "canary"]) == 0
    assert "tabular/canary: rollback" in capsys.readouterr().out
    store = RedisState(redis_server.url)
    await store.start()
    try:
        assert (await store.load())["tabular"].disabled == {"canary"}
        assert (await store.audit("tabular"))[0]["actor"].startswith("manual:cli:")
    finally:
        await store.close()
    assert await asyncio.to_thread(main, ["status", *base, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["routes"]["tabular"]["variants"]["canary"] == {"weight": 0, "enabled": False, "phase": "rolled_back"}
    assert await asyncio.to_thread(main, ["promote", "--redis", redis_server.url, "tabular", "canary"]) == 1
    assert "need --policy" in capsys.readouterr().err
