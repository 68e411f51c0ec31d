"""``make test`` runs the suite as two pytest processes side by side (``tests/halves.py``). Every test
that starts real processes -- marked ``integration``, or in a module that spawns any
(``subprocess``, ``create_subprocess_exec``) -- and every docs block gets the ``one_at_a_time``
marker and runs in one of them, one test after another, as the whole suite used to: they share what
one machine has once -- the default ports (8443, 9480, 9481, 9464, the sidecars' 181xx), which the
docs' blocks and `up` use as written, the checkout's ``certs/`` and ``models/``, which ``up`` fills
when missing, and free ports picked and then bound by a child a moment later. The in-process tests
(statistics, protocol, policy, sidecar internals, aiohttp apps on ephemeral ports) run in the other."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

_SPAWNS = ("subprocess", "create_subprocess", "Popen", "multiprocessing")
_ALSO = ("tests/docs/test_docs_blocks.py",)


@functools.cache
def _starts_processes(path: Path) -> bool:
    text = path.read_text(encoding="utf-8", errors="replace")
    return any(word in text for word in _SPAWNS)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (
            item.get_closest_marker("integration") is not None
            or item.nodeid.split("::", 1)[0] in _ALSO
            or _starts_processes(Path(str(item.fspath)))
        ):
            item.add_marker(pytest.mark.one_at_a_time)
