"""The dashboard's aiohttp handlers (aiohttp_client): page, state, the SSE push, and guarded actions."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller
from cohortgate.core.rollout import Phase, Signal
from cohortgate.dashboard.app import Dashboard, TappedSource
from cohortgate.dashboard.view import Recorder
from cohortgate.store.events import REQUEST, Event, InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy

TOKEN = "dashboard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROLLBACK = {"route": "tabular", "variant": "canary"}


async def make_dashboard(aiohttp_client, allow_actions: bool = False, push_s: float = 0.1):
    sink = InProcessSink()
    await sink.start()
    recorder = Recorder()
    controller = Controller(make_policy(), InProcessState(), TappedSource(sink, recorder.observe))
    await controller.start()
    dash = Dashboard(controller, recorder, TOKEN, allow_actions=allow_actions, push_s=push_s)
    client = await aiohttp_client(dash.make_app())
    client.dash, client.controller, client.sink = dash, controller, sink
    return client


@pytest.fixture
async def ro(aiohttp_client):
    return await make_dashboard(aiohttp_client)


@pytest.fixture
async def rw(aiohttp_client):
    return await make_dashboard(aiohttp_client, allow_actions=True)


async def test_the_page_and_its_assets_are_served_from_the_package_with_a_strict_csp(ro):
    resp = await ro.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert '<script src="/dashboard.js">' in html and "http" not in html.split("<body>")[0].replace("http-equiv", "")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for path, ctype in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        r = await ro.get(path)
        assert r.status == 200 and r.content_type == ctype and len(await r.read()) > 1000


async def test_state_carries_weights_policy_weights_and_what_the_controller_consumed(ro):
    ro.sink.emit(Event(REQUEST, "tabular", "control", 200, 12.0, region="eu", unit="u1"))
    ro.sink.emit(Event(REQUEST, "tabular", "canary", 503, 30.0, region="us", unit="u2"))
    ro.controller.ingest(await ro.controller.source.read(100, 0.1))  # what Controller.run does
    doc = await (await ro.get("/api/state")).json()
    route = doc["routes"][0]
    assert route["name"] == "tabular" and route["empty"] is None
    assert [(v["name"], v["weight"], v["policy_weight"]) for v in route["variants"]] == [
        ("control", 90, 90),
        ("canary", 10, 10),
    ]
    assert sorted(route["regions"]) == [["eu", 1, 0], ["us", 1, 1]]
    assert doc["allow_actions"] is False and doc["controller"]["leader"] is True


async def test_errors_are_json_and_foreign_hosts_are_refused(ro):
    resp = await ro.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await ro.get("/api/state", headers={"Host": "attacker.example:9481"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "bad_host"
    assert (await ro.get("/api/state", headers={"Host": "localhost:9481"})).status == 200


async def test_read_only_dashboard_refuses_every_action_even_with_the_token(ro):
    for verb in ("rollback", "promote", "resume"):
        resp = await ro.post(f"/api/actions/{verb}", json=ROLLBACK, headers=AUTH)
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "actions_disabled"
    assert ro.controller.states["tabular"].variants["canary"].phase is Phase.PROMOTING
    assert await ro.controller.store.audit() == []


async def test_actions_need_the_token_in_a_header(rw):
    resp = await rw.post("/api/actions/rollback", json=ROLLBACK)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthenticated"
    resp = await rw.post("/api/actions/rollback", json=ROLLBACK, cookies={"token": TOKEN})
    assert resp.status == 401
    resp = await rw.post("/api/actions/rollback", json=ROLLBACK, headers={"Authorization": "Bearer wrong"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    resp = await rw.post("/api/actions/explode", json=ROLLBACK, headers=AUTH)
    assert resp.status == 404
    assert rw.controller.states["tabular"].variants["canary"].phase is Phase.PROMOTING


ACTION_BODIES = {"rollback": ROLLBACK, "promote": ROLLBACK, "resume": {"route": "tabular"}}


def test_the_action_list_covers_every_verb_and_post_route(rw):
    from cohortgate.dashboard.app import ACTIONS

    assert set(ACTION_BODIES) == set(ACTIONS)
    app = rw.dash.make_app()
    assert {r.resource.canonical for r in app.router.routes() if r.method == "POST"} == {"/api/actions/{verb}"}


@pytest.mark.parametrize("verb", sorted(ACTION_BODIES))
async def test_every_action_refuses_a_missing_or_wrong_token_and_does_nothing(rw, verb):
    """Issue 26: each verb, each way of not holding the token; then the token, to show it is the token."""
    refused = [
        ({}, 401, "unauthenticated"),
        ({"Authorization": "Bearer"}, 401, "unauthenticated"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthenticated"),
        ({"Authorization": TOKEN}, 401, "unauthenticated"),
        ({"Authorization": "Bearer wrong"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "forbidden"),
    ]
    version = rw.controller.states["tabular"].version
    for headers, status, code in refused:
        resp = await rw.post(f"/api/actions/{verb}", json=ACTION_BODIES[verb], headers=headers)
        assert (resp.status, (await resp.json())["error"]["code"]) == (status, code), headers
    assert rw.controller.states["tabular"].version == version
    assert await rw.controller.store.audit() == []
    resp = await rw.post(f"/api/actions/{verb}", json=ACTION_BODIES[verb], headers=AUTH)
    assert resp.status == (409 if verb == "resume" else 200), await resp.text()  # resume: nothing is halted


async def test_a_dashboard_action_is_audited_exactly_like_an_api_action(rw, aiohttp_client):
    resp = await rw.post("/api/actions/rollback", json=ROLLBACK, headers={**AUTH, "X-Cohortgate-Actor": "dashboard"})
    assert resp.status == 200
    body = await resp.json()
    assert body["state"]["weights"] == {"control": 100, "canary": 0}
    resp = await rw.post("/api/actions/rollback", json=ROLLBACK, headers=AUTH)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "invalid_transition"
    api = await aiohttp_client(make_app(rw.controller, TOKEN, rw.sink))
    resp = await api.post(
        "/actions/resume", json={"route": "tabular"}, headers={**AUTH, "X-Cohortgate-Actor": "cli:ann"}
    )
    assert resp.status == 200
    resume, rollback = await rw.controller.store.audit("tabular")
    assert (rollback["action"], rollback["actor"]) == ("rollback", "manual:dashboard")
    assert (resume["action"], resume["actor"]) == ("resume", "manual:cli:ann")
    assert set(rollback) == set(resume)


async def read_frame(resp) -> dict:
    while True:
        line = await resp.content.readline()
        if not line:
            raise AssertionError("the stream ended")
        if line.startswith(b"event: state"):
            return orjson.loads((await resp.content.readline()).removeprefix(b"data: "))


async def test_the_stream_pushes_a_state_change_at_once(aiohttp_client):
    client = await make_dashboard(aiohttp_client, push_s=30.0)  # the timer never fires during this test
    resp = await client.get("/api/events")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    first = await asyncio.wait_for(read_frame(resp), 5)
    assert first["routes"][0]["variants"][1]["weight"] == 10
    await client.controller.manual(Signal.ROLLBACK, "tabular", "canary", "manual:test")
    # The timer is 30 s away and the wait is bounded at 5 s, so this frame can only be the push the
    # state change caused (no wall-clock bar: a busy CI machine may take seconds, not 30).
    pushed = await asyncio.wait_for(read_frame(resp), 5)
    canary = pushed["routes"][0]["variants"][1]
    assert (canary["weight"], canary["phase"]) == (0, "rolled_back")
    assert pushed["audit"][0]["actor"] == "manual:test"
    resp.close()


async def test_the_stream_pushes_every_interval(aiohttp_client):
    client = await make_dashboard(aiohttp_client, push_s=0.1)
    resp = await client.get("/api/events")
    stamps = [(await asyncio.wait_for(read_frame(resp), 5))["generated_at"] for _ in range(4)]
    # No state change happens: every frame after the first is the timer's, in order. (How close they
    # come to push_s is a timing matter for bench/, not a bar for a busy CI machine.)
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    assert client.dash.pushes >= 3
    resp.close()
