"""``make test``: the suite as two pytest processes side by side on a 2-core machine.

Most of the time of the tests that start real processes (Envoy, sidecars, `up`) is spent waiting on
them, so the in-process tests use that time: ``-m one_at_a_time`` (``tests/conftest.py``) runs here,
its output live, while ``-m "not one_at_a_time"`` runs beside it into a file printed at the end.
Arguments go to both. The exit status is the first failure's (0 when both pass)."""

from __future__ import annotations

import subprocess
import sys
import tempfile

NO_TESTS = 5  # pytest's exit status when a half selects nothing (a path given holds only the other kind)


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *argv]
    with tempfile.TemporaryFile("w+") as out:
        beside = subprocess.Popen(
            [*pytest, "-q", "-p", "no:cacheprovider", "-m", "not one_at_a_time"], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            first = subprocess.run([*pytest, "-m", "one_at_a_time"]).returncode
        finally:
            second = beside.wait()
        out.seek(0)
        print("\n== the in-process tests (run beside the ones above) ==", flush=True)
        sys.stdout.write(out.read())
    print(f"== tests that start processes: exit {first}; in-process tests: exit {second} ==", flush=True)
    return next((rc for rc in (first, second) if rc not in (0, NO_TESTS)), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
