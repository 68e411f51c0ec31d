"""The OpenAPI documents are valid 3.1, name exactly the routes each app registers, and are served.

Route parity works both ways: a route added to an app without its contract fails here, and so does a
documented operation nobody serves. No sockets: the apps are built and their routers read, and the
served documents are fetched through aiohttp's test client.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31  # the OAS 3.1 meta-schema it validates with

from cohortgate.controller import openapi as controller_openapi
from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller
from cohortgate.dashboard import openapi as dashboard_openapi
from cohortgate.dashboard.app import ACTIONS, Dashboard
from cohortgate.dashboard.view import Recorder
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from sidecar import openapi as sidecar_openapi
from sidecar.protocol import TensorSpec
from sidecar.server import SidecarConfig, build_app
from tests.controller.policies import make_policy

TOKEN = "contract-token"
ROOT = Path(__file__).resolve().parents[2]


def _controller() -> Controller:
    return Controller(make_policy(), InProcessState(), InProcessSink())


def registered(app, expand: dict[str, tuple[str, ...]] | None = None) -> set[tuple[str, str]]:
    """(method, path) of every route an aiohttp app serves; HEAD (aiohttp adds it to GET) and the
    catch-all ``*`` handlers (JSON 404/405) are not operations. ``expand`` lists the values of a
    path variable whose every value is its own documented path."""
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        path = route.resource.canonical
        if path == "/{tail}":
            continue
        for var, values in (expand or {}).items():
            if "{" + var + "}" in path:
                out.update((route.method, path.replace("{" + var + "}", v)) for v in values)
                break
        else:
            out.add((route.method, path))
    return out


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


DOCS = {
    "sidecar": sidecar_openapi.build("tiny", [TensorSpec("x", "FP32", (-1, 3))], [TensorSpec("y", "FP32", (-1, 3))]),
    "controller": controller_openapi.build(),
    "dashboard": dashboard_openapi.build(),
}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_each_document_is_valid_openapi_3_1(name):
    jsonschema.Draft202012Validator(OPENAPI_31).validate(DOCS[name])
    ids = [op["operationId"] for ops in DOCS[name]["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), "operationIds are unique"


def test_an_invalid_document_is_caught():
    """The validity check can fail: a response without a description is not OpenAPI."""
    doc = controller_openapi.build()
    del doc["paths"]["/healthz"]["get"]["responses"]["200"]["description"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)


def test_the_sidecar_document_names_every_route_it_serves_and_no_other():
    app = build_app(SidecarConfig(model_path="/nonexistent/tiny.onnx"))
    assert registered(app) == documented(DOCS["sidecar"]) == set(sidecar_openapi.OPERATIONS)


def test_the_controller_document_names_every_route_it_serves_and_no_other():
    app = make_app(_controller(), TOKEN, InProcessSink())
    assert registered(app) == documented(DOCS["controller"]) == set(controller_openapi.OPERATIONS)


def test_the_dashboard_document_names_every_route_it_serves_and_no_other():
    dash = Dashboard(_controller(), Recorder(), TOKEN)
    app = dash.make_app()
    assert registered(app, {"verb": tuple(ACTIONS)}) == documented(DOCS["dashboard"])
    assert documented(DOCS["dashboard"]) == set(dashboard_openapi.OPERATIONS)


def test_route_parity_fails_on_an_undocumented_route():
    app = make_app(_controller(), TOKEN, InProcessSink())

    async def handler(request):
        return None

    app.router.add_get("/undocumented", handler)
    assert registered(app) != documented(DOCS["controller"])


def test_the_controller_documents_exactly_the_open_paths_the_api_lets_through():
    from cohortgate.controller.api import OPEN_PATHS

    open_ops = {p for p, ops in DOCS["controller"]["paths"].items() for op in ops.values() if op.get("security") == []}
    assert open_ops == set(OPEN_PATHS) == set(controller_openapi.OPEN)


def test_the_sidecar_document_names_the_served_model_and_its_tensors():
    doc = DOCS["sidecar"]
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["parameters"][0]["schema"]["enum"] == ["tiny"]
    assert doc["components"]["schemas"]["request_input"]["properties"]["name"]["enum"] == ["x"]
    # the generic document (no model) still names the OIP schemas KServe's spec names
    generic = sidecar_openapi.build()
    for schema in ("inference_request", "inference_response", "metadata_model_response", "metadata_server_response"):
        assert schema in generic["components"]["schemas"]


async def test_each_service_serves_its_document(aiohttp_client):
    api = await aiohttp_client(make_app(_controller(), TOKEN, InProcessSink()))
    resp = await api.get("/openapi.json")  # no token: the contract is public
    assert resp.status == 200 and await resp.json() == controller_openapi.build()
    dash = await aiohttp_client(Dashboard(_controller(), Recorder(), TOKEN).make_app())
    resp = await dash.get("/openapi.json")
    assert resp.status == 200 and await resp.json() == dashboard_openapi.build()
    side = await aiohttp_client(build_app(SidecarConfig(model_path="/nonexistent/tiny.onnx")))
    resp = await side.get("/openapi.json")  # before (here: without) a model, the generic tensors
    assert resp.status == 200 and await resp.json() == sidecar_openapi.build("tiny")


def test_docs_link_every_document():
    text = (ROOT / "docs" / "api.md").read_text()
    for module in ("sidecar/openapi.py", "cohortgate/controller/openapi.py", "cohortgate/dashboard/openapi.py"):
        assert module in text
    assert "docs/api.md" in (ROOT / "README.md").read_text()


def test_the_rendered_documents_are_current():
    from tests.contracts.render_docs import OUT, rendered

    for name, text in rendered().items():
        assert (OUT / name).read_text() == text, f"docs/openapi/{name} is stale: python -m tests.contracts.render_docs"
