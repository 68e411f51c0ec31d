"""The shared helpers: atomic writes, change detection, durations, loopback HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from aiohttp import web

from cohortgate.core.contract import POLL_FILES_ENV
from cohortgate.support import http
from cohortgate.support.durations import interval_arg, parse_duration
from cohortgate.support.files import FileStamp, changes, watch, write_atomic


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


@pytest.fixture(params=["events", "polling"])
def watch_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every watch test runs on OS events (watchfiles) and on the polling fallback."""
    if request.param == "polling":
        monkeypatch.setenv(POLL_FILES_ENV, "1")
    else:
        monkeypatch.delenv(POLL_FILES_ENV, raising=False)
    return str(request.param)


async def _next_stamp(gen: object, timeout_s: float = 30) -> FileStamp:
    return await asyncio.wait_for(gen.__anext__(), timeout=timeout_s)  # type: ignore[attr-defined]


async def test_changes_follows_atomic_rename_over_writes(tmp_path: Path, watch_mode: str) -> None:
    """write_atomic replaces the inode each time: the watch must survive every rename-over, and the
    temp files next to it are not changes of the file."""
    path = tmp_path / "policy.yaml"
    write_atomic(path, "a")
    gen = changes(path, 0.05)
    follower = asyncio.ensure_future(_next_stamp(gen))
    await asyncio.sleep(0.2)  # the watch is in place
    for size in (2, 3, 4):
        write_atomic(path, "x" * size)
        stamp = await follower if size == 2 else await _next_stamp(gen)
        assert stamp.size == size
        assert stamp == FileStamp.of(path)
    write_atomic(tmp_path / "other.yaml", "zzzzz")  # a neighbour: nothing
    with pytest.raises(TimeoutError):
        await _next_stamp(gen, 0.3)
    await gen.aclose()


async def test_changes_waits_for_a_missing_file_to_appear(tmp_path: Path, watch_mode: str) -> None:
    path = tmp_path / "later.yaml"
    gen = changes(path, 0.05)
    follower = asyncio.ensure_future(_next_stamp(gen))
    await asyncio.sleep(0.2)
    assert not follower.done()  # missing is not a change
    write_atomic(path, "hello")
    assert (await follower).size == 5
    await gen.aclose()


async def test_os_events_see_an_edit_long_before_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 1 h safety-net interval only an OS event can report the edit within the 30 s timeout."""
    monkeypatch.delenv(POLL_FILES_ENV, raising=False)
    path = tmp_path / "policy.yaml"
    write_atomic(path, "a")
    gen = changes(path, 3600)
    follower = asyncio.ensure_future(_next_stamp(gen))
    await asyncio.sleep(0.2)
    write_atomic(path, "bb")
    assert (await follower).size == 2
    await gen.aclose()


def test_watch_in_a_thread_stops_on_its_event(tmp_path: Path, watch_mode: str) -> None:
    path = tmp_path / "policy.yaml"
    write_atomic(path, "a")
    stop = threading.Event()
    seen: list[int] = []
    got = threading.Event()

    def follow() -> None:
        for stamp in watch(path, 0.05, stop):
            seen.append(stamp.size)
            got.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    threading.Event().wait(0.2)
    write_atomic(path, "bbb")
    assert got.wait(30)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert seen == [3]


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
