"""The suite runs on two pytest-xdist workers (``make test``, ``--dist loadgroup``). Every test that
starts real processes (marked ``integration``) and every docs block runs in one group, one after
another on one worker, as the whole suite used to: they share what one machine has once -- the
default ports (8443, 9480, 9481, ...), which the docs' blocks and `up` use as written, the
checkout's ``certs/`` and ``models/``, which ``up`` fills when missing, and free ports picked and
then bound by a child a moment later. The pure tests (statistics, protocol, policy, sidecar
internals) share the other worker."""

from __future__ import annotations

import pytest

ONE_AT_A_TIME = "real-processes"
_ALSO = ("tests/docs/test_docs_blocks.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None or item.nodeid.split("::", 1)[0] in _ALSO:
            item.add_marker(pytest.mark.xdist_group(ONE_AT_A_TIME))
