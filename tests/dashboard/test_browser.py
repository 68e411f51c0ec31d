"""The page in a real headless Chromium (Debian's), against a real controller fed through its ALS.

The controller is a `cohortgate controller` child process; `harness.Feeder` streams access-log
entries to its gRPC receiver as Envoy would (see its docstring for why not Envoy itself). Actions
from the command line go through `cohortgate rollback/resume`. A screenshot of each page is left in
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard.harness import ROOT, ControllerProc, Feeder
from tests.needs import import_or_missing, missing

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        missing("Debian's chromium is not installed")  # a failure under CI=true
    sync_api = import_or_missing("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
        yield b
        b.close()


def running(tmp_path: Path, allow_actions: bool) -> tuple[ControllerProc, Feeder]:
    ctrl = ControllerProc(tmp_path / "ctrl", allow_actions=allow_actions).start()
    feeder = Feeder(ctrl, rate=200.0)
    feeder.start()
    return ctrl, feeder


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page, problems


def canary(page):
    return page.locator('#route-tabular tr[data-variant="canary"]')


def test_live_page_follows_the_controller_and_a_cli_rollback_shows_within_2s(browser, tmp_path):
    ctrl, feeder = running(tmp_path, allow_actions=False)
    try:
        page, problems = open_page(browser, ctrl.url)
        page.wait_for_selector("#conn.ok", timeout=5000)
        control_requests = page.locator('#route-tabular tr[data-variant="control"] [data-requests]')
        page.wait_for_function(
            "() => +document.querySelector('#route-tabular tr[data-variant=control] [data-requests]')"
            "?.dataset.requests > 0",
            timeout=5000,
        )
        first = int(control_requests.get_attribute("data-requests"))
        page.wait_for_timeout(1500)
        assert int(control_requests.get_attribute("data-requests")) > first  # live numbers move
        assert canary(page).locator("[data-weight]").get_attribute("data-weight") == "10"
        assert page.locator("button[data-action]").count() == 0 and page.locator("#tokenform").is_hidden()
        assert page.locator("#route-tabular svg.chart path.line").count() >= 3
        assert int(page.locator("[data-denials]").get_attribute("data-denials")) > 0  # via the ALS receiver's hook
        assert "unauthenticated" in page.locator("#denials").inner_text()

        done = ctrl.cli("rollback", "tabular", "canary")
        assert done.returncode == 0, done.stderr
        t0 = time.monotonic()
        page.wait_for_function(
            "() => document.querySelector('#route-tabular tr[data-variant=canary] [data-weight]')"
            "?.dataset.weight === '0' && document.querySelector('#timeline li[data-action=rollback]')",
            timeout=2000,
        )
        shown_after = time.monotonic() - t0
        entry = page.locator("#timeline li[data-action=rollback]").first.inner_text()
        assert "tabular / canary" in entry and "manual:cli:" in entry
        assert page.locator("#route-tabular svg.chart line.marker").count() >= 3  # marked on every plot
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-cli-rollback.png"), full_page=True)
        assert problems == []
        assert feeder.error is None
        print(f"CLI rollback on the page after {shown_after:.2f} s")
    finally:
        feeder.stop()
        ctrl.stop()


def test_rollback_button_works_with_the_token_and_is_refused_without(browser, tmp_path):
    ctrl, feeder = running(tmp_path, allow_actions=True)
    try:
        page, problems = open_page(browser, ctrl.url)
        button = canary(page).locator("button[data-action=rollback]")
        button.wait_for(timeout=5000)
        assert problems == []

        button.click()  # no token yet
        page.wait_for_selector("#flash.error", timeout=3000)
        assert "401" in page.locator("#flash").inner_text()
        page.locator("#token").fill(ctrl.token + "x")
        page.locator("#tokenform button[type=submit]").click()
        canary(page).locator("button[data-action=rollback]").click()
        page.wait_for_function("() => document.querySelector('#flash').textContent.includes('403')", timeout=3000)
        page.wait_for_timeout(300)
        assert canary(page).locator("[data-weight]").get_attribute("data-weight") == "10"

        page.locator("#token").fill(ctrl.token)
        page.locator("#tokenform button[type=submit]").click()
        assert page.evaluate("() => document.cookie") == ""  # the token lives in sessionStorage, not a cookie
        canary(page).locator("button[data-action=rollback]").click()
        page.wait_for_function(
            "() => document.querySelector('#route-tabular tr[data-variant=canary] [data-weight]')"
            "?.dataset.weight === '0'",
            timeout=3000,
        )
        entry = page.locator("#timeline li[data-action=rollback]").first.inner_text()
        assert "manual:dashboard" in entry
        status = ctrl.cli("status", "--json")
        assert '"weight": 0' in status.stdout
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-actions.png"), full_page=True)
        # the refused clicks logged their 401/403 responses; nothing else may complain
        assert [p for p in problems if "status of 401" not in p and "status of 403" not in p] == []
    finally:
        feeder.stop()
        ctrl.stop()


def test_first_paint_shows_the_state_without_the_event_stream(browser, tmp_path):
    """The page carries a snapshot of the document: with its event stream blocked it still draws
    every route, so a plain screenshot shows the experiment rather than "connecting…"."""
    ctrl = ControllerProc(tmp_path / "ctrl", allow_actions=False).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.route("**/api/events", lambda route: route.abort())
        page.goto(ctrl.url, wait_until="domcontentloaded")
        assert canary(page).locator("[data-weight]").get_attribute("data-weight") == "10"
        conn = page.locator("#conn").inner_text()
        assert conn.startswith(("snapshot ", "disconnected since")), conn  # it has a state to show, not "connecting…"
        html = urllib.request.urlopen(ctrl.url, timeout=30).read().decode()  # what any screenshot tool gets
        assert '<script id="snapshot" type="application/json">' in html and "connecting" not in html
        assert page.locator("#route-tabular svg.chart").count() == 3
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-first-paint.png"), full_page=True)
    finally:
        ctrl.stop()


MARKERS_SHOWN = """(rangeValue) => {
  const select = document.getElementById('range');
  select.value = rangeValue;
  select.dispatchEvent(new Event('change'));
  return document.querySelectorAll('#route-tabular svg.chart line.marker').length;
}"""


def test_the_charts_keep_an_old_rollback_in_view(browser, tmp_path):
    """A rollback ten minutes ago: the automatic range reaches back to it, a chosen 2-minute range
    does not, and 15 minutes does again (the controller keeps that much history)."""
    ctrl = ControllerProc(tmp_path / "ctrl", allow_actions=False).start()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.route("**/api/events", lambda route: route.abort())  # only the synthetic document below is drawn
        page.goto(ctrl.url)
        page.wait_for_selector("#route-tabular svg.chart", timeout=10000)
        page.evaluate(
            """() => {
              const doc = JSON.parse(JSON.stringify(lastDoc));
              const now = doc.generated_at;
              const route = doc.routes.find((r) => r.name === 'tabular');
              route.series = { control: [], canary: [] };
              for (let t = Math.floor(now) - 900; t < now; t++) {
                route.series.control.push([t, 90, 0.01, 5, 20]);
                route.series.canary.push([t, 10, 0.2, 6, 30]);
              }
              route.markers = [{ ts: now - 600, time: '10 min ago', action: 'rollback', variant: 'canary',
                                 actor: 'controller', reason: 'errors' }];
              render(doc);
            }"""
        )
        assert page.evaluate(MARKERS_SHOWN, "auto") == 3  # one per chart
        assert page.evaluate(MARKERS_SHOWN, "120") == 0
        assert page.evaluate(MARKERS_SHOWN, "900") == 3
        assert page.evaluate("() => sessionStorage.getItem('cohortgate.chart-range')") == "900"
        assert problems == []
    finally:
        ctrl.stop()
