"""Live reloads: the pure cluster plan, and the `Reloader` on a real file (Envoy's part is in
tests/integration/test_live_policy.py, against a real Envoy)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.core.policy import Backend, load_policy
from cohortgate.support.files import FileStamp
from gateway.metrics import GatewayMetrics
from gateway.reload import EnvoyClusters, Reloader, cluster_change, union_backends
from gateway.service import PolicyHolder

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"
TEXT = EXAMPLE.read_text()


def backend(name: str, port: int = 80) -> Backend:
    url = f"http://127.0.0.1:{port}"
    return Backend(url=url, scheme="http", host="127.0.0.1", port=port, region="eu", cluster=name)


names = st.frozensets(st.sampled_from([f"c{i}" for i in range(12)]))


@given(names, names)
def test_cluster_change_adds_what_is_new_and_drops_what_is_gone(old, new):
    change = cluster_change([backend(n) for n in old], [backend(n) for n in new])
    assert change.added == new - old and change.removed == old - new
    union = union_backends([backend(n) for n in old], [backend(n) for n in new])
    assert {b.cluster for b in union} == old | new and len(union) == len(old | new)


def test_union_keeps_the_first_backend_of_a_cluster_name():
    a, b = backend("x", 1), backend("x", 2)
    assert union_backends([a], [b]) == (a,)


# ------------------------------------------------------------------------------ the Reloader


@pytest.fixture
def live(tmp_path: Path) -> Path:
    path = tmp_path / "live.yaml"
    path.write_text(TEXT.replace("../certs/jwks.json", str(tmp_path / "jwks.json")))
    return path


def make(live: Path, **kwargs) -> tuple[PolicyHolder, GatewayMetrics, Reloader]:
    holder = PolicyHolder(load_policy(live), live)
    holder.metrics = metrics = GatewayMetrics()
    return holder, metrics, Reloader(holder, **kwargs)


def replace(path: Path, text: str) -> None:
    """What `cohortgate policy apply` does: a sibling file renamed over the live one."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_watch_swaps_a_changed_file_and_ignores_a_touch(live: Path) -> None:
    holder, metrics, reloader = make(live, watch_s=0.05)
    first = holder.policy
    await reloader.start()
    try:
        os.utime(live, ns=(1, 1))  # a new stamp, the same bytes: nothing happens
        await asyncio.sleep(0.2)
        assert holder.policy is first and holder.reloads == 0
        replace(live, live.read_text().replace("weight: 90", "weight: 80").replace("weight: 10\n", "weight: 20\n"))
        for _ in range(40):
            await asyncio.sleep(0.05)
            if holder.policy is not first:
                break
        canary = holder.policy.by_name["tabular"].variants[1]
        assert canary.weight == 20 and holder.reloads == 1
        assert sample(metrics, "cohortgate_policy_reloads_total", result="ok") == 1
        assert sample(metrics, "cohortgate_policy_info", digest=holder.policy.digest[:12]) == 1
    finally:
        await reloader.close()


async def test_sighup_with_an_unchanged_file_changes_nothing(live: Path) -> None:
    holder, _, reloader = make(live, watch_s=0)
    first = holder.policy
    swaps = []
    holder.subscribe(lambda old, new: swaps.append(new))
    assert await reloader.reload("SIGHUP") is False
    assert holder.policy is first and swaps == [] and holder.reloads == holder.reload_failures == 0


async def test_a_bad_file_is_refused_with_one_json_line(live: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder, metrics, reloader = make(live, watch_s=0)
    good = holder.policy
    replace(live, live.read_text().replace("scopes: [predict]", "scopes: 7", 1))
    with caplog.at_level(logging.ERROR, logger="cohortgate.service"):
        assert await reloader.reload("file changed") is False
    assert holder.policy is good and holder.reload_failures == 1
    assert sample(metrics, "cohortgate_policy_reloads_total", result="failed") == 1
    (record,) = [r for r in caplog.records if "policy_reload_failed" in r.getMessage()]
    doc = json.loads(record.getMessage())
    assert doc["reason"] == "invalid" and doc["keeping"] == good.digest[:12] and doc["trigger"] == "file changed"
    assert len(doc["problems"]) == 1 and all(p.startswith(f"{live}:") for p in doc["problems"])
    line, col = doc["problems"][0].split(":")[1:3]
    assert line.isdigit() and col.isdigit()  # FILE:LINE:COL


async def test_envoy_that_does_not_confirm_refuses_the_reload(live: Path, tmp_path: Path) -> None:
    """A new cluster that Envoy never confirms (its admin is down): the old policy and clusters stay."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_admin = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        cds = tmp_path / "cds.yaml"
        envoy = EnvoyClusters(cds, dead_admin)
        holder, metrics, reloader = make(live, watch_s=0, envoy=envoy, confirm_s=0.3)
        good = holder.policy
        await envoy.write(good.backends, good.path)
        before = cds.read_text()
        line = '          - {url: "http://127.0.0.1:18103", region: eu, model: ../models/tabular-canary.onnx}\n'
        assert line in live.read_text()
        replace(live, live.read_text().replace(line, line + line.replace("18103", "18199").replace("eu", "ae")))
        assert await reloader.reload("file changed") is False
        assert holder.policy is good and sample(metrics, "cohortgate_policy_reloads_total", result="failed") == 1
        assert cds.read_text() == before  # the union was written, then taken back
        await reloader.close()


def test_file_stamp_changes_on_rename(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("a")
    first = FileStamp.of(path)
    replace(path, "a")
    assert FileStamp.of(path) != first and FileStamp.of(tmp_path / "missing") is None


# ------------------------------------------------------------------------------ rendering clusters fast

SHAPES = [
    ("r1-control", "http", "127.0.0.1", 8080, None, False),
    ("r2.canary_x", "https", "api.example.com", 443, None, True),
    ("c3", "https", "10.0.0.1", 8443, "/etc/ssl/ca.pem", False),
    ("true", "http", "::1", 1, None, False),  # a YAML boolean: PyYAML quotes it
    ("odd name:x", "https", "1.5", 443, None, False),  # not plain YAML at all
    ("c4", "http", "localhost", 54321, None, True),  # the placeholder port itself
]


@pytest.mark.parametrize("key", SHAPES, ids=[k[0] for k in SHAPES])
def test_filled_cluster_shapes_equal_the_typed_build(key: tuple) -> None:
    """A live reload renders clusters from a cached shape (~0.05 ms each, not ~25 ms of GIL each);
    the result is exactly the typed build's: resource, fingerprint and YAML item."""
    from cohortgate.deploy.envoy import clusters
    from cohortgate.deploy.envoy.typed import dump_item

    reference = clusters._typed_resource(*key)
    assert clusters._cluster_resource(*key) == reference
    assert list(clusters._cluster_resource(*key)) == list(reference)  # key order too (Istio dumps it)
    fingerprint, item = clusters._cluster_text(key)
    assert fingerprint == json.dumps(reference, sort_keys=True)
    assert item == dump_item(reference)


# ------------------------------------------------------------------------------ the confirmation limit


class SlowWrite(EnvoyClusters):
    """The first write (the union) takes ``delay_s``, like the old cold render of 2 000 clusters."""

    def __init__(self, *args, delay_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.writes = 0

    async def write(self, backends, source):  # type: ignore[override]
        self.writes += 1
        if self.writes == 2:  # the first is the test's own initial write
            await asyncio.sleep(self.delay_s)
        return await super().write(backends, source)


async def fake_envoy_admin(cds: Path, warming: int = 0) -> tuple[web.AppRunner, str]:
    """An admin that has always loaded the file just written and lists its clusters (an instant Envoy);
    ``warming`` clusters never finish warming."""
    import yaml

    from cohortgate.deploy.envoy import written_version

    async def stats(_request: web.Request) -> web.Response:
        assert _request.query["type"] == "TextReadouts"  # Envoy walks only those: cheap with 2 000 clusters
        assert "version_text" in _request.query["filter"]
        return web.Response(text=f'cluster_manager.cds.version_text: "{written_version(cds)}"\n')

    async def config_dump(_request: web.Request) -> web.Response:
        assert _request.query["resource"] == "dynamic_warming_clusters"
        return web.json_response({"configs": [{"name": f"w{i}"} for i in range(warming)]} if warming else {})

    async def clusters(_request: web.Request) -> web.Response:
        doc = yaml.safe_load(cds.read_text())
        return web.json_response({"cluster_statuses": [{"name": r["name"]} for r in doc["resources"]]})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_get("/config_dump", config_dump)
    app.router.add_get("/clusters", clusters)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def add_a_cluster(live: Path) -> None:
    line = '          - {url: "http://127.0.0.1:18103", region: eu, model: ../models/tabular-canary.onnx}\n'
    assert line in live.read_text()
    replace(live, live.read_text().replace(line, line + line.replace("18103", "18199").replace("eu", "ae")))


@pytest.mark.parametrize("delay_s", [0.0, 0.6])
async def test_the_confirmation_limit_counts_the_write_too(live: Path, tmp_path: Path, delay_s: float) -> None:
    """docs: a reload not confirmed within ``confirm_s`` is refused. The limit starts before the
    clusters are written (a 2 000-cluster render once took 14 s, "confirmed" after the 5 s limit)."""
    cds = tmp_path / "cds.yaml"
    runner, admin = await fake_envoy_admin(cds)
    envoy = SlowWrite(cds, admin, delay_s=delay_s)
    holder, metrics, reloader = make(live, watch_s=0, envoy=envoy, confirm_s=0.3)
    good = holder.policy
    try:
        await envoy.write(good.backends, good.path)
        before = cds.read_text()
        add_a_cluster(live)
        applied = await reloader.reload("file changed")
        if delay_s == 0:  # an instant Envoy confirms well within the limit
            assert applied and holder.policy is not good
        else:
            assert not applied and holder.policy is good
            assert sample(metrics, "cohortgate_policy_reloads_total", result="failed") == 1
            assert cds.read_text() == before
    finally:
        await reloader.close()
        await runner.cleanup()


async def test_loop_lag_sees_a_blocked_event_loop() -> None:
    """The probe that measures a reload's cost to requests: a 0.2 s block shows as >= 0.15 s of lag."""
    from gateway.reload import LoopLag

    lag = LoopLag()
    probe = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # what a compile on the loop (or a thread holding the GIL) does to every request
    await asyncio.sleep(0.05)
    probe.cancel()
    assert lag.max_s >= 0.15


async def test_a_reload_reports_its_loop_lag(live: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, reloader = make(live, watch_s=0)
    replace(live, live.read_text().replace("weight: 90", "weight: 80").replace("weight: 10\n", "weight: 20\n"))
    with caplog.at_level(logging.INFO, logger="cohortgate.reload"):
        assert await reloader.reload("file changed")
    assert any("event loop lag at most" in r.getMessage() for r in caplog.records)
    assert reloader.last_loop_lag_s >= 0


def test_cluster_change_names_a_moved_endpoint_as_changed():
    change = cluster_change([backend("x", 1), backend("y", 1)], [backend("x", 2), backend("y", 1)])
    assert change.changed == {"x"} and not change.added and not change.removed


async def test_a_moved_backend_reaches_envoy_under_its_cluster_name(live: Path, tmp_path: Path) -> None:
    """Same route, variant and index (so the same cluster name), another URL: Envoy must get the new
    endpoint before the policy swaps (it used to keep the old one: only new names were written)."""
    cds = tmp_path / "cds.yaml"
    runner, admin = await fake_envoy_admin(cds)
    envoy = EnvoyClusters(cds, admin)
    holder, _, reloader = make(live, watch_s=0, envoy=envoy, confirm_s=30)
    good = holder.policy
    try:
        await envoy.write(good.backends, good.path)
        assert "port_value: 18103" in cds.read_text()
        replace(live, live.read_text().replace("http://127.0.0.1:18103", "http://127.0.0.1:18199"))
        assert await reloader.reload("file changed")
        assert holder.policy is not good
        assert "port_value: 18199" in cds.read_text() and "port_value: 18103" not in cds.read_text()
    finally:
        await reloader.close()
        await runner.cleanup()


def test_the_confirmation_limit_grows_with_the_clusters_envoy_must_apply():
    from gateway.reload import confirm_limit

    assert confirm_limit(5.0, 0) == 5.0
    assert confirm_limit(5.0, 3) < 5.1  # a small policy: still ~5 s
    assert confirm_limit(5.0, 4002) == pytest.approx(25.01)  # a 1 000-route replacement's union file


async def test_a_warming_cluster_is_not_confirmed(live: Path, tmp_path: Path) -> None:
    """Envoy accepted the file but a cluster is still warming (e.g. a DNS name not resolved yet): not active."""
    cds = tmp_path / "cds.yaml"
    runner, admin = await fake_envoy_admin(cds, warming=1)
    envoy = EnvoyClusters(cds, admin)
    holder, _, reloader = make(live, watch_s=0, envoy=envoy, confirm_s=0.3)
    good = holder.policy
    try:
        await envoy.write(good.backends, good.path)
        add_a_cluster(live)
        assert not await reloader.reload("file changed")
        assert holder.policy is good
    finally:
        await reloader.close()
        await runner.cleanup()


async def test_a_model_file_replaced_in_place_gets_its_new_digest_without_a_policy_edit(live: Path) -> None:
    """The decision's audit line records the routed model's digest (docs/models.md, provenance): a model
    file swapped under an unchanged policy text must not leave the old digest serving."""
    model = live.parent / "control.onnx"
    model.write_bytes(b"model one")
    text = live.read_text()
    assert "../models/tabular-control.onnx" in text
    live.write_text(text.replace("../models/tabular-control.onnx", str(model), 1))
    holder, _, reloader = make(live, watch_s=0.05)
    cluster = next(c for c, _ in holder.policy.model_digests.items() if c.startswith("cg.tabular.control."))
    first = holder.policy.model_digests[cluster]
    assert first == "sha256:" + hashlib.sha256(b"model one").hexdigest()
    await reloader.start()
    try:
        replace_model = model.with_name(".tmp-control.onnx")
        replace_model.write_bytes(b"model two")
        os.replace(replace_model, model)
        for _ in range(200):  # MODEL_WATCH_S is 1 s; up to 20 s on a loaded machine
            await asyncio.sleep(0.1)
            if holder.policy.model_digests.get(cluster) != first:
                break
        assert holder.policy.model_digests[cluster] == "sha256:" + hashlib.sha256(b"model two").hexdigest()
        assert holder.policy.digest == load_policy(live).digest  # the policy's text did not change
    finally:
        await reloader.close()
