"""A warm spare for `cohortgate up`'s restarts: a Python process that has already imported a child's
heavy modules (grpc, onnxruntime, aiohttp, pydantic: seconds on a busy machine) and waits for one job.

``python -m cohortgate.local.warm MODULE...`` imports the modules, says ``warm`` on stdout, then reads
one JSON line on stdin:
``{"args": [...], "env": {...}, "log": PATH}``. It points stdout and stderr at the log, takes the
environment, and runs ``cohortgate ARGS`` in-process: the same command a cold start would run, minus
the imports. End of input without a job: it exits 0 (the supervisor closed it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys

CLI = "cohortgate.cli"


def main() -> int:
    for name in sys.argv[1:]:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # The command is named, not imported (like the ``-m cohortgate.cli`` of a cold start): local sits
    # below the CLI in the layers, and a launcher does not depend on what it launches.
    importlib.import_module(CLI).build_parser()  # imports every command module, as the job's parse will
    # The supervisor's cue: a restart handed over now skips every import. Unbuffered, and a closed pipe is
    # no reason to stop: a job handed over while the imports ran is waiting on stdin already.
    with contextlib.suppress(BrokenPipeError):
        os.write(1, b"warm\n")
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    job = json.loads(line)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = ["cohortgate", *job["args"]]
    runpy.run_module(CLI, run_name="__main__", alter_sys=True)  # exits with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
