"""The sidecar joins online features into the model's input (issue 22), against a real redis-server holding
the bytes Feast itself wrote (``fixtures/feast_redis.json``, re-stamped to now), with real onnxruntime.

The models are Identity graphs, so the answer shows exactly what the model was given: the client's two
columns followed by the joined ones (clicks_7d, ctr_7d, age_days, embedding[2]), or -- on a miss -- the
fallback model's answer on the client's own columns, or the declared defaults joined instead. Every
fallback is answered in ``x-cohortgate-features``, counted on ``/metrics`` by reason and reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from onnx import TensorProto, helper

from cohortgate.core.contract import HEADER_ENTITY, HEADER_FEATURES
from sidecar.cli import _features
from sidecar.features import FeatureSpec
from sidecar.join import JoinSettings
from sidecar.report import MemorySink
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.test_features import FIXTURE

VIEWS = tuple(FIXTURE["features"])  # user_stats:clicks_7d, user_stats:ctr_7d, user_profile:age_days, :embedding
JOINED_1001 = [12.0, 0.25, 400.0, 0.1, 0.2]  # what Feast's get_online_features answered for user 1001
STALE_USER = 1005  # its user_stats row is re-stamped two days old


def identity(path: Path, columns: int) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", columns])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], path.stem, [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("join-models")
    return {"personal": identity(out / "personal.onnx", 7), "global": identity(out / "global.onnx", 2)}


def stamp(seconds_ago: float) -> bytes:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() - seconds_ago) * 1e9))
    return ts.SerializeToString()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server holding Feast's hashes, event times moved to a minute ago (the stale user's stats: 2 days)."""
    import redis

    from sidecar.features import entity_key
    from tests.controller.conftest import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("join-redis")).start()
    stale_key = entity_key(["user_id"], [STALE_USER], FIXTURE["project"])
    try:
        r = redis.Redis.from_url(server.url)
        for key, fields in FIXTURE["hashes"].items():
            raw_key = bytes.fromhex(key)
            mapping = {bytes.fromhex(f): bytes.fromhex(v) for f, v in fields.items()}
            for name in mapping:
                if name.startswith(b"_ts:"):
                    old = raw_key == stale_key and name == b"_ts:user_stats"
                    mapping[name] = stamp(2 * 86_400 if old else 60)
            r.hset(raw_key, mapping=mapping)
        r.close()
        yield server.url
    finally:
        server.stop()


def settings(store: str, *, fallback: str | None = None, budget_ms: float = 10_000.0, **kw: Any) -> JoinSettings:
    # A generous budget: a busy 2-core CI box must not turn a read into over_budget.
    spec = FeatureSpec(FIXTURE["project"], FIXTURE["join_key"], VIEWS, budget_ms=budget_ms, max_age_s=3600.0)
    return JoinSettings(spec, store, "int64", fallback_model=fallback, **kw)


async def start(aiohttp_client, model: str, features: JoinSettings, sink: MemorySink | None = None):
    config = SidecarConfig(model_path=model, name="shop", variant="personal", intra_op_threads=1, features=features)
    app = build_app(config, report_sink=sink)
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    return client


async def infer(client, entity: str | None, rows: list[list[float]]) -> tuple[str, list[float]]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(rows), len(rows[0])], "data": rows}]}
    headers = {HEADER_ENTITY: entity} if entity is not None else {}
    response = await client.post("/v2/models/shop/infer", json=body, headers=headers)
    doc = await response.json()
    assert response.status == 200, doc
    return response.headers[HEADER_FEATURES], doc["outputs"][0]["data"]


def approx(values: list[float]) -> Any:
    return pytest.approx(values, rel=1e-6)


@pytest.mark.integration
async def test_joined_features_extend_every_row_and_misses_go_to_the_fallback_model(
    aiohttp_client, models: dict[str, str], store: str
) -> None:
    sink = MemorySink()
    client = await start(aiohttp_client, models["personal"], settings(store, fallback=models["global"]), sink)

    label, out = await infer(client, "1001", [[1.0, 2.0], [3.0, 4.0]])
    assert label == "joined"
    assert out == approx([1.0, 2.0, *JOINED_1001, 3.0, 4.0, *JOINED_1001])

    # user 1004 has no profile values (Feast's null), 9999 no row, 1005's stats are two days old
    for entity, reason in (("1004", "missing"), ("9999", "missing"), (str(STALE_USER), "stale"),
                           (None, "no_entity"), ("not-a-number", "no_entity")):  # fmt: skip
        label, out = await infer(client, entity, [[5.0, 6.0]])
        assert (label, out) == (f"fallback:{reason}", approx([5.0, 6.0])), entity  # the global model's answer

    metrics = await (await client.get("/metrics")).text()
    assert 'cohortgate_sidecar_feature_joins_total{model="shop"} 1.0' in metrics
    for reason, n in (("missing", 2), ("stale", 1), ("no_entity", 2), ("over_budget", 0), ("unavailable", 0)):
        assert f'cohortgate_sidecar_feature_fallbacks_total{{model="shop",reason="{reason}"}} {n}.0' in metrics
    assert 'cohortgate_sidecar_feature_age_seconds_bucket{le="300.0",model="shop"} 1.0' in metrics

    reporter = client.app[SIDECAR].reporter
    await reporter.close()
    assert [r.fallback for r in sink.reports] == ["", "missing", "missing", "stale", "no_entity", "no_entity"]
    assert {r.variant for r in sink.reports} == {"personal"}


@pytest.mark.integration
async def test_defaults_are_joined_instead_when_the_row_is_missing(
    aiohttp_client, models: dict[str, str], store: str
) -> None:
    defaults = ((0.0,), (0.5,), (1.0,), (7.0, 8.0))
    client = await start(aiohttp_client, models["personal"], settings(store, defaults=defaults))
    assert await infer(client, "1001", [[1.0, 2.0]]) == ("joined", approx([1.0, 2.0, *JOINED_1001]))
    assert await infer(client, "9999", [[1.0, 2.0]]) == ("fallback:missing", approx([1.0, 2.0, 0, 0.5, 1, 7, 8]))


@pytest.mark.integration
async def test_a_client_sends_the_input_without_the_joined_columns(
    aiohttp_client, models: dict[str, str], store: str
) -> None:
    client = await start(aiohttp_client, models["personal"], settings(store, fallback=models["global"]))
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 7], "data": [[0.0] * 7]}]}
    response = await client.post("/v2/models/shop/infer", json=body, headers={HEADER_ENTITY: "1001"})
    assert response.status == 400
    assert "expected shape [-1,2], got [1,7]" in (await response.json())["error"]


@pytest.mark.integration
async def test_a_paused_store_is_over_budget_and_a_closed_one_unavailable(
    aiohttp_client, models: dict[str, str], store: str, unused_tcp_port: int
) -> None:
    import redis.asyncio as redis

    client = await start(aiohttp_client, models["personal"], settings(store, fallback=models["global"], budget_ms=300))
    admin = redis.Redis.from_url(store)
    await admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")  # the server answers nobody for 5 s
    try:  # answered by the fallback inside the pause: the request does not wait for the store
        label, out = await asyncio.wait_for(infer(client, "1001", [[1.0, 2.0]]), timeout=4.5)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    assert (label, out) == ("fallback:over_budget", approx([1.0, 2.0]))

    closed = await start(
        aiohttp_client,
        models["personal"],
        settings(f"redis://127.0.0.1:{unused_tcp_port}/0", fallback=models["global"]),
    )
    assert await infer(closed, "1001", [[1.0, 2.0]]) == ("fallback:unavailable", approx([1.0, 2.0]))


@pytest.mark.integration
async def test_a_fallback_model_that_does_not_fit_keeps_the_sidecar_unready(
    aiohttp_client, models: dict[str, str], store: str
) -> None:
    config = SidecarConfig(
        model_path=models["global"],
        name="shop",
        intra_op_threads=1,
        features=settings(store, fallback=models["global"]),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    with pytest.raises(Exception, match="fewer columns"):
        await app[SIDECAR].wait_ready()
    response = await client.get("/v2/health/ready")
    assert response.status == 503 and "fewer columns" in (await response.json())["error"]


POLICY = """
version: 1
jwt: {{issuer: iss, audience: aud, jwks: jwks.json}}
routes:
  - name: shop
    match: {{model: shop}}
    residency: {{default_region: eu}}
    variants:
      - {{name: control, weight: 50, backends: [{{url: "http://127.0.0.1:1", region: eu}}]}}
      - {{name: personal, weight: 50, backends: [{{url: "http://127.0.0.1:2", region: eu}}]}}
    features:
      store: {store}
      project: cgdemo
      join_key: user_id
      entity: {{claim: sub}}
      entity_type: int64
      views: [user_stats:clicks_7d, user_stats:ctr_7d, user_profile:age_days, user_profile:embedding]
      fallback: {{model: global.onnx}}
      variants: [personal]
"""


def test_the_sidecar_reads_its_join_from_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(store="redis://127.0.0.1:6379/0"))
    joined = _features(str(path), "shop", "personal")
    assert joined is not None
    assert joined.spec.views == VIEWS and joined.entity_type == "int64"
    assert joined.fallback_model == str(tmp_path / "global.onnx")
    assert _features(str(path), "shop", "control") is None  # not in features.variants: serves as it is
    with pytest.raises(ValueError, match="'nope' is not a route"):
        _features(str(path), "nope", "personal")
    with pytest.raises(ValueError, match="go together"):
        _features(str(path), None, "personal")


@pytest.mark.integration
@pytest.mark.parametrize("fallback", ["model", "defaults"])
async def test_metadata_says_what_a_client_sends_not_what_the_model_takes(
    aiohttp_client, models: dict[str, str], store: str, fallback: str
) -> None:
    """The primary takes [-1, 7]; a client sends [-1, 2] and the sidecar joins 5: metadata, the model
    configuration and the OpenAPI document describe the client's input, and following them is served."""
    from sidecar.openapi import OPENAPI_PATH

    kw: dict[str, Any] = (
        {"fallback": models["global"]} if fallback == "model" else {"defaults": ((0.0,), (0.5,), (1.0,), (7.0, 8.0))}
    )
    client = await start(aiohttp_client, models["personal"], settings(store, **kw))
    meta = await (await client.get("/v2/models/shop")).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 7]}]  # the model's own answer
    assert meta["parameters"]["features"] == {"input": "x", "joined_columns": 5, "views": list(VIEWS)}
    assert (await (await client.get("/v2/models/shop/versions/1")).json())["inputs"] == meta["inputs"]

    config = await (await client.get("/v2/models/shop/config")).json()
    assert [(t["name"], t["dims"]) for t in config["input"]] == [("x", [2])]

    doc = await (await client.get(OPENAPI_PATH)).json()
    assert doc["components"]["schemas"]["request_input"]["properties"]["name"]["enum"] == ["x"]

    (tensor,) = meta["inputs"]  # what a client builds from the metadata is served, joined
    body = {"inputs": [{"name": tensor["name"], "datatype": tensor["datatype"], "shape": [1, 2], "data": [1.0, 2.0]}]}
    response = await client.post("/v2/models/shop/infer", json=body, headers={HEADER_ENTITY: "1001"})
    assert response.status == 200 and response.headers[HEADER_FEATURES] == "joined"
    assert (await response.json())["outputs"][0]["data"] == approx([1.0, 2.0, *JOINED_1001])
