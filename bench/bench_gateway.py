"""Benchmark: Envoy alone vs Envoy + the cohortgate processor, per transport, in one run.

Same machine, same static upstream (a second Envoy answering with ``direct_response``), same
load generator (h2load, HTTP/1.1 over TLS, keep-alive), same concurrencies. Every request carries
the same valid bearer token, so the gateway's cached-verification path is what is measured, with
the audit trail on (written to a file) as in production.

Neither h2load nor wrk can present a client certificate, so the benchmark's Envoy listener keeps
TLS but does not *require* a client certificate, and the benchmark policy has no identity rule;
everything else is the configuration `cohortgate envoy render` writes. The output says so.

All setups run side by side and are measured in interleaved rounds (alone, grpc, http, fast,
then again), so a noisy neighbour on a shared machine hits them alike. Reported per (setup,
concurrency), as median (min-max) over the rounds: req/s, p50/p99 latency (from h2load's
per-request log), the ratio to Envoy alone in the same round, and CPU µs per request of the
gateway process and of the front Envoy (``/proc/<pid>/stat`` utime+stime around each slot).

    python bench/bench_gateway.py                        # grpc, http, fast; c16 + c64; 3 rounds
    python bench/bench_gateway.py --secured              # the secured path, workers 1 and 2 (below)

``--secured`` measures the path production runs (issue 25): wrk (HTTP/1.1, a Lua script cycling
through 2 000 distinct users' tokens) -> a client-side Envoy that presents the ``app-bench`` client
certificate -> the rendered front Envoy, which *requires* it, -> the fast processor with an identity
rule (``spiffe://TD/app-*``) and a scope rule, residency eu. Envoy alone (the same two Envoys, no
ext_proc) and Envoy + gateway ``--workers N`` run at front Envoy ``--concurrency N`` for each N in
``--workers`` (default 1,2), side by side, interleaved. The gateway's CPU is its processes' (parent
and workers) utime+stime per request.
    python bench/bench_gateway.py --duration 5 --transports http --concurrency 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cohortgate.core.policy import load_policy  # noqa: E402
from cohortgate.deploy import pki  # noqa: E402
from cohortgate.deploy.envoy import MAX_REQUEST_BYTES, EnvoyFiles, ProcessorAddress, render  # noqa: E402
from cohortgate.deploy.envoyproc import EnvoyProcess  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/v2/models/bench/infer"
BODY = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
CONTROL_CLUSTER = "cg.bench.control.0"
#: min ratio to Envoy alone at the top concurrency, max gateway CPU µs/req there (issue 12 for fast)
BARS = {"http": (0.30, 100.0), "grpc": (0.18, None), "fast": (0.45, 50.0)}

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
response_headers: true
routes:
  - name: bench
    match: {{model: bench, methods: [POST]}}
    cohorts: {{unit: {{claim: sub}}, salt: bench}}
    residency: {{source: {{claim: residency}}, default_region: eu}}
    variants:
      - {{name: control, weight: 90, backends: [{{url: "http://127.0.0.1:{port}", region: eu}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "http://127.0.0.1:{port}", region: eu}}]}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of ``pid`` and its live children (a gateway's parent and its workers)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


# ------------------------------------------------------------------------------ the parts


def start_upstream(work: Path) -> tuple[EnvoyProcess, int]:
    """A static upstream: Envoy answering every request with a fixed 200 (direct_response)."""
    port, admin = free_port(), work / "upstream-admin.sock"
    config = {
        "admin": {"address": {"pipe": {"path": str(admin), "mode": 0o600}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "upstream",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": '{"outputs":[]}'},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters."
                                                    "http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }
    path = work / "upstream.yaml"
    path.write_text(yaml.safe_dump(config))
    files = EnvoyFiles(path, path, port, admin_port=None, admin_socket=admin)
    envoy = EnvoyProcess(files, log_path=work / "upstream.log", concurrency=1)
    envoy.__enter__()
    return envoy, port


def patch_bootstrap(path: Path, *, alone: bool, client_cert: bool = False) -> None:
    """Client certificate optional unless ``client_cert`` (load generators cannot send one);
    ``alone``: no ext_proc at all."""
    doc = yaml.safe_load(path.read_text())
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            if not client_cert:
                chain["transport_socket"]["typed_config"]["require_client_certificate"] = False
            if not alone:
                continue
            hcm = chain["filters"][0]["typed_config"]
            hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
            for vhost in hcm["route_config"]["virtual_hosts"]:
                for route in vhost["routes"]:
                    action = route["route"]
                    action.pop("cluster_header", None)
                    action.pop("request_mirror_policies", None)
                    action["cluster"] = CONTROL_CLUSTER
    path.write_text(yaml.safe_dump(doc))


class Gateway:
    def __init__(self, policy: Path, sock: Path, transport: str, server: str, work: Path, workers: int = 1) -> None:
        tag = f"{transport}-{server}-w{workers}"
        self.cmd = [
            sys.executable, "-m", "cohortgate.cli", "gateway", "--policy", str(policy),
            "--transport", transport, "--grpc-server", server, "--listen", f"uds:{sock}",
            "--audit-log", str(work / f"audit-{tag}.jsonl"), "--workers", str(workers),
        ]  # fmt: skip
        self.log = work / f"gateway-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gateway:
        env = {**os.environ, "COHORTGATE_UNIT_SALT": "bench", "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + 180  # workers import the gateway on a busy machine
        while b"gateway ready" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------ load


@dataclass
class Result:
    """One measured slot: a setup at a concurrency, in one round."""

    setup: str
    concurrency: int
    round: int
    rps: float
    requests: int
    failed: int
    non_2xx: int
    p50_ms: float
    p99_ms: float
    gateway_cpu_us: float | None
    envoy_cpu_us: float
    ratio: float | None = None  # to Envoy alone, same concurrency, same round


def h2load(port: int, token: str, concurrency: int, duration: float, work: Path, *, threads: int) -> dict[str, Any]:
    body = work / "body.json"
    body.write_bytes(BODY)
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = [
        "h2load", "--h1", "-c", str(concurrency), "-t", str(threads), "-D", f"{max(1, round(duration))}",
        "-d", str(body), "-H", "content-type: application/json", "-H", f"authorization: Bearer {token}",
        "--log-file", str(log), f"https://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    stats: dict[str, Any] = {"stdout": out + run.stderr}
    if not log.exists():
        raise RuntimeError(f"h2load failed: {run.stderr.strip() or out[-500:]}")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            stats["rps"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = dict(reversed(p.strip().split(" ", 1)) for p in line[len("requests:") :].split(","))
            stats["done"] = int(parts["done"])
            stats["succeeded"] = int(parts["succeeded"])
            stats["failed"] = int(parts["failed"]) + int(parts.get("errored", 0)) + int(parts.get("timeout", 0))
        elif line.startswith("status codes:"):
            codes = dict(reversed(p.strip().split(" ", 1)) for p in line[len("status codes:") :].split(","))
            stats["non_2xx"] = sum(int(v) for k, v in codes.items() if k != "2xx")
    durations = sorted(int(row.split("\t")[2]) for row in log.read_text().splitlines() if row.count("\t") >= 2)
    if durations:
        stats["p50_ms"] = durations[len(durations) // 2] / 1000
        stats["p99_ms"] = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000
    return stats


@dataclass
class Setup:
    name: str
    envoy: EnvoyProcess
    gateway_pid: int | None


def measure(setup: Setup, concurrency: int, round_: int, token: str, args: argparse.Namespace, work: Path) -> Result:
    gw0 = cpu_seconds(setup.gateway_pid) if setup.gateway_pid else 0.0
    ev0 = cpu_seconds(setup.envoy.pid)  # type: ignore[arg-type]
    stats = h2load(setup.envoy.listen_port, token, concurrency, args.duration, work, threads=args.h2load_threads)
    gw1 = cpu_seconds(setup.gateway_pid) if setup.gateway_pid else 0.0
    ev1 = cpu_seconds(setup.envoy.pid)  # type: ignore[arg-type]
    done = max(1, stats.get("done", 0))
    r = Result(
        setup=setup.name,
        concurrency=concurrency,
        round=round_,
        rps=stats.get("rps", 0.0),
        requests=stats.get("done", 0),
        failed=stats.get("failed", -1),
        non_2xx=stats.get("non_2xx", -1),
        p50_ms=stats.get("p50_ms", float("nan")),
        p99_ms=stats.get("p99_ms", float("nan")),
        gateway_cpu_us=(gw1 - gw0) / done * 1e6 if setup.gateway_pid else None,
        envoy_cpu_us=(ev1 - ev0) / done * 1e6,
    )
    print(f"  round {round_} {setup.name:<14} c{concurrency:<3} {r.rps:>7.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
          f"p99 {r.p99_ms:6.2f} ms" + (f"  gateway {r.gateway_cpu_us:6.1f} µs/req" if setup.gateway_pid else ""),
          flush=True)  # fmt: skip
    if r.failed or r.non_2xx:
        print(f"    WARNING: {r.failed} failed, {r.non_2xx} non-2xx\n{stats['stdout'][-800:]}", flush=True)
    return r


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def envoy_for(
    setup: str,
    transport: str,
    policy_path: Path,
    certs: pki.CertPaths,
    sock: Path,
    work: Path,
    concurrency: int,
    *,
    guards: bool = True,
) -> EnvoyProcess:
    """``guards=False``: without the body limit (body_size_limit, buffer route) and with the route's
    Authorization kept (no upstream header filter), to measure what those cost Envoy."""
    out = work / f"envoy-{setup}"
    policy = load_policy(policy_path)
    if not guards:
        kept = policy_path.with_name("policy-unguarded.yaml")
        text = policy_path.read_text()
        kept.write_text(text.replace("    residency:", "    forward_authorization: true\n    residency:"))
        policy = load_policy(kept)
    files = render(
        policy,
        certs=certs,
        out_dir=out,
        processor=ProcessorAddress(uds=str(sock)),
        transport=transport,  # type: ignore[arg-type]
        listen_port=free_port(),
        admin_socket=out / "admin.sock",
        max_request_bytes=None if not guards else MAX_REQUEST_BYTES,
    )
    patch_bootstrap(files.bootstrap, alone=setup.startswith("envoy-alone"))
    envoy = EnvoyProcess(files, log_path=out / "envoy.log", concurrency=concurrency)
    envoy.__enter__()
    return envoy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measured slot (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per setup (default 2)")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[16, 64])
    parser.add_argument("--transports", type=lambda s: s.split(","), default=["grpc", "http", "fast"])
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    parser.add_argument("--h2load-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every slot's result here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--unguarded",
        action="store_true",
        help="add Envoy alone without the body limit and the Authorization filter, to measure their cost",
    )
    parser.add_argument("--secured", action="store_true", help="the secured path: see the module doc")
    parser.add_argument("--workers", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2])
    parser.add_argument("--users", type=int, default=2000, help="distinct users' tokens (--secured; default 2000)")
    args = parser.parse_args()
    if args.secured:
        return secured_main(args)
    if shutil.which("h2load") is None:
        print("h2load is not on PATH (apt-get install nghttp2-client)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="cohortgate-bench-"))
    certs = pki.init_certs(work / "certs", clients=())
    token = pki.mint_token(certs, "bench-user", residency="eu", ttl_s=24 * 3600)
    print(f"cohortgate gateway benchmark: {os.cpu_count()} CPUs, Envoy --concurrency {args.envoy_concurrency}, "
          f"h2load --h1 -t {args.h2load_threads}, {args.rounds} rounds x {args.duration:g}s slots")  # fmt: skip
    print("load: HTTP/1.1 over TLS, keep-alive, POST with a valid bearer token (cached verification);")
    print("      client certificate optional on the listener (h2load cannot present one), policy without")
    print("      an identity rule; upstream: a second Envoy with a static direct_response; audit log on.")
    print("      Every setup runs side by side; slots are interleaved round by round, so a noisy")
    print("      neighbour hits all setups alike. Ratios are per round, to Envoy alone in that round.")

    upstream, upstream_port = start_upstream(work)
    policy_path = work / "policy.yaml"
    policy_path.write_text(POLICY.format(jwks=certs.jwks, port=upstream_port))
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.callback(upstream.stop)
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        setups = []
        envoy = envoy_for("envoy-alone", "grpc", policy_path, certs, work / "alone.sock", work, args.envoy_concurrency)
        stack.callback(envoy.stop)
        setups.append(Setup("envoy-alone", envoy, None))
        if args.unguarded:
            envoy = envoy_for(
                "envoy-alone-unguarded", "grpc", policy_path, certs, work / "alone.sock", work,
                args.envoy_concurrency, guards=False,
            )  # fmt: skip
            stack.callback(envoy.stop)
            setups.append(Setup("envoy-alone-unguarded", envoy, None))
        for name in args.transports:
            transport, server = ("grpc", "fast") if name == "fast" else (name, "grpcio")
            sock = work / f"run-{name}" / "processor.sock"
            gateway = stack.enter_context(Gateway(policy_path, sock, transport, server, work))
            envoy = envoy_for(name, transport, policy_path, certs, sock, work, args.envoy_concurrency)
            stack.callback(envoy.stop)
            assert gateway.proc is not None
            setups.append(Setup(f"gateway-{name}", envoy, gateway.proc.pid))
        for setup in setups:  # warm caches and connection pools
            h2load(setup.envoy.listen_port, token, 16, args.warmup, work, threads=args.h2load_threads)
        for round_ in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                for setup in setups:
                    results.append(measure(setup, concurrency, round_, token, args, work))

    alone = {(r.concurrency, r.round): r.rps for r in results if r.setup == "envoy-alone"}
    for r in results:
        base = alone.get((r.concurrency, r.round))
        r.ratio = r.rps / base if base else None
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return report(results, args)


def report(results: list[Result], args: argparse.Namespace) -> int:
    """Median (min-max) over rounds per setup and concurrency, then the bars."""
    rows: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = {}
    for key in dict.fromkeys((r.setup, r.concurrency) for r in results):
        slots = [r for r in results if (r.setup, r.concurrency) == key]
        row = {m: median_and_range([getattr(r, m) for r in slots]) for m in ("rps", "p50_ms", "p99_ms", "envoy_cpu_us")}
        if slots[0].ratio is not None:
            row["ratio"] = median_and_range([r.ratio for r in slots])  # type: ignore[misc]
        if slots[0].gateway_cpu_us is not None:
            row["gateway_cpu_us"] = median_and_range([r.gateway_cpu_us for r in slots])  # type: ignore[misc]
        row["errors"] = (sum(r.failed + r.non_2xx for r in slots),) * 3  # type: ignore[assignment]
        rows[key] = row

    def cell(row: dict, metric: str, fmt: str) -> str:
        if metric not in row:
            return "-"
        mid, lo, hi = row[metric]
        return f"{mid:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"

    print(f"\nmedian (min-max) over {args.rounds} rounds\n")
    print("| setup | conc | req/s | vs Envoy alone | p50 ms | p99 ms | gateway CPU µs/req | Envoy CPU µs/req | errs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (setup, conc), row in rows.items():
        ratio = "-" if "ratio" not in row or setup == "envoy-alone" else (
            f"{row['ratio'][0]:.0%} ({row['ratio'][1]:.0%}-{row['ratio'][2]:.0%})"
        )  # fmt: skip
        print(f"| {setup} | {conc} | {cell(row, 'rps', '.0f')} | {ratio} | {cell(row, 'p50_ms', '.2f')} | "
              f"{cell(row, 'p99_ms', '.2f')} | {cell(row, 'gateway_cpu_us', '.1f')} | "
              f"{cell(row, 'envoy_cpu_us', '.1f')} | {int(row['errors'][0])} |")  # fmt: skip
    print()
    ok = True
    top, low = max(args.concurrency), min(args.concurrency)
    for name, (min_ratio, max_cpu) in BARS.items():
        row = rows.get((f"gateway-{name}", top))
        if row is None:
            continue
        ratio, cpu = row["ratio"][0], row["gateway_cpu_us"][0]
        passed = ratio >= min_ratio and (max_cpu is None or cpu <= max_cpu)
        ok &= passed
        cpu_bar = f" and <= {max_cpu:g} µs/req" if max_cpu else ""
        print(f"bar {name}: >= {min_ratio:.0%} of Envoy alone at c{top}{cpu_bar}: "
              f"{ratio:.0%}, {cpu:.1f} µs/req -> {'PASS' if passed else 'FAIL'}")  # fmt: skip
    fast, grpcio = rows.get(("gateway-fast", low)), rows.get(("gateway-grpc", low))
    if fast is not None and grpcio is not None:
        passed = fast["p99_ms"][0] <= grpcio["p99_ms"][0]
        ok &= passed
        print(f"bar fast: p99 at c{low} no worse than grpcio's: {fast['p99_ms'][0]:.2f} ms vs "
              f"{grpcio['p99_ms'][0]:.2f} ms -> {'PASS' if passed else 'FAIL'}")  # fmt: skip
    return 0 if ok else 1


# ------------------------------------------------------------------------------ the secured path (--secured)

SECURED_AUTH = """    auth:
      identities: ["spiffe://{td}/app-*"]
      scopes: [predict]
"""
WRK_SCRIPT = """
local tokens = {{}}
for line in io.lines("{tokens}") do tokens[#tokens + 1] = line end
local i = math.random(#tokens)
local body = '{body}'
request = function()
  i = i % #tokens + 1
  return wrk.format("POST", "{path}", {{["content-type"] = "application/json",
    ["authorization"] = "Bearer " .. tokens[i]}}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %f %f\\n", summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""


def client_envoy(front_port: int, certs: pki.CertPaths, name: str, work: Path, concurrency: int) -> EnvoyProcess:
    """A client-side Envoy: plaintext HTTP/1.1 in (from wrk), mTLS out with the app's certificate.

    HTTP/1.1 upstream, so the front Envoy sees as many connections as wrk opens and balances them
    over its workers (one HTTP/2 connection would pin one front worker)."""
    cert, key = certs.clients["app-bench"]
    port, admin = free_port(), work / f"client-{name}-admin.sock"
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ],
                "validation_context": {"trusted_ca": {"filename": str(certs.ca_cert)}},
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "client",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "front"}}]}
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    config = {
        "admin": {"address": {"pipe": {"path": str(admin), "mode": 0o600}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "client",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "front",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "front",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": front_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "transport_socket": tls,
                    "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_requests": 100000}]},
                }
            ],
        },
    }
    path = work / f"client-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    files = EnvoyFiles(path, path, port, admin_port=None, admin_socket=admin)
    envoy = EnvoyProcess(files, log_path=work / f"client-{name}.log", concurrency=concurrency)
    envoy.__enter__()
    return envoy


def wrk(port: int, script: Path, concurrency: int, duration: float, threads: int) -> dict[str, Any]:
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
           "-s", str(script), f"http://127.0.0.1:{port}{PATH}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            n, errors, status, duration_us, p50, p99 = line.split()[1:]
            return {
                "done": int(n),
                "failed": int(errors),
                "non_2xx": int(status),
                "rps": int(n) / (int(duration_us) / 1e6),
                "p50_ms": float(p50) / 1000,
                "p99_ms": float(p99) / 1000,
            }
    raise RuntimeError(f"wrk failed: {run.stderr.strip() or run.stdout[-500:]}")


@dataclass
class SecuredSetup:
    name: str
    workers: int  # front Envoy --concurrency (and gateway workers when gateway_pid)
    client: EnvoyProcess
    front: EnvoyProcess
    gateway_pid: int | None


def secured_main(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cohortgate-bench-secured-"))
    certs = pki.init_certs(work / "certs", clients=("app-bench",))
    tokens = work / "tokens.txt"
    tokens.write_text(
        "\n".join(
            pki.mint_token(
                certs, f"user-{i:05d}", residency="eu" if i % 2 else "us", scopes=["predict"], ttl_s=24 * 3600
            )
            for i in range(args.users)
        )
        + "\n"
    )
    script = work / "wrk.lua"
    script.write_text(WRK_SCRIPT.format(tokens=tokens, body=BODY.decode(), path=PATH))
    load = os.getloadavg()
    print(f"cohortgate gateway benchmark, secured path: {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {args.rounds} rounds x {args.duration:g}s slots")  # fmt: skip
    print(
        f"load: wrk -t {args.h2load_threads} (HTTP/1.1) cycling {args.users} users' tokens (eu and us) -> client-side"
    )
    print("      Envoy presenting app-bench's certificate -> front Envoy requiring it (mTLS) -> fast processor")
    print("      with an identity rule and a scope rule; audit log on; upstream: a static direct_response Envoy.")
    print("      Envoy alone: the same two Envoys without ext_proc. Front Envoy --concurrency = gateway workers.")
    upstream, upstream_port = start_upstream(work)
    text = POLICY.format(jwks=certs.jwks, port=upstream_port)
    text = text.replace("    cohorts:", SECURED_AUTH.format(td=certs.trust_domain) + "    cohorts:")
    text = text.replace("default_region: eu}", "allowed_regions: [eu, us], default_region: eu}")
    us = f'{{url: "http://127.0.0.1:{upstream_port}", region: us}}'
    text = text.replace("region: eu}]}", f"region: eu}}, {us}]}}")  # eu users go to eu, us users to us
    policy_path = work / "policy.yaml"
    policy_path.write_text(text)
    load_policy(policy_path)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.callback(upstream.stop)
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        setups: list[SecuredSetup] = []
        for n in args.workers:
            for alone in (True, False):
                name = f"envoy-alone-c{n}" if alone else f"gateway-w{n}"
                sock = work / f"run-{name}" / "processor.sock"
                pid = None
                if not alone:
                    gateway = stack.enter_context(Gateway(policy_path, sock, "grpc", "fast", work, workers=n))
                    assert gateway.proc is not None
                    pid = gateway.proc.pid
                out = work / f"envoy-{name}"
                files = render(
                    load_policy(policy_path), certs=certs, out_dir=out,
                    processor=ProcessorAddress(uds=str(sock), workers=n), transport="grpc",
                    listen_port=free_port(), admin_socket=out / "admin.sock",
                )  # fmt: skip
                patch_bootstrap(files.bootstrap, alone=alone, client_cert=True)
                front = EnvoyProcess(files, log_path=out / "envoy.log", concurrency=n)
                front.__enter__()
                stack.callback(front.stop)
                client = client_envoy(front.listen_port, certs, name, work, concurrency=n)
                stack.callback(client.stop)
                setups.append(SecuredSetup(name, n, client, front, pid))
        for setup in setups:  # warm: every user's token verified once, connection pools open
            wrk(setup.client.listen_port, script, 16, max(args.warmup, 2.0), args.h2load_threads)
        for round_ in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                for setup in setups:
                    results.append(measure_secured(setup, concurrency, round_, script, args))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    alone = {(r.setup.split("-c")[-1], r.concurrency, r.round): r.rps for r in results if r.setup.startswith("envoy")}
    for r in results:
        if r.setup.startswith("gateway-w"):
            base = alone.get((r.setup.removeprefix("gateway-w"), r.concurrency, r.round))
            r.ratio = r.rps / base if base else None
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    report(results, args)
    for concurrency in args.concurrency:
        by = {
            w: statistics.median(r.rps for r in results if r.setup == f"gateway-w{w}" and r.concurrency == concurrency)
            for w in args.workers
        }
        if 1 in by and len(by) > 1:
            print(f"c{concurrency} scaling (gateway req/s vs 1 worker): "
                  + ", ".join(f"{w} workers x{v / by[1]:.2f}" for w, v in by.items()))  # fmt: skip
    return 0


def measure_secured(
    setup: SecuredSetup, concurrency: int, round_: int, script: Path, args: argparse.Namespace
) -> Result:
    gw0 = tree_cpu_seconds(setup.gateway_pid) if setup.gateway_pid else 0.0
    ev0 = cpu_seconds(setup.front.pid)  # type: ignore[arg-type]
    stats = wrk(setup.client.listen_port, script, concurrency, args.duration, args.h2load_threads)
    gw1 = tree_cpu_seconds(setup.gateway_pid) if setup.gateway_pid else 0.0
    ev1 = cpu_seconds(setup.front.pid)  # type: ignore[arg-type]
    done = max(1, stats["done"])
    r = Result(
        setup=setup.name, concurrency=concurrency, round=round_, rps=stats["rps"], requests=stats["done"],
        failed=stats["failed"], non_2xx=stats["non_2xx"], p50_ms=stats["p50_ms"], p99_ms=stats["p99_ms"],
        gateway_cpu_us=(gw1 - gw0) / done * 1e6 if setup.gateway_pid else None, envoy_cpu_us=(ev1 - ev0) / done * 1e6,
    )  # fmt: skip
    print(f"  round {round_} {setup.name:<16} c{concurrency:<3} {r.rps:>7.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
          f"p99 {r.p99_ms:6.2f} ms" + (f"  gateway {r.gateway_cpu_us:6.1f} µs/req" if setup.gateway_pid else "")
          + (f"  ERRORS {r.failed} failed, {r.non_2xx} non-2xx" if r.failed or r.non_2xx else ""),
          flush=True)  # fmt: skip
    return r


if __name__ == "__main__":
    sys.exit(main())
