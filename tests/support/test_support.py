"""The shared helpers: atomic writes, change detection, durations, loopback HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from aiohttp import web

from cohortgate.support import http
from cohortgate.support.durations import interval_arg, parse_duration
from cohortgate.support.files import FileStamp, changes, write_atomic


def test_write_atomic_replaces_whole_files_with_the_exact_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "secret.key"
    write_atomic(target, b"one", 0o600, dir_mode=0o700)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    write_atomic(target, "two")  # text is written as UTF-8; the default mode is 0644
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["secret.key"]  # no temp file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


async def test_changes_yields_each_edit_and_ignores_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("a")
    seen: list[FileStamp] = []

    async def follow() -> None:
        async for stamp in changes(path, 0.01):
            seen.append(stamp)
            if len(seen) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    path.unlink()  # gone for a moment: not a change
    await asyncio.sleep(0.05)
    assert seen == []
    path.write_text("bb")
    for _ in range(500):
        if seen:
            break
        await asyncio.sleep(0.01)
    path.write_text("ccc")
    await asyncio.wait_for(task, timeout=30)
    assert [s.size for s in seen] == [2, 3]


async def test_changes_with_a_zero_interval_never_polls(tmp_path: Path) -> None:
    assert [s async for s in changes(tmp_path / "x", 0)] == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), ("0.5", 0.5), ("90", 90.0), ("2m", 120.0), ("2h", 7200.0), ("1d", 86400.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_zero_is_an_interval_but_not_a_duration() -> None:
    # `controller --watch-interval 0` means SIGHUP only, as its help says; a TTL of 0 is refused.
    assert interval_arg("0") == 0.0
    with pytest.raises(ValueError, match="positive"):
        parse_duration("0")
    with pytest.raises(argparse.ArgumentTypeError):
        interval_arg("-1s")


async def test_http_call_returns_error_statuses_and_sends_json(aiohttp_server) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"got": body, "auth": request.headers.get("Authorization")}, status=201)

    async def missing(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "no_route"}}, status=404)

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/missing", missing)
    server = await aiohttp_server(app, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    reply = await asyncio.to_thread(http.call, base + "/echo", "POST", body={"a": 1}, headers={"Authorization": "x"})
    assert (reply.status, reply.json()) == (201, {"got": {"a": 1}, "auth": "x"})
    reply = await asyncio.to_thread(http.call, base + "/missing")
    assert reply.status == 404 and json.loads(reply.body)["error"]["code"] == "no_route"


def test_http_call_raises_oserror_when_nothing_listens() -> None:
    with pytest.raises(OSError):
        http.call("http://127.0.0.1:9/", timeout=2)
