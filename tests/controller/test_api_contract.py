"""Regressions found by contract fuzzing (tests/contracts/test_fuzz.py) in the controller API."""

from __future__ import annotations

import pytest

from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy

TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
async def api(aiohttp_client):
    sink = InProcessSink()
    await sink.start()
    return await aiohttp_client(make_app(Controller(make_policy(), InProcessState(), sink), TOKEN, sink))


@pytest.mark.parametrize("body", [b"null", b"5", b'"report"', b"true", b"-3.7e-217"])
async def test_reports_refuse_a_body_that_is_neither_an_object_nor_a_list(api, body):
    """Was 202 {"accepted": 0, "rejected": 1}: a scalar body is malformed, not a bad report."""
    resp = await api.post("/reports", data=body, headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "bad_request"


async def test_reports_still_count_unreadable_items_of_a_list_as_rejected(api):
    resp = await api.post("/reports", data=b'[5, {"ts": null}, {"variant": "canary"}]', headers=AUTH)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 1, "rejected": 2}


@pytest.mark.parametrize(("method", "path", "allowed"), [("TRACE", "/status", "GET"), ("PUT", "/reports", "POST")])
async def test_a_method_the_path_does_not_serve_is_405_with_allow(api, method, path, allowed):
    """Was a JSON 405 without Allow (RFC 9110 requires it): the error middleware dropped the header."""
    resp = await api.request(method, path, headers=AUTH)
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert allowed in {m.strip() for m in resp.headers["Allow"].split(",")}
