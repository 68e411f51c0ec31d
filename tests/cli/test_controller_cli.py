"""`cohortgate controller` as a process: a port it was told to serve on and cannot have stops it, with
a sentence naming the flag, instead of a controller that carries on without its dashboard."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = str(Path(__file__).resolve().parents[2] / "policies" / "example.yaml")
START_TIMEOUT_S = 120  # a cold start imports grpc, aiohttp and scipy; generous on a busy 2-core box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def taken_port():
    """A port somebody else holds (bound and listening), like a second stack's dashboard."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _controller(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cohortgate.cli", "controller", "--policy", EXAMPLE,
            "--token-file", str(tmp_path / "admin.token"), "--state-file", str(tmp_path / "state.json"), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=tmp_path)


def test_a_taken_dashboard_port_stops_the_controller_with_a_sentence(tmp_path, taken_port):
    api = _free_port()
    out = _controller(tmp_path, "--listen", f"127.0.0.1:{api}", "--dashboard", f"127.0.0.1:{taken_port}")
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"cohortgate controller: the dashboard cannot listen on 127.0.0.1:{taken_port}: the port is taken "
        "(another controller or stack?); pass --dashboard HOST:PORT, or --dashboard off"
    )
    with socket.socket() as s:  # the API's port was given back on the way out
        s.bind(("127.0.0.1", api))


def test_a_taken_api_port_says_which_flag_moves_it(tmp_path, taken_port):
    out = _controller(tmp_path, "--listen", f"127.0.0.1:{taken_port}", "--dashboard", "off")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"cohortgate controller: the controller API cannot listen on 127.0.0.1:{taken_port}: the port is taken "
        "(another controller or stack?); pass --listen HOST:PORT"
    )
