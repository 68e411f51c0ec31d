"""Regressions found by contract fuzzing (tests/contracts/test_fuzz.py) in the dashboard."""

from __future__ import annotations

import pytest

from cohortgate.controller.loop import Controller
from cohortgate.dashboard.app import Dashboard
from cohortgate.dashboard.view import Recorder
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy


@pytest.mark.parametrize(("method", "path"), [("TRACE", "/api/state"), ("PUT", "/"), ("GET", "/api/actions/rollback")])
async def test_a_method_the_path_does_not_serve_is_405_with_allow(aiohttp_client, method, path):
    """Was a JSON 405 without Allow: the error middleware rebuilt the response and dropped it."""
    dash = Dashboard(Controller(make_policy(), InProcessState(), InProcessSink()), Recorder(), "t")
    client = await aiohttp_client(dash.make_app())
    resp = await client.request(method, path)
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert allowed & {"GET", "POST"}
    assert resp.headers["X-Content-Type-Options"] == "nosniff"  # the security headers stay
