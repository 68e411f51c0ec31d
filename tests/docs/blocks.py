"""Shell blocks of the docs, as a user would paste them: found, classified by their marker, and run.

Every fenced ``sh``/``bash`` block must carry a marker on the line before it (an HTML comment, so
readers of the rendered page never see it)::

    <!-- docs-test: run [timeout=S] [ports=P,Q] -->        run it; it must exit 0
    <!-- docs-test: background ready="CMD" [timeout=S] [ports=...] -->
                                                  start it (make demo, up), wait until CMD succeeds;
                                                  it keeps running for the blocks marked
    <!-- docs-test: with-background [timeout=S] -->       which run while it does; then it is stopped
    <!-- docs-test: skip REASON -->                        not run here; the reason is reported

``requires=curl,openssl`` names the tools a block needs beyond the checkout.

A block without a marker is an error, so a new block cannot escape the test. ``ports`` lists ports a
block needs free (the docs use the default ones). A taken port or a missing tool skips the block with
that reason on a workstation (someone else's process is no fault of the docs) and fails it under CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
SHELL = {"sh", "bash", "shell"}
KINDS = {"run", "background", "with-background", "skip"}
# A fence without a language whose first line looks like a command should have been ``sh``.
LOOKS_LIKE_SHELL = re.compile(r"^\s*(cohortgate|make|curl|\.venv/bin/|python|pip|kubectl|docker)\b")
DEFAULT_TIMEOUT_S = 120.0  # generous: a busy 2-core CI box starts Envoy and the sidecars slowly
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str
    code: str
    options: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def timeout_s(self) -> float:
        return float(self.options.get("timeout", DEFAULT_TIMEOUT_S))

    @property
    def ports(self) -> list[int]:
        return [int(p) for p in self.options.get("ports", "").split(",") if p]

    @property
    def requires(self) -> list[str]:
        return [t for t in self.options.get("requires", "").split(",") if t]


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The shell blocks of one Markdown file, and the problems with their markers."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, lang = i, fence["lang"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        body = "\n".join(line[len(fence["indent"]) :] for line in lines[start + 1 : end])
        i = end + 1
        where = f"{path.relative_to(ROOT)}:{start + 1}"
        if lang not in SHELL:
            if not lang and body and LOOKS_LIKE_SHELL.match(body.splitlines()[0]):
                problems.append(f"{where}: a block of commands without a language: mark it ```sh")
            continue
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous.strip())
        if marker is None:
            problems.append(f"{where}: a ```{lang} block without a <!-- docs-test: ... --> marker before it")
            continue
        kind, _, rest = marker["body"].partition(" ")
        if kind not in KINDS:
            problems.append(f"{where}: unknown docs-test kind {kind!r} (one of {', '.join(sorted(KINDS))})")
            continue
        if kind == "skip":  # the reason is prose: apostrophes and all, never shell-split
            blocks.append(Block(path, start + 1, kind, body, reason=rest.strip() or "no reason given"))
            continue
        try:
            words = shlex.split(rest)
        except ValueError as e:  # an unbalanced quote is the doc's fault: report it, never crash collection
            problems.append(f"{where}: the docs-test marker cannot be read ({e})")
            continue
        options = dict(w.split("=", 1) for w in words if "=" in w)
        if kind == "background" and "ready" not in options:
            problems.append(f"{where}: a background block needs ready=\"CMD\"")
            continue
        blocks.append(Block(path, start + 1, kind, body, options))
    return blocks, problems


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --------------------------------------------------------------------------- the clone


def make_clone(dest: Path) -> Path:
    """The tracked files as a fresh clone has them (no models/, no certs/, no .cohortgate/), with the
    checkout's virtual environment standing in for `make install` (its stamps newer than pyproject)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    venv = dest / ".venv"
    venv.mkdir()
    # bin and lib, and pyvenv.cfg: without it `python` in a block is the base interpreter, not the venv's
    for part in ("bin", "lib", "lib64", "include"):
        if (ROOT / ".venv" / part).exists():
            (venv / part).symlink_to(ROOT / ".venv" / part)
    shutil.copy2(ROOT / ".venv" / "pyvenv.cfg", venv / "pyvenv.cfg")
    for stamp in (".installed-cpu", ".installed-test"):
        (venv / stamp).touch()
    return dest


def environment(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORTGATE_", "PYTEST_"))}
    env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def taken(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    block: Block
    returncode: int | None
    output: str

    def describe(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return f"{self.block.where}: exit {self.returncode}\n--- block ---\n{self.block.code}\n--- output ---\n{tail}"


def _script(code: str) -> str:
    # -e: a failing command fails the block, as a user would notice; -u: an undefined variable too.
    return f"set -euo pipefail\n{code}\n"


def run_block(block: Block, clone: Path, env: dict[str, str]) -> Outcome:
    """Run a block in its own process group; whatever it left running in the background is stopped."""
    proc = subprocess.Popen(
        ["bash", "-c", _script(block.code)], cwd=clone, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=block.timeout_s)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        stop_group(proc.pid, proc)
        output, _ = proc.communicate()
        output += f"\n[docs-test: no exit within {block.timeout_s:.0f} s]"
        returncode = None
    stop_group(proc.pid, proc)
    return Outcome(block, returncode, output)


class Background:
    """A long-running block (make demo, up): started, awaited until ready, stopped with Ctrl-C."""

    def __init__(self, block: Block, clone: Path, env: dict[str, str], log: Path) -> None:
        self.block, self.clone, self.env, self.log_path = block, clone, env, log
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            ["bash", "-c", _script(block.code)], cwd=clone, env=env, stdout=self.log,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self) -> Outcome:
        deadline = time.monotonic() + self.block.timeout_s
        ready = self.block.options["ready"]
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return Outcome(self.block, self.proc.returncode, self.output() + "\n[docs-test: exited early]")
            probe = subprocess.run(
                ["bash", "-c", ready], cwd=self.clone, env=self.env, capture_output=True, text=True, timeout=60
            )
            if probe.returncode == 0:
                return Outcome(self.block, 0, self.output())
            last = probe.stdout + probe.stderr
            time.sleep(2.0)
        return Outcome(self.block, None, f"{self.output()}\n[docs-test: {ready!r} never succeeded: {last}]")

    def stop(self) -> Outcome:
        """Ctrl-C, as the docs say; it must wind down on its own within STOP_TIMEOUT_S."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        # The whole group, not just the shell: `up` winds its children down after make has gone.
        stopped_in_time = group_gone(self.proc.pid, STOP_TIMEOUT_S, self.proc)
        stop_group(self.proc.pid, self.proc)
        self.log.close()
        note = "" if stopped_in_time else f"\n[docs-test: still running {STOP_TIMEOUT_S:.0f} s after Ctrl-C]"
        return Outcome(self.block, 0 if stopped_in_time else None, self.output() + note)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


def group_gone(pgid: int, timeout_s: float, leader: subprocess.Popen[str] | None = None) -> bool:
    """Whether every process of the group has exited (the leader reaped: a zombie still counts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def stop_group(pgid: int, leader: subprocess.Popen[str] | None = None) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if group_gone(pgid, grace, leader):
            return
