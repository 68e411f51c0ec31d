"""Every shell block a user would paste from README.md and docs/*.md, run as written in a fresh
clone-like directory (tracked files only: no models, no certificates, no state), in order, one test
per document. Select with ``-m docs``; about a minute and a half on a 2-core machine, most of it
`make demo` and the pieces-by-hand sequence starting their processes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, Background, Block, documents, environment, make_clone, parse, run_block, taken
from tests.needs import in_ci

DOCS = documents()


def test_every_shell_block_is_marked():
    problems = [p for doc in DOCS for p in parse(doc)[1]]
    assert not problems, "\n".join(problems)


def test_the_parser_refuses_an_unmarked_block(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.docs.blocks.ROOT", tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text(
        "```sh\ncohortgate up\n```\n\n<!-- docs-test: skip needs a cluster's nodes -->\n```sh\nkubectl apply\n```\n\n"
        "```\ncohortgate status\n```\n\n<!-- docs-test: background -->\n```sh\nmake demo\n```\n\n"
        "<!-- docs-test: run ready=\"curl -s -->\n```sh\ncohortgate status\n```\n"
    )
    blocks, problems = parse(doc)
    assert [(b.kind, b.reason) for b in blocks] == [("skip", "needs a cluster's nodes")]
    assert problems == [
        "x.md:1: a ```sh block without a <!-- docs-test: ... --> marker before it",
        "x.md:10: a block of commands without a language: mark it ```sh",
        'x.md:15: a background block needs ready="CMD"',
        "x.md:20: the docs-test marker cannot be read (No closing quotation)",
    ]


def _runnable(doc: Path) -> bool:
    return any(b.kind != "skip" for b in parse(doc)[0])


@pytest.mark.docs
@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", [d for d in DOCS if _runnable(d)], ids=lambda d: str(d.relative_to(ROOT)))
def test_the_document_runs_as_written(doc: Path, tmp_path: Path):
    blocks, problems = parse(doc)
    assert not problems, "\n".join(problems)
    clone = make_clone(tmp_path / "clone")
    env = environment(clone)
    failures: list[str] = []
    skipped: list[str] = []
    background: Background | None = None

    def stop_background() -> None:
        nonlocal background
        if background is not None:
            stopped = background.stop()
            if stopped.returncode is None:
                failures.append(stopped.describe())
            background = None

    try:
        for block in blocks:
            if block.kind == "skip":  # prose between a background block and its users: it keeps running
                skipped.append(f"{block.where}: {block.reason}")
                continue
            if block.kind != "with-background":
                stop_background()
            busy = taken(block.ports)
            absent = [tool for tool in block.requires if shutil.which(tool) is None]
            if busy or absent:
                why = f"ports {busy} are taken on this machine" if busy else f"{', '.join(absent)} not installed"
                (failures if in_ci() else skipped).append(f"{block.where}: {why}")
                continue
            if block.kind == "with-background" and background is None:
                skipped.append(f"{block.where}: its background block did not run")
                continue
            started = time.monotonic()
            if block.kind == "background":
                background = Background(block, clone, env, tmp_path / f"background-{block.line}.log")
                outcome = background.wait_ready()
            else:
                outcome = run_block(block, clone, env)
            took = time.monotonic() - started
            print(f"docs-test {block.where}: {block.kind}, exit {outcome.returncode}, {took:.1f} s")
            if outcome.returncode != 0:
                failures.append(outcome.describe())
                if block.kind == "background":
                    stop_background()
    finally:
        stop_background()
    for line in skipped:
        print(f"docs-test skipped {line}")  # shown with -rP or -s: what this run could not check
    assert not failures, "\n\n".join(failures)
    ran = [b for b in blocks if b.kind != "skip" and not any(s.startswith(b.where + ":") for s in skipped)]
    if not ran:
        pytest.skip("; ".join(skipped))


def _kinds(blocks: list[Block]) -> set[str]:
    return {b.kind for b in blocks}


def test_the_readme_runs_its_two_paths():
    """The README's demo and its pieces-by-hand sequence are run, not skipped."""
    blocks = parse(ROOT / "README.md")[0]
    assert {"background", "with-background", "run"} <= _kinds(blocks)
    by_hand = next(b for b in blocks if "cohortgate gateway" in b.code)
    assert by_hand.kind == "run" and "cohortgate call" in by_hand.code and "cohortgate status" in by_hand.code
    demo = next(b for b in blocks if "make demo" in b.code)
    assert demo.kind == "background"
