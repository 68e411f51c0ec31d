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

``--through-up`` measures the way users run it instead (`through_up`: `cohortgate up`, 100
background requests a second, full replacements then a one-route edit), and prints where each
edit's time went: `up` (validated, the gateway's file written, served), the gateway's reload (its
parse) and Envoy's confirmation (clusters in the set; `up` hands them over by delta CDS, the
gateway's ``--envoy-xds``). Each edit starts after the previous one's dropped clusters have left
Envoy (up's reload grace), so a replacement's clusters are all new to Envoy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
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
from cohortgate.local.recipes import RELOAD_GRACE_S  # noqa: E402
from cohortgate.support import http as loopback  # noqa: E402
from cohortgate.support.files import write_atomic  # noqa: E402

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


# ------------------------------------------------------------------------------ through `cohortgate up`

UP_HEAD = """version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, algorithms: [ES256], jwks: {jwks}}}
routes:
"""


def up_policy(jwks: Path, url: str, prefix: str, n: int, moved: tuple[int, str] | None = None) -> str:
    """``bg`` (the unchanged route under load) and ``n`` routes ``PREFIX0..``, all on external
    endpoints (no sidecars); ``moved`` = (k, URL) puts routes 0..k on another URL (each one-route
    edit moves one more)."""
    routes = [ROUTE.format(i="", url=url).replace("r:", "bg:", 1).replace("name: r\n", "name: bg\n")]
    for i in range(n):
        target = moved[1] if moved is not None and i <= moved[0] else url
        routes.append(
            ROUTE.format(i=i, url=target)
            .replace(f"name: r{i}", f"name: {prefix}{i}")
            .replace(f"model: m{i}", f"model: {prefix}{i}")
        )
    return UP_HEAD.format(jwks=jwks) + "".join(routes).replace("model: m}", "model: bg}")


class Load:
    """Steady requests to the unchanged route ``bg`` (``rate`` a second), every status counted."""

    def __init__(self, connect, token: str, rate: float) -> None:
        self.connect, self.token, self.period = connect, token, 1.0 / rate
        self.statuses: dict[str, int] = {}
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = self.connect()
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                headers = {"authorization": f"Bearer {self.token}"}
                conn.request("POST", "/v2/models/bg/infer", body=b"{}", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                status = str(resp.status)
                if resp.status != 200:  # the code says who failed: "unavailable" is the processor's timeout
                    status += " " + (resp.getheader("x-cohortgate-error") or _error_code(body))
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = self.connect()
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if not status.startswith("200"):
                self.failures.append((time.monotonic(), status))
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        conn.close()

    @property
    def failed(self) -> int:
        return len(self.failures)


def through_up(n: int, rounds: int, work: Path, *, rate: float = 100.0, edits: int = 1, say=print) -> dict:
    """`cohortgate up` serving ``n`` routes; ``rounds`` full replacements (alternating two files of
    ``n`` new routes: 2n new clusters each), then ``edits`` one-route edits (each moves one more
    route to another backend); background load on ``bg``.

    Per apply: ``live`` = until the last new route answers 200 from its backend (seconds from the
    write of the source file), ``switched`` = until `up`'s run.json names the new policy."""
    base = upstream("base")
    moved = upstream("moved")
    url = f"http://127.0.0.1:{base.server_address[1]}"
    moved_url = f"http://127.0.0.1:{moved.server_address[1]}"
    jwks = ROOT / "certs" / "jwks.json"  # where `up` makes its certificates (git-ignored), as in the README
    source = work / "policy.yaml"
    source.write_text(up_policy(jwks, url, "a", n))
    state = work / "state"
    out = open(work / "up.out", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "cohortgate.cli", "up", "--policy", str(source), "--state-dir", str(state),
         "--free-ports", "--ready-timeout", "600"],  # a 1 000-route controller: 30 s to 2.5 min on 2 busy cores
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    rows: list[dict] = []
    load = None
    try:
        run_file = state / "run.json"

        def ready() -> bool:
            if up.poll() is not None:
                raise SystemExit(f"`cohortgate up` exited:\n{(work / 'up.out').read_text(errors='replace')}")
            return run_file.exists() and "Ctrl-C stops everything" in (work / "up.out").read_text(errors="replace")

        _wait(ready, 660, "`cohortgate up` ready")
        run = json.loads(run_file.read_text())
        certs = run["certs"]
        ctx = ssl.create_default_context(cafile=certs["ca"])
        ctx.load_cert_chain(certs["clients"]["app-demo"]["cert"], certs["clients"]["app-demo"]["key"])
        token = pki.mint_token(pki.load_cert_paths(certs["dir"]), "bench-user", residency="eu", scopes=["predict"])
        port = run["ports"]["envoy"]

        def connect() -> http.client.HTTPSConnection:
            return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)

        probe = connect()

        def answer(model: str) -> str:
            probe.request("POST", f"/v2/models/{model}/infer", body=b"{}", headers={"authorization": f"Bearer {token}"})
            resp = probe.getresponse()
            resp.read()
            return resp.getheader("x-upstream") or str(resp.status)

        _wait(lambda: answer("bg") == "base", 60, "bg answered")
        # steady state: the gateway's first CDS render (importing and warming the renderer, seconds
        # on a busy machine) is done; an edit arriving earlier waits for it
        _wait(lambda: "Envoy clusters ready" in _gateway_log(state), 300, "the gateway's first CDS render")
        load = Load(connect, token, rate)
        load.thread.start()
        time.sleep(2.0)
        last = "a" if rounds % 2 == 0 else "b"
        changes = [("a" if k % 2 else "b", None) for k in range(rounds)] + [(last, k) for k in range(edits)]
        for prefix, one in changes:
            digest = json.loads(run_file.read_text())["policy"]["digest"]
            text = up_policy(jwks, url, prefix, n, moved=(one, moved_url) if one is not None else None)
            before = load.failed
            start = time.perf_counter()
            write_atomic(source, text)
            if one is None:
                _wait(lambda p=prefix: answer(f"{p}{n - 1}") == "base", 120, f"{prefix}{n - 1} live")
            else:
                _wait(lambda p=prefix, k=one: answer(f"{p}{k}") == "moved", 120, f"{prefix}{one} moved")
            live = time.perf_counter() - start
            _wait(lambda d=digest: json.loads(run_file.read_text())["policy"]["digest"] != d, 60, "run.json")
            switched = time.perf_counter() - start
            # requests sent during the apply have come back, and the clusters it dropped have left Envoy
            # (up's reload grace): the next replacement's 2N clusters are all new to Envoy, not still there
            time.sleep(RELOAD_GRACE_S + 1.0)
            kind = "1 route edited" if one is not None else f"{n} routes replaced"
            row = {"edit": kind, "live": live, "switched": switched, "failed": load.failed - before}
            rows.append(row)
            say(f"{n:>5} routes  {kind:<20} live {live:6.2f} s  run.json {switched:6.2f} s  failed {row['failed']}")
        probe.close()
    finally:
        if load is not None:
            load.stop.set()
            load.thread.join(15)
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
        out.close()
        base.shutdown()
        moved.shutdown()
    lags, gateway_times, envoy_times = [], [], []
    for line in _gateway_log(state).splitlines():
        if "event loop lag at most" in line:
            lags.append(line.rsplit("at most", 1)[1].strip())
            gateway_times.append(line.split(" took ", 1)[1].split("; ", 1)[0])
        elif "Envoy confirmed" in line:
            envoy_times.append(line.split("cluster(s) in ", 1)[1])
    up_lines = (work / "up.out").read_text(errors="replace").splitlines()
    up_times = [line.split("; ", 1)[1].rstrip(")") for line in up_lines if "applied the edit" in line and "; " in line]
    for label, values in (("up", up_times), ("gateway reload", gateway_times), ("Envoy confirmed", envoy_times)):
        say(f"  {label}: " + " | ".join(values))
    return {"rows": rows, "statuses": dict(load.statuses) if load else {}, "failures": load.failures if load else [],
            "loop_lag": lags, "up": up_times, "gateway": gateway_times, "envoy": envoy_times}  # fmt: skip


def _error_code(body: bytes) -> str:
    """The ``error.code`` of a JSON error body (Envoy's local replies, the processor's denials)."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return body[:40].decode(errors="replace")


def _gateway_log(state: Path) -> str:
    found = next(iter(sorted(state.rglob("gateway*.log"))), None)
    return found.read_text(errors="replace") if found is not None else ""


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
    parser.add_argument("--through-up", action="store_true", help="measure through `cohortgate up`, under load")
    parser.add_argument("--rate", type=float, default=100.0, help="--through-up: background requests a second")
    parser.add_argument("--edits", type=int, default=1, help="--through-up: one-route edits after the replacements")
    args = parser.parse_args()
    if args.through_up:
        with tempfile.TemporaryDirectory(prefix="cg-bench-up-") as tmp:
            for n in args.routes:
                work = Path(tmp) / f"n{n}"
                work.mkdir()
                result = through_up(n, args.rounds, work, rate=args.rate, edits=args.edits)
                print(f"{n} routes: background statuses {result['statuses']}; loop lag {result['loop_lag']}")
        return 0
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
