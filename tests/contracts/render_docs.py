"""Write the OpenAPI documents under docs/openapi/ (``python -m tests.contracts.render_docs``).

``test_openapi.py`` fails when a committed file differs from what the builders give, so the docs
never drift from the code that serves them.
"""

from __future__ import annotations

import json
from pathlib import Path

from cohortgate.controller import openapi as controller_openapi
from cohortgate.dashboard import openapi as dashboard_openapi
from sidecar import openapi as sidecar_openapi

OUT = Path(__file__).resolve().parents[2] / "docs" / "openapi"


def rendered() -> dict[str, str]:
    docs = {
        "sidecar.json": sidecar_openapi.build(),
        "controller.json": controller_openapi.build(),
        "dashboard.json": dashboard_openapi.build(),
    }
    return {name: json.dumps(doc, indent=2) + "\n" for name, doc in docs.items()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (OUT / name).write_text(text)
        print(OUT / name)


if __name__ == "__main__":
    main()
