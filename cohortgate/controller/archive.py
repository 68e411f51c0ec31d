"""Finished experiments, archived with their result: one JSON report document per finish.

When every challenger of a route has finished (promoted or rolled back), the controller writes the
route's report document (`cohortgate.controller.report.document`) to
``DIR/ROUTE/<finish time>.json``, beside its state file (``.cohortgate/experiments/`` by default),
and ``cohortgate report ROUTE --archived`` renders it like a live one. A file, not the state
store: the record outlives the policy that declared the route and a Redis flush, and is read with
no controller running. The name is the finish time, so a restart that sees the same finished state
finds the file already there and writes nothing twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cohortgate.support.files import write_atomic

ARCHIVE_DIRNAME = "experiments"
_NAME = re.compile(r"^\d+\.json$")


def archive_dir(state_file: Path | str) -> Path:
    """Where a controller with this state file archives: ``experiments/`` beside it."""
    return Path(state_file).resolve().parent / ARCHIVE_DIRNAME


def path_for(directory: Path | str, route: str, finished_at: float) -> Path:
    return Path(directory) / route / f"{int(finished_at)}.json"


def write(directory: Path | str, route: str, finished_at: float, doc: dict[str, Any]) -> Path | None:
    """Archive ``doc``; None when this finish is archived already."""
    path = path_for(directory, route, finished_at)
    if path.exists():
        return None
    write_atomic(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def archived(directory: Path | str, route: str) -> list[Path]:
    """The route's archived reports, oldest first."""
    d = Path(directory) / route
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(p.stem))


def read(path: Path | str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "report_version" not in data:
        raise ValueError(f"{path} is not an archived experiment report")
    return data
