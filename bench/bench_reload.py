"""Benchmark: from `cohortgate policy apply` to the change being live, for 10, 100 and 1 000 routes.

A real Envoy (filesystem CDS) and a real gateway (``--envoy-cds``/``--envoy-admin``, file watch
every ``--watch`` seconds) serve a generated policy of N routes, each with a control and a canary
variant (2 clusters a route). Each round applies, in process, what `cohortgate policy apply` does
(validate the whole file, rename it over the live one) for an edit that adds one route on a new
backend (a new cluster), and measures:

- ``apply``: validating + renaming (the CLI's own work);
- ``envoy``: until Envoy's admin ``/clusters`` lists the new cluster;
- ``live``: until a request for the new route, through Envoy, is answered by the new backend
  (the gateway has swapped its policy, after confirming the cluster).

All times are seconds from the start of the apply. The file watch adds up to ``--watch`` seconds
(the gateway's default is 0.5; SIGHUP applies at once).

    python bench/bench_reload.py                 # 10, 100, 1000 routes; 3 rounds each
    python bench/bench_reload.py --routes 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cohortgate.core.policy import load_policy  # noqa: E402
from cohortgate.deploy import pki  # noqa: E402
from cohortgate.deploy.envoy import ProcessorAddress, render  # noqa: E402
from cohortgate.deploy.envoyproc import EnvoyProcess  # noqa: E402
from cohortgate.support import http as loopback  # noqa: E402

ROUTE = """  - name: r{i}
    match: {{model: m{i}}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
    cohorts:
      unit: {{claim: sub}}
    variants:
      - name: control
        weight: 90
        backends: [{{url: "{url}", region: eu}}]
      - name: canary
        weight: 10
        backends: [{{url: "{url}", region: eu}}]
"""


def policy_text(jwks: Path, url: str, names: list[int], extra: tuple[int, str] | None = None) -> str:
    head = (
        "version: 1\njwt:\n  issuer: https://auth.cohortgate.local\n  audience: cohortgate\n"
        f"  algorithms: [ES256]\n  jwks: {jwks}\nresponse_headers: true\nroutes:\n"
    )
    routes = [ROUTE.format(i=i, url=url) for i in names]
    if extra is not None:
        routes.append(ROUTE.format(i=extra[0], url=extra[1]))
    return head + "".join(routes)


def upstream(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("x-upstream", name)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def apply(source: Path, live: Path) -> None:
    """What `cohortgate policy apply` does: validate, then rename over the live file."""
    load_policy(source)
    tmp = live.with_name(f".{live.name}.tmp")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, live)


def clusters(admin: str) -> set[str]:
    reply = loopback.call_admin(admin, "/clusters?format=json", timeout=5)
    return {c["name"] for c in json.loads(reply.body)["cluster_statuses"]}


def bench(n: int, rounds: int, watch: float, work: Path, certs: pki.CertPaths) -> list[dict[str, float]]:
    base = upstream("base")
    url = f"http://127.0.0.1:{base.server_address[1]}"
    live = work / "live.yaml"
    names = list(range(n))
    live.write_text(policy_text(certs.jwks, url, names))
    sock = work / "processor.sock"
    admin_socket = work / "envoy" / "admin.sock"
    admin = f"unix:{admin_socket}"  # mode 0600: only this user may talk to Envoy's admin
    files = render(
        load_policy(live),
        certs=certs,
        out_dir=work / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        listen_port=_free_port(),
        admin_socket=admin_socket,
    )
    log = open(work / "gateway.log", "ab")  # noqa: SIM115
    gateway = subprocess.Popen(
        [sys.executable, "-m", "cohortgate.cli", "gateway", "--policy", str(live), "--listen", f"uds:{sock}",
         "--no-audit", "--envoy-cds", str(files.cds), "--envoy-admin", admin,
         "--watch-interval", str(watch)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COHORTGATE_UNIT_SALT": "bench"},
    )  # fmt: skip
    results = []
    try:
        _wait(lambda: b"gateway ready" in (work / "gateway.log").read_bytes(), 120, "gateway ready")
        time.sleep(min(10, 0.005 * n + 1))  # the gateway's first CDS render warms its cache
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
            ctx.load_cert_chain(*(str(p) for p in certs.clients["app-demo"]))
            token = pki.mint_token(certs, "bench-user", residency="eu")
            conn = http.client.HTTPSConnection("localhost", envoy.listen_port, context=ctx, timeout=10)

            def answer(model: str) -> str:
                conn.request(
                    "POST", f"/v2/models/{model}/infer", body=b"{}", headers={"authorization": f"Bearer {token}"}
                )
                resp = conn.getresponse()
                resp.read()
                return resp.getheader("x-upstream") or str(resp.status)

            assert answer("m0") == "base", answer("m0")
            for k in range(rounds):
                new = upstream(f"new-{k}")
                extra = (n + k, f"http://127.0.0.1:{new.server_address[1]}")
                source = work / f"edit-{k}.yaml"
                source.write_text(policy_text(certs.jwks, url, names, extra))
                cluster = f"cg.r{n + k}.control.0"
                start = time.perf_counter()
                apply(source, live)
                applied = time.perf_counter() - start
                _wait(lambda c=cluster: c in clusters(admin), 30, f"Envoy has {cluster}")
                in_envoy = time.perf_counter() - start
                _wait(lambda k=k: answer(f"m{n + k}") == f"new-{k}", 30, "the new route live")
                in_gateway = time.perf_counter() - start
                names.append(n + k)
                results.append({"apply": applied, "envoy": in_envoy, "live": in_gateway})
                time.sleep(1.0)
                new.shutdown()
            conn.close()
    finally:
        gateway.terminate()
        gateway.wait(10)
        log.close()
        base.shutdown()
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watch", type=float, default=0.1, help="the gateway's --watch-interval (default 0.1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cg-bench-reload-") as tmp:
        certs = pki.init_certs(Path(tmp) / "certs", clients=("app-demo",))
        rows = []
        for n in args.routes:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            results = bench(n, args.rounds, args.watch, work, certs)
            rows.append((n, results))
            print(f"{n} routes done", file=sys.stderr)
    print(f"\nfrom policy apply to live (s), watch interval {args.watch}s; median (max) over {args.rounds} rounds")
    print(f"{'routes':>7} {'clusters':>9} {'apply':>14} {'envoy':>14} {'live':>14}")
    for n, results in rows:
        cells = []
        for key in ("apply", "envoy", "live"):
            values = [r[key] for r in results]
            cells.append(f"{statistics.median(values):6.3f} ({max(values):5.3f})")
        print(f"{n:>7} {2 * n + 2:>9} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
