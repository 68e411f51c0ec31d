"""The assembled gateway service on the fast server (``grpc_server="fast"``): a private Unix socket,
mTLS over TCP, the audit trail, and a drain on close. Real sockets and certificates, no Envoy (the
data-plane suite in tests/integration runs it behind a real one)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from pathlib import Path

import grpc
import orjson
import pytest

from cohortgate.deploy import pki
from gateway.h2 import FastServer
from gateway.service import Gateway, ListenAddress
from tests.gateway.test_extproc import POLICY, infer, request
from tests.gateway.test_gateway_transports import _cluster, _config, _grpc_call, _token


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("h2service") / "certs", clients=())


@pytest.fixture
def policy_file(tmp_path: Path, certs: pki.CertPaths) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(jwks=certs.jwks, response_headers="true"))
    return path


async def test_fast_service_answers_on_a_private_unix_socket(
    tmp_path: Path, policy_file: Path, certs: pki.CertPaths
) -> None:
    gateway = Gateway(_config(tmp_path, policy_file, "grpc", grpc_server="fast"))
    await gateway.start()
    uds = gateway.config.listen.uds
    assert uds is not None
    try:
        assert isinstance(gateway._server, FastServer)
        assert stat.S_IMODE(os.stat(uds).st_mode) == 0o600
        resp = await _grpc_call(f"unix:{uds}", request(infer(_token(certs))))
        assert _cluster(resp).startswith("cg.tabular.")
        denied = await _grpc_call(f"unix:{uds}", request(infer("Bearer not.a.jwt")))
        assert denied.immediate_response.status.code == 401
    finally:
        await gateway.close()
    assert not os.path.exists(uds)
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["outcome"] for line in lines] == ["allow", "deny"]


async def test_fast_service_over_tcp_requires_a_client_certificate(
    tmp_path: Path, policy_file: Path, certs: pki.CertPaths, unused_tcp_port: int
) -> None:
    config = _config(tmp_path, policy_file, "grpc", grpc_server="fast", certs_dir=str(certs.dir))
    config = dataclasses.replace(config, listen=ListenAddress(host="127.0.0.1", port=unused_tcp_port))
    gateway = Gateway(config)
    await gateway.start()
    target = f"127.0.0.1:{unused_tcp_port}"
    req = request(infer(_token(certs)))
    ca = certs.ca_cert.read_bytes()
    try:
        good = grpc.ssl_channel_credentials(
            ca, certs.envoy_client_key.read_bytes(), certs.envoy_client_cert.read_bytes()
        )
        assert _cluster(await _grpc_call(target, req, good)).startswith("cg.tabular.")
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(_grpc_call(target, req, grpc.ssl_channel_credentials(ca)), 5)
    finally:
        await gateway.close()
