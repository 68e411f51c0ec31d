"""Parsing a policy leaves the process's garbage collector alone, on every thread."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from cohortgate.core.policy import load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"


def test_parsing_never_switches_the_collector_off() -> None:
    raw = EXAMPLE.read_bytes()
    seen_off = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if not gc.isenabled():
                seen_off.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(20):
            parse_policy(raw, str(EXAMPLE), EXAMPLE.parent)
    finally:
        done.set()
        watcher.join()
    assert gc.isenabled() and not seen_off.is_set()
    assert load_policy(EXAMPLE).digest == parse_policy(raw, str(EXAMPLE), EXAMPLE.parent).digest
