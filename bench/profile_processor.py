"""The processor's CPU per fully decided request on the secured path, in-process (issue 25).

What one request costs the processor with the transport left out: decode Envoy's request-headers
message (bytes, as the fast HTTP/2 server receives it) and answer it in bytes with
`StreamProcessor.handle_encoded`, as the fast server's `GrpcStream.answer` does.
The messages are shaped like the front Envoy's on the secured path: a client certificate's URI SAN
and subject, ``connection.mtls``, ``source.address``, ``request.id``, the headers a client and Envoy
send, and one of ``--users`` distinct users' bearer tokens (eu and us), cycled; the policy has an
identity rule, a scope rule, residency eu/us and the audit trail on (to a file). Every token is
verified once before timing, as a warm gateway has them cached.

Reported: process CPU µs per request (every thread: the audit writer's formatting and writing is
included; the writer thread's own share is printed beside it), median (min-max) of ``--repeats``
passes over every user, and with ``--profile`` the top functions by own time from cProfile (one
more pass).

``--against REF`` is the A/B mode: the tree at git ``REF`` (A, exported with ``git archive`` to a
temporary directory) and this working tree (B) each run this measurement in a fresh process, in
turn, ``--rounds`` times (A, B, A, B, ...), so that a neighbour's burst of load falls on both alike.
Each round prints both medians and B ÷ A; the summary gives the median and range of each over the
rounds. A's own copy of this script is what runs for A (any version that prints the
"µs of CPU per decided request" line).

    python bench/profile_processor.py                  # 2 000 users, 5 passes
    python bench/profile_processor.py --profile        # and where the time goes
    python bench/profile_processor.py --against HEAD~3 --rounds 6   # A/B, interleaved
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cohortgate.deploy import pki  # noqa: E402

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
    auth:
      identities: ["spiffe://{td}/app-*"]
      scopes: [predict]
    cohorts: {{unit: {{claim: sub}}, salt: bench}}
    residency: {{source: {{claim: residency}}, allowed_regions: [eu, us], default_region: eu}}
    variants:
      - {{name: control, weight: 90, backends: [{{url: "http://127.0.0.1:9001", region: eu}},
                                                {{url: "http://127.0.0.1:9002", region: us}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "http://127.0.0.1:9003", region: eu}},
                                               {{url: "http://127.0.0.1:9004", region: us}}]}}
"""


def envoy_message(token: str, td: str) -> bytes:
    """A request-headers ProcessingRequest as the rendered front Envoy sends it on the secured path."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from cohortgate.deploy.envoy import REQUEST_ATTRIBUTES

    req = pb.ProcessingRequest()
    rid = str(uuid.uuid4())
    for key, value in [
        (":authority", "localhost:8443"),
        (":path", "/v2/models/bench/infer"),
        (":method", "POST"),
        (":scheme", "https"),
        ("content-type", "application/json"),
        ("content-length", "74"),
        ("authorization", f"Bearer {token}"),
        ("user-agent", "wrk"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", rid),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]:
        h = req.request_headers.headers.headers.add()
        h.key = key
        h.raw_value = value.encode()
    req.request_headers.end_of_stream = False
    attrs = struct_pb2.Struct()
    values = {
        "connection.uri_san_peer_certificate": f"spiffe://{td}/app-bench",
        "connection.subject_peer_certificate": "CN=app-bench,O=cohortgate",
        "connection.mtls": True,
        "source.address": "127.0.0.1:53412",
        "request.id": rid,
    }
    assert set(values) == set(REQUEST_ATTRIBUTES)
    attrs.update(values)
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-audit", action="store_true", help="no audit trail: what the audit line costs")
    parser.add_argument("--profile", action="store_true", help="cProfile one more pass; print the top functions")
    parser.add_argument("--against", metavar="REF", help="A/B: the tree at git REF (A) against this one (B)")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (with --against)")
    args = parser.parse_args()
    if args.against:
        return compare(args)

    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from cohortgate.core.policy import load_policy
    from cohortgate.support.runtime import tune_collector
    from gateway.audit import AuditLog
    from gateway.extproc import Processor, ProcessorSettings, hash_unit
    from gateway.service import PolicyHolder, build_verifier

    work = Path(tempfile.mkdtemp(prefix="cohortgate-profile-"))
    certs = pki.init_certs(work / "certs", clients=("app-bench",))
    policy_path = work / "policy.yaml"
    policy_path.write_text(POLICY.format(jwks=certs.jwks, td=certs.trust_domain))
    holder = PolicyHolder(load_policy(policy_path), policy_path)
    salt = b"bench-salt"
    audit = AuditLog.open(str(work / "audit.jsonl"), lambda sub: hash_unit(salt, sub))
    engine = Processor(
        holder,
        build_verifier(holder.policy.jwt),
        ProcessorSettings(unit_salt=salt, trust_domain=certs.trust_domain),
        None if args.no_audit else audit,
    )
    messages = [
        envoy_message(
            pki.mint_token(certs, f"user-{i:05d}", residency="eu" if i % 2 else "us", scopes=["predict"], ttl_s=3600),
            certs.trust_domain,
        )
        for i in range(args.users)
    ]
    decode = pb.ProcessingRequest.FromString

    def one_pass() -> None:  # what the fast server's `GrpcStream.answer` does with each message
        for raw in messages:
            engine.new_processor().handle_encoded(decode(raw))

    one_pass()  # every token verified and cached, every unit hashed: a warm gateway
    tune_collector()  # as `gateway.service.run` does once started
    allowed = engine.stats.allowed
    assert allowed == args.users, f"only {allowed} of {args.users} allowed: {dict(engine.stats.denied)}"
    writer_clock = _thread_clock(audit)
    times, walls, writer = [], [], []
    for _ in range(args.repeats):
        audit.flush()  # the writer's backlog from the pass before is not this pass's CPU
        a0 = writer_clock()
        w0, t0 = time.perf_counter_ns(), time.process_time_ns()  # CPU of every thread: the audit writer's too
        one_pass()
        audit.flush()
        times.append((time.process_time_ns() - t0) / len(messages) / 1000)
        walls.append((time.perf_counter_ns() - w0) / len(messages) / 1000)
        writer.append((writer_clock() - a0) / len(messages) * 1e6)
    trail = "no audit trail" if args.no_audit else f"audit writer thread {statistics.median(writer):.1f} of it"
    print(f"processor, secured path, {args.users} users, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}: {statistics.median(times):.1f} µs of CPU per decided request "
          f"(min {min(times):.1f}, max {max(times):.1f}; wall {statistics.median(walls):.1f}; "
          f"{args.repeats} passes; {trail})")  # fmt: skip
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        one_pass()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    audit.close()
    return 0


def _thread_clock(audit: object) -> Callable[[], float]:
    """The CPU seconds of the audit writer thread so far (0 where the platform cannot tell)."""
    thread = getattr(audit, "_thread", None)
    try:
        clock = time.pthread_getcpuclockid(thread.ident)  # type: ignore[union-attr, arg-type]
    except (AttributeError, OSError, TypeError):
        return lambda: 0.0
    return lambda: time.clock_gettime(clock)


_FIGURE = re.compile(r"([0-9.]+) µs of CPU per decided request")


def _measure(tree: Path, args: argparse.Namespace) -> float:
    """One fresh process of ``tree``'s own copy of this script: its median µs per request."""
    cmd = [sys.executable, str(tree / "bench" / "profile_processor.py"), "--users", str(args.users)]
    cmd += ["--repeats", str(args.repeats)] + (["--no-audit"] if args.no_audit else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree).stdout
    found = _FIGURE.search(out)
    if found is None:
        raise SystemExit(f"no figure in the output of {tree}:\n{out}")
    return float(found.group(1))


def compare(args: argparse.Namespace) -> int:
    """A (git ``--against``) and B (this tree) interleaved, ``--rounds`` times."""
    work = Path(tempfile.mkdtemp(prefix="cohortgate-ab-"))
    try:
        archive = subprocess.run(["git", "archive", args.against], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(work / "a", filter="data")
        trail = "without the audit trail" if args.no_audit else "with the audit trail"
        print(f"A: {args.against}, B: this tree; {args.users} users, {args.repeats} passes a round, {trail}")
        a_all, b_all, ratios = [], [], []
        for r in range(args.rounds):
            a, b = _measure(work / "a", args), _measure(ROOT, args)
            a_all.append(a)
            b_all.append(b)
            ratios.append(b / a)
            print(
                f"round {r + 1}: load average {os.getloadavg()[0]:.1f}: A {a:.1f} µs, B {b:.1f} µs, B ÷ A {b / a:.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def spread(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"

    print(f"A {spread(a_all, '.1f')} µs; B {spread(b_all, '.1f')} µs; B ÷ A {spread(ratios, '.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
