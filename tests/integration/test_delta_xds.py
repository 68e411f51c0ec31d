"""Delta CDS through a real Envoy: the gateway serves the policy's clusters over gRPC (``--envoy-xds``).

One gateway and one Envoy for the module, rendered as `cohortgate up` wires them (the bootstrap's
``cds_config`` is DELTA_GRPC to the gateway's socket). In order: a policy edit reaches Envoy through
delta xDS (the new route answers 200, and the CDS file is never rewritten); a removed route's cluster
leaves Envoy; a cluster Envoy refuses (NACK) keeps the old policy serving and the gateway says why;
a gateway killed and restarted on an edited policy brings Envoy to the new full set.

Timeouts are generous bounds for "this eventually happens" on a busy 2-core CI machine, not speed
claims (bench/bench_reload.py measures).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cohortgate.core.contract import XDS_CLUSTER, xds_socket
from cohortgate.deploy import pki
from tests.integration.conftest import (
    GATEWAY_START_S,
    POLICY,
    Client,
    GatewayProcess,
    Upstream,
    free_port,
    mint,
)

pytestmark = pytest.mark.integration

WAIT_S = 60.0  # Envoy reconnects with a backoff (0.5 s doubling, jittered); a busy machine starts slowly

EXTRA = """  - name: {name}
    match: {{path_prefix: /v2/models/{name}}}
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "{url}", region: eu}}
"""


@dataclass
class Plane:
    gateway: GatewayProcess
    envoy: Any
    client: Client
    live: Path
    base: str  # the conftest policy, filled in
    cds: Path
    work: Path

    def apply(self, *extra: tuple[str, str]) -> None:
        """The base policy plus routes (name, url), renamed over the live file as `policy apply` does."""
        text = self.base + "".join(EXTRA.format(name=n, url=u) for n, u in extra)
        tmp = self.live.with_name(".edit.yaml")
        tmp.write_text(text)
        os.replace(tmp, self.live)


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, upstreams: dict[str, Upstream]
) -> Iterator[Plane]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    work = tmp_path_factory.mktemp("delta-xds")
    base = POLICY.format(jwks=certs.jwks, **{name: u.url for name, u in upstreams.items()})
    live = work / "live.yaml"
    live.write_text(base)
    sock = work / "run" / "processor.sock"
    xds = xds_socket(str(sock))
    garbage_ca = work / "not-a-ca.pem"  # what https backends are verified against: Envoy refuses it (the NACK test)
    garbage_ca.write_text("this is not a certificate\n")
    admin_port = free_port()
    gateway = GatewayProcess(live, sock, "grpc", work)
    gateway.cmd += ["--envoy-xds", xds, "--envoy-admin", f"http://127.0.0.1:{admin_port}"]  # admin: DNS warming
    gateway.cmd += ["--watch-interval", "0.2", "--reload-grace", "0.5", "--no-audit"]
    gateway.cmd.remove("--audit-log")
    gateway.cmd.remove(str(work / "audit.jsonl"))
    os.environ["SSL_CERT_FILE"] = str(garbage_ca)  # the gateway child inherits it (default_upstream_ca)
    try:
        gateway.start(timeout=GATEWAY_START_S)
    finally:
        del os.environ["SSL_CERT_FILE"]
    files = render(
        load_policy(live),
        certs=certs,
        out_dir=work / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        listen_port=free_port(),
        admin_port=admin_port,
        xds_socket=xds,
    )
    try:
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            cert, key = certs.clients["app-demo"]
            client = Client(envoy.listen_port, certs.ca_cert, cert, key)
            try:
                yield Plane(gateway, envoy, client, live, base, files.cds, work)
            finally:
                client.close()
    finally:
        gateway.stop()


def _answers(plane: Plane, model: str, token: str) -> str:
    reply = plane.client.request(f"/v2/models/{model}/infer", token=token)
    return reply.headers.get("x-upstream", str(reply.status)) if reply.status == 200 else str(reply.status)


def test_bootstrap_takes_clusters_from_the_gateway(plane: Plane) -> None:
    socket_path = plane.work / "run" / "processor.sock.xds"
    assert socket_path.is_socket() and socket_path.stat().st_mode & 0o777 == 0o600  # only our user hands Envoy clusters
    status, body = plane.envoy.admin_get("/config_dump?resource=dynamic_active_clusters")
    assert status == 200
    assert "cg.tabular.control.0" in body.decode()
    status, body = plane.envoy.admin_get("/config_dump?include_eds=false")
    doc = json.loads(body)
    bootstrap = next(c for c in doc["configs"] if c["@type"].endswith("BootstrapConfigDump"))["bootstrap"]
    cds = bootstrap["dynamic_resources"]["cds_config"]["api_config_source"]
    assert cds["api_type"] == "DELTA_GRPC"
    assert cds["grpc_services"][0]["envoy_grpc"]["cluster_name"] == XDS_CLUSTER


def test_policy_edit_reaches_envoy_through_delta_xds(plane: Plane, certs: pki.CertPaths, upstreams: dict) -> None:
    token = mint(certs, "xds-user")
    cds_before = plane.cds.read_bytes()
    assert _answers(plane, "fresh", token) == "404"
    plane.apply(("fresh", upstreams["canary-eu"].url))
    _wait(lambda: _answers(plane, "fresh", token) == "canary-eu", WAIT_S, "the new route served")
    assert "cg.fresh.control.0" in plane.envoy.clusters()
    assert plane.cds.read_bytes() == cds_before, "the CDS file was rewritten: the edit did not go through xDS"
    assert "Envoy confirmed 1 new" in plane.gateway.tail()


def test_a_dns_backend_is_served_once_the_policy_names_it(plane: Plane, certs: pki.CertPaths, upstreams: dict) -> None:
    """A host name: Envoy resolves it after the ACK (warming); the gateway waits for that through admin,
    so the first request after the swap already reaches the backend."""
    token = mint(certs, "xds-user")
    port = upstreams["canary-eu"].server.server_address[1]
    offset = plane.gateway.log_path.stat().st_size
    plane.apply(("named", f"http://localhost:{port}"))
    _wait(lambda: "policy reloaded" in plane.gateway.tail(offset), WAIT_S, "the edit swapped in")
    assert _answers(plane, "named", token) == "canary-eu"


def test_removed_cluster_leaves_envoy(plane: Plane, certs: pki.CertPaths, upstreams: dict) -> None:
    token = mint(certs, "xds-user")
    plane.apply(("gone", upstreams["canary-eu"].url))
    _wait(lambda: _answers(plane, "gone", token) == "canary-eu", WAIT_S, "the route to remove served")
    plane.apply()
    _wait(lambda: "cg.gone.control.0" not in plane.envoy.clusters(), WAIT_S, "the removed cluster gone from Envoy")
    assert _answers(plane, "gone", token) == "404"
    assert _answers(plane, "tabular", token) in {"control-eu", "canary-eu"}


def test_cluster_envoy_refuses_keeps_the_old_policy(plane: Plane, certs: pki.CertPaths, upstreams: dict) -> None:
    """An https backend verified against a CA file Envoy cannot load: Envoy NACKs the cluster."""
    token = mint(certs, "xds-user")
    plane.apply(("kept", upstreams["canary-eu"].url))
    _wait(lambda: _answers(plane, "kept", token) == "canary-eu", WAIT_S, "the serving policy")
    offset = plane.gateway.log_path.stat().st_size
    plane.apply(("kept", upstreams["canary-eu"].url), ("refused", "https://127.0.0.1:9"))
    _wait(lambda: "policy_reload_failed" in plane.gateway.tail(offset), WAIT_S, "the reload refused")
    line = next(ln for ln in plane.gateway.tail(offset).splitlines() if "policy_reload_failed" in ln)
    doc = json.loads(line[line.index("{") :])
    assert doc["reason"] == "envoy"
    assert "rejected" in json.dumps(doc) and "cg.refused.control.0" in json.dumps(doc), doc
    assert _answers(plane, "kept", token) == "canary-eu"  # the old policy serves
    assert _answers(plane, "refused", token) == "404"
    _wait(lambda: "cg.refused.control.0" not in plane.envoy.clusters(), WAIT_S, "the refused cluster not in Envoy")
    # the next good edit goes through
    plane.apply(("kept", upstreams["canary-eu"].url), ("after", upstreams["canary-eu"].url))
    _wait(lambda: _answers(plane, "after", token) == "canary-eu", WAIT_S, "a good edit after the NACK")


def test_restarted_gateway_brings_envoy_to_the_full_set(plane: Plane, certs: pki.CertPaths, upstreams: dict) -> None:
    token = mint(certs, "xds-user")
    plane.apply(("before", upstreams["canary-eu"].url))
    _wait(lambda: _answers(plane, "before", token) == "canary-eu", WAIT_S, "the serving policy")
    plane.gateway.kill()
    plane.apply(("restarted", upstreams["control-eu"].url))  # edited while the gateway is down
    plane.gateway.start(timeout=GATEWAY_START_S)
    _wait(lambda: _answers(plane, "restarted", token) == "control-eu", WAIT_S, "the new route after the restart")
    _wait(lambda: "cg.before.control.0" not in plane.envoy.clusters(), WAIT_S, "the dropped cluster removed")
    assert "cg.tabular.control.0" in plane.envoy.clusters()
    assert _answers(plane, "tabular", token) in {"control-eu", "canary-eu"}


def test_with_workers_the_parent_serves_delta_cds(
    tmp_path: Path, certs: pki.CertPaths, upstreams: dict[str, Upstream]
) -> None:
    """``--workers 2``: the parent compiles, hands Envoy the clusters and waits for the ACK; the workers
    follow its serving copy, so a new route answers from whichever worker Envoy asks."""
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    base = POLICY.format(jwks=certs.jwks, **{name: u.url for name, u in upstreams.items()})
    live = tmp_path / "live.yaml"
    live.write_text(base)
    sock = tmp_path / "run" / "processor.sock"
    gateway = GatewayProcess(live, sock, "fast", tmp_path)
    gateway.cmd += ["--workers", "2", "--envoy-xds", xds_socket(str(sock)), "--watch-interval", "0.2"]
    try:
        gateway.start(timeout=180.0)
        files = render(
            load_policy(live),
            certs=certs,
            out_dir=tmp_path / "envoy",
            processor=ProcessorAddress(uds=str(sock), workers=2),
            listen_port=free_port(),
            admin_port=free_port(),
            xds_socket=xds_socket(str(sock)),
        )
        with EnvoyProcess(files, log_path=tmp_path / "envoy.log", concurrency=2) as envoy:
            cert, key = certs.clients["app-demo"]
            plane = Plane(
                gateway, envoy, Client(envoy.listen_port, certs.ca_cert, cert, key), live, base, files.cds, tmp_path
            )
            token = mint(certs, "xds-user")
            try:
                assert _answers(plane, "tabular", token) in {"control-eu", "canary-eu"}
                plane.apply(("fresh", upstreams["canary-eu"].url))
                _wait(lambda: _answers(plane, "fresh", token) == "canary-eu", WAIT_S, "the new route served")
                assert all(_answers(plane, "fresh", token) == "canary-eu" for _ in range(10))  # any worker
                assert "Envoy confirmed 1 new" in gateway.tail()
            finally:
                plane.client.close()
    finally:
        gateway.stop()
