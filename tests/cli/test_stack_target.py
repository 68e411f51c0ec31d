"""Client commands find their stack one way: flags, else `up`'s run.json (never a stale one), else the
defaults of a stack started by hand. Real TLS and real HTTP on 127.0.0.1 stand in for Envoy and the
controller; the CLI runs through its entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from cohortgate.cli import main
from cohortgate.cli._stack import DEFAULT_API, DEFAULT_TOKEN_FILE, NoStack, controller_target
from cohortgate.deploy import pki

TOKEN = "t0ken-for-tests"

STATUS_DOC = {
    "controller": {"name": "ctl-a", "leader": True, "store": "embedded", "policy_digest": "abc"},
    "routes": {
        "tabular": {
            "status": "active",
            "version": 4,
            "updated_by": "controller",
            "srm": {},
            "variants": {
                "control": {"weight": 100, "enabled": True, "phase": "running", "window": {"requests": 9}},
                "canary": {"weight": 0, "enabled": False, "phase": "rolled_back", "window": {"requests": 3}},
            },
        }
    },
}


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_run(state: Path, *, pid: int, gateway: str, api: str, certs: Path, token_file: Path) -> None:
    paths = pki.load_cert_paths(certs)
    state.mkdir(parents=True, exist_ok=True)
    run = {
        "pid": pid,
        "endpoints": {"gateway": gateway, "controller_api": api},
        "certs": {
            "ca": str(paths.ca_cert),
            "dir": str(paths.dir),
            "clients": {n: {"cert": str(c), "key": str(k)} for n, (c, k) in paths.clients.items()},
        },
        "admin_token_file": str(token_file),
    }
    (state / "run.json").write_text(json.dumps(run))


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return pki.init_certs(tmp_path / "certs").dir


async def controller(aiohttp_server, name: str):
    """A controller API that answers /status for the right token, naming itself in the document."""

    async def status(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthenticated", "message": "bad token"}}, status=401)
        doc = json.loads(json.dumps(STATUS_DOC))
        doc["controller"]["name"] = name
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/status", status)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


def cli(*argv: str) -> int:
    return main(list(argv))


async def test_status_reads_run_json_and_flags_win(aiohttp_server, tmp_path, certs, capsys):
    api_a = await controller(aiohttp_server, "from-run-json")
    api_b = await controller(aiohttp_server, "from-the-flag")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    state = tmp_path / "state"
    write_run(state, pid=os.getpid(), gateway="https://127.0.0.1:1", api=api_a, certs=certs, token_file=token_file)

    assert await asyncio.to_thread(cli, "status", "--state-dir", str(state)) == 0
    out = capsys.readouterr().out
    assert out.startswith("controller from-run-json (leader)")
    assert await asyncio.to_thread(
        cli, "status", "--state-dir", str(state), "--api", api_b, "--token-file", str(token_file)
    ) == 0
    assert capsys.readouterr().out.startswith("controller from-the-flag (leader)")


async def test_status_refuses_a_stale_run_json_instead_of_guessing(aiohttp_server, tmp_path, certs, capsys):
    api = await controller(aiohttp_server, "should-not-be-asked")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    state = tmp_path / "state"
    write_run(state, pid=dead_pid(), gateway="https://127.0.0.1:1", api=api, certs=certs, token_file=token_file)
    for verb in (["status"], ["rollback", "tabular", "canary"], ["promote", "tabular", "canary"], ["resume", "t"]):
        assert await asyncio.to_thread(cli, verb[0], "--state-dir", str(state), *verb[1:]) == 1
        err = capsys.readouterr().err
        assert f"cohortgate {verb[0]}: " in err and "is stale" in err and "--api" in err, err


def test_without_run_json_the_hand_started_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .cohortgate/run.json here
    assert controller_target(argparse.Namespace(state_dir=None, api=None, token_file=None)) == (
        DEFAULT_API,
        DEFAULT_TOKEN_FILE,
    )
    # A --state-dir names an `up` stack: without its run.json that is an error, not the defaults.
    with pytest.raises(NoStack, match=r"run\.json not found: start the stack with cohortgate up --state-dir"):
        controller_target(argparse.Namespace(state_dir=str(tmp_path / "none"), api=None, token_file=None))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "run.json").write_text("{not json")
    with pytest.raises(NoStack, match="not a readable run file"):
        controller_target(argparse.Namespace(state_dir=str(stale), api=None, token_file=None))


async def test_status_explains_its_symbols(aiohttp_server, tmp_path, capsys):
    api = await controller(aiohttp_server, "c")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    base = ["--api", api, "--token-file", str(token_file)]
    assert await asyncio.to_thread(cli, "status", *base) == 0
    out = capsys.readouterr().out
    canary = next(line for line in out.splitlines() if line.strip().startswith("canary"))
    assert "0%x" in canary and "rolled_back" in canary
    assert "x after it: rolled back, its users are on control (0%x)" in out
    assert "p(err), p(lat): always-valid p-values" in out
    assert await asyncio.to_thread(cli, "status", *base, "--no-legend") == 0
    bare = capsys.readouterr().out
    assert "0%x" in bare and "always-valid" not in bare


async def test_call_takes_explicit_endpoints_for_a_stack_started_by_hand(aiohttp_server, tmp_path, certs, capsys):
    """No run.json at all: --gateway and --certs name Envoy (here a TLS server requiring the client cert)."""
    paths = pki.load_cert_paths(certs)
    seen: dict[str, str] = {}

    async def infer(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen["client"] = str(peer.get("subjectAltName")) if peer else ""
        seen["authorization"] = request.headers.get("Authorization", "")
        seen["x-device"] = request.headers.get("x-device", "")
        return web.json_response({"outputs": []}, headers={"x-cohortgate-variant": "canary"})

    app = web.Application()
    app.router.add_post("/v2/models/tabular/infer", infer)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(paths.ca_cert))
    tls.load_cert_chain(str(paths.envoy_cert), str(paths.envoy_key))
    tls.verify_mode = ssl.CERT_REQUIRED
    server = await aiohttp_server(app, host="127.0.0.1", ssl=tls)
    gateway = f"https://127.0.0.1:{server.port}"
    state = tmp_path / "no-stack-here"
    argv = ["call", "tabular", "--state-dir", str(state), "--gateway", gateway, "--certs", str(certs)]
    assert await asyncio.to_thread(cli, *argv, "--header", "x-device:phone") == 0
    out = capsys.readouterr().out
    assert out.startswith("HTTP 200 OK  variant: canary")
    assert "spiffe://cohortgate.local/app-demo" in seen["client"]
    assert seen["authorization"].startswith("Bearer ey") and seen["x-device"] == "phone"

    # Without flags and without run.json, call looks where the README's sequence puts things.
    assert await asyncio.to_thread(cli, "call", "tabular", "--state-dir", str(state), "--certs", str(tmp_path)) == 2
    assert "cohortgate certs init" in capsys.readouterr().err
