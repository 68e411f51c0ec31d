"""Make ``docs/dashboard.png``: the page during an automatic rollback (``python -m tests.dashboard.screenshot``).

A real controller and Chromium, as in the browser tests: a healthy canary for a while, then it starts
failing 30 % of its requests; the controller rolls it back on its own and the page is captured a few
seconds later, with the rollback marked on the plots and explained in the timeline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.dashboard.harness import ROOT, ControllerProc, Feeder


def main(out: str = str(ROOT / "docs" / "dashboard.png"), healthy_s: float = 25.0, after_s: float = 6.0) -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        ctrl = ControllerProc(Path(tmp) / "ctrl").start()
        feeder = Feeder(ctrl, rate=200.0)
        feeder.start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium")
                page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
                page.goto(ctrl.url)
                time.sleep(healthy_s)
                feeder.canary_errors = 0.3  # failure onset
                page.wait_for_selector("#timeline li[data-action=rollback]", timeout=30_000)
                time.sleep(after_s)
                page.screenshot(path=out, full_page=True)
                browser.close()
        finally:
            feeder.stop()
            ctrl.stop()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
