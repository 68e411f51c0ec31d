"""Plant known bugs one at a time in a scratch copy and check the suite catches each (`make test-mutants`).

A mutant is a small, realistic bug in a product file (found by a regular expression that must match
exactly the expected number of times, so a refactor that moves the code makes this script fail
loudly instead of silently testing nothing) and the test files that promise to catch it. For each
one the script copies the repository (tracked and untracked-but-not-ignored files: the code as it
is now, uncommitted work included) into a temporary directory, runs the unmutated test set once as
a baseline, then applies the mutant, runs the same tests and restores the file. A mutant whose
tests still pass *survived*: the suite does not guard that promise.

Lives in tests/ (not bench/) because it measures the tests, not the product; it is not collected
by pytest (no ``test_`` prefix) and not in CI, since it runs several test sets several times.

    python tests/mutants.py            # every mutant
    python tests/mutants.py --list     # what they are
    python tests/mutants.py alpha-doubled residency-out-of-region

Exit status: 0 when every mutant was killed, 1 when one survived, 2 when a pattern is gone or a
baseline is red (the check itself is broken).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Per pytest run; generous for a busy 2-core machine (the slowest set starts Envoy).
RUN_TIMEOUT_S = 900


class PatternGone(Exception):
    """A mutant's pattern no longer matches its file the expected number of times."""


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    pattern: str  # a regular expression (re.MULTILINE)
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str
    count: int = 1  # how many times the pattern must match

    def apply(self, text: str) -> str:
        found = len(re.findall(self.pattern, text, flags=re.MULTILINE))
        if found != self.count:
            raise PatternGone(
                f"{self.name}: /{self.pattern}/ matches {found} time(s) in {self.path}, expected {self.count}; "
                "the code moved: update the mutant in tests/mutants.py"
            )
        return re.sub(self.pattern, self.replacement, text, flags=re.MULTILINE)


MUTANTS = (
    Mutant(
        "api-auth-bypass",
        "cohortgate/controller/api.py",
        r"if request\.path not in OPEN_PATHS and not _authorized\(request\)"
        r" and not outcomes_api\.gateway_pass\(request\):",
        'if request.path not in OPEN_PATHS and request.method == "GET" and not _authorized(request) '
        "and not outcomes_api.gateway_pass(request):",
        ("tests/controller/test_api.py", "tests/dashboard/test_app.py"),
        "the controller API lets POST /actions/* and /reports through without the admin token",
    ),
    Mutant(
        "alpha-doubled",
        "cohortgate/controller/judge.py",
        r"harm = alpha / 2\b",
        "harm = alpha * 2",
        ("tests/controller/test_judge.py", "tests/controller/test_stats.py", "tests/controller/test_loop.py"),
        "the harm tests get 2*alpha instead of alpha/2: a 4x higher false-rollback rate",
    ),
    Mutant(
        "residency-out-of-region",
        "cohortgate/core/decide.py",
        r"backends = variant\.by_region\.get\(region\)$",
        "backends = variant.by_region.get(region) or next(iter(variant.by_region.values()), None)",
        ("tests/core/test_decide.py", "tests/gateway/test_extproc.py"),
        "a variant without an in-region backend is served from another region instead of falling back",
    ),
    Mutant(
        "residency-fallback-refused",
        "cohortgate/core/decide.py",
        r"control_backends = route\.control\.by_region\.get\(region\) if route\.fallback_control else None",
        "control_backends = None",
        ("tests/core/test_decide.py",),
        "on_missing_region: fallback_control answers 451 instead of serving control's in-region backend",
    ),
    Mutant(
        "client-headers-kept",
        "gateway/extproc.py",
        r"elif key\.startswith\(HEADER_PREFIX\) or key in STRIPPED_EXACT:",
        "elif key in STRIPPED_EXACT:",
        ("tests/gateway/test_extproc.py",),
        "a client's own x-cohortgate-* headers (cluster, shadow slots, region) reach Envoy's routing",
        count=2,  # the protobuf and the JSON paths
    ),
    Mutant(
        "unit-hash-unkeyed",
        "gateway/extproc.py",
        r"return hmac\.new\(salt, unit\.encode\(\), hashlib\.sha256\)\.hexdigest\(\)\[:16\]",
        "return hashlib.sha256(unit.encode()).hexdigest()[:16]",
        ("tests/gateway/test_extproc.py",),
        "the cohort unit leaves the gateway as a plain SHA-256, linkable across deployments (no secret salt)",
    ),
    Mutant(
        "batch-delay-from-newest",
        "sidecar/batching.py",
        r"remaining = queue\[0\]\.enqueued \+",
        "remaining = queue[-1].enqueued +",
        ("tests/sidecar/test_sidecar_batching.py",),
        "the batching delay restarts with every arrival, so a steady trickle starves the oldest request",
    ),
    Mutant(
        "client-cert-optional",
        "cohortgate/deploy/envoy/bootstrap.py",
        r"require_client_certificate=True,",
        "require_client_certificate=False,",
        (
            "tests/integration/test_dataplane.py",
            "tests/deploy/test_envoy.py",
            "-k",
            "tls_requires_a_client_certificate or mirror_slots_mirror_only",
        ),
        "Envoy accepts TLS clients without a certificate (mTLS not enforced at the edge)",
    ),
)


# ------------------------------------------------------------------------------ running


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked, and untracked but not ignored), never .git or .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def run_tests(where: Path, args: tuple[str, ...]) -> tuple[bool, float, str]:
    """(passed, seconds, last lines): pytest in ``where`` with its modules first on every path."""
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, f"timed out after {RUN_TIMEOUT_S}s"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode == 0, time.monotonic() - started, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:26} {m.path}\n{'':26} {m.why}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]

    scratch = Path(tempfile.mkdtemp(prefix="cohortgate-mutants-"))
    print(f"scratch copy: {scratch}", flush=True)
    results: list[tuple[str, str, str]] = []
    try:
        scratch_copy(scratch)
        baselines: dict[tuple[str, ...], tuple[bool, str]] = {}
        for m in chosen:
            target = scratch / m.path
            try:
                original = target.read_text()
                mutated = m.apply(original)
            except (PatternGone, FileNotFoundError) as exc:
                results.append((m.name, "PATTERN GONE", str(exc)))
                print(f"  {m.name}: PATTERN GONE", flush=True)
                continue
            if m.tests not in baselines:
                ok, secs, tail = run_tests(scratch, m.tests)
                baselines[m.tests] = (ok, tail)
                print(f"  baseline {' '.join(m.tests)}: {'green' if ok else 'RED'} ({secs:.0f}s)", flush=True)
            ok, tail = baselines[m.tests]
            if not ok:
                results.append((m.name, "BASELINE RED", tail))
                continue
            target.write_text(mutated)
            try:
                passed, secs, tail = run_tests(scratch, m.tests)
            finally:
                target.write_text(original)
            verdict = "SURVIVED" if passed else "killed"
            results.append((m.name, verdict, tail if passed else tail.splitlines()[-1] if tail else ""))
            print(f"  {m.name}: {verdict} ({secs:.0f}s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print("\nmutant                      verdict        tests said")
    for name, verdict, note in results:
        print(f"{name:27} {verdict:14} {note.splitlines()[-1] if note else ''}")
    survivors = [n for n, v, _ in results if v == "SURVIVED"]
    broken = [n for n, v, _ in results if v in {"PATTERN GONE", "BASELINE RED"}]
    print(f"\n{len(results) - len(survivors) - len(broken)} killed, {len(survivors)} survived"
          + (f" ({', '.join(survivors)})" if survivors else "")
          + (f", {len(broken)} could not be judged ({', '.join(broken)})" if broken else ""))  # fmt: skip
    return 2 if broken else 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
