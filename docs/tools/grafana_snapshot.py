"""Make docs/grafana-preview.png: the Grafana dashboard's panels with data from a real run.

No Grafana runs here, so this is the next best thing the issue asks for: a real Prometheus scrapes a
running `cohortgate up` (gateway, controller, Envoy and every sidecar, the job names the rules and
the dashboard assume), then `cohortgate grafana preview` runs every panel's PromQL against it and
Chromium (Playwright, Debian's chromium) photographs the page.

    cohortgate up --demo --free-ports --state-dir /tmp/cg-snap &     # or any running stack
    python docs/tools/grafana_snapshot.py --state-dir /tmp/cg-snap --minutes 4

Not a test: it takes minutes. tests/integration/test_observability.py checks the same queries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from cohortgate.deploy import alerts

ROOT = Path(__file__).resolve().parents[2]


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", type=Path, default=Path(".cohortgate"), help="the running stack's state dir")
    ap.add_argument("--minutes", type=float, default=4.0, help="how long Prometheus scrapes before the picture")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "grafana-preview.png")
    args = ap.parse_args()

    run = json.loads((args.state_dir / "run.json").read_text())
    ends, ports = run["endpoints"], run["ports"]
    sidecars = [f"127.0.0.1:{p}" for name, p in ports.items() if name not in ("envoy", "controller", "dashboard", "gateway_metrics")]  # fmt: skip  # noqa: E501
    scrape = yaml.safe_load(
        alerts.scrape_config(
            gateway=[_hostport(ends["gateway_metrics"])],
            controller=[_hostport(ends["controller_api"])],
            sidecar=sidecars,
            envoy=[_hostport(ends["envoy_admin"])],
        )
    )
    work = Path(tempfile.mkdtemp(prefix="cg-prometheus-"))
    config = {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}, **scrape}
    (work / "prometheus.yml").write_text(json.dumps(config))
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("prometheus is not installed (make system-deps)", file=sys.stderr)
        return 1
    port = 19090
    proc = subprocess.Popen(
        [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(args.minutes * 60)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets").read())
        up = [t["labels"]["job"] for t in targets["data"]["activeTargets"] if t["health"] == "up"]
        print(f"targets up: {sorted(up)}")
        page = work / "preview.html"
        subprocess.run(
            [sys.executable, "-m", "cohortgate.cli", "grafana", "preview", "--prometheus-url", f"http://127.0.0.1:{port}",
             "--range", f"{int(args.minutes * 60)}s", "--step", "5s", "--out", str(page)],
            check=True,
        )  # fmt: skip
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium)
            tab = browser.new_page(viewport={"width": 1500, "height": 900})
            tab.goto(page.as_uri())
            tab.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
