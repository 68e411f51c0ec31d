"""Benchmark: `cohortgate batch` rows/s on a 1 M-row Parquet file, in-process and on Spark local[2],
against bare onnxruntime on the same rows.

Writes, in a temporary directory, ``--rows`` rows (unit ``sub``, ``residency`` in eu/ae/us, an
``x-device``, 30 float feature columns ``f0..f29``) and scores them with the example policy's
``tabular`` route (three demo models; ``cohortgate models build`` first):

- ``bare``: read the file, one onnxruntime session (control's model) on all rows -- no cohorts,
  no residency, one model: the floor;
- ``assign``: only the placement (the gateway's ``decide`` per row), to show where the time goes;
- ``in-process``: ``run_pandas`` (read, place, score per backend, write scored + rejects);
- ``spark``: ``run_spark`` on ``--master`` (default local[2]), the SparkSession already started
  (its start-up is printed apart), input split into ``--files`` Parquet files.

    python bench/bench_batch.py                       # 1 M rows, all four
    python bench/bench_batch.py --rows 200000 --skip spark
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cohortgate.batch import job as batch  # noqa: E402

FEATURES = [f"f{i}" for i in range(30)]


def make_input(rows: int, files: int, out: Path) -> Path:
    import pandas as pd

    rng = np.random.default_rng(1)
    out.mkdir()
    per = -(-rows // files)
    for k in range(files):
        n = min(per, rows - k * per)
        frame = pd.DataFrame(rng.normal(0, 1, (n, 30)).astype(np.float32) * 100 + 50, columns=FEATURES)
        frame.insert(0, "sub", [f"user-{k * per + i}" for i in range(n)])
        frame.insert(1, "residency", rng.choice(np.array(["eu", "eu", "eu", "ae", "us"], dtype=object), n))
        frame.insert(2, "x-device", rng.choice(np.array(["web", "web", "app", "bot"], dtype=object), n))
        frame.to_parquet(out / f"part-{k}.parquet", index=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=4, help="Parquet files the input is split into")
    parser.add_argument("--policy", default=str(ROOT / "policies" / "example.yaml"))
    parser.add_argument("--route", default="tabular")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--skip", action="append", default=[], choices=["bare", "assign", "in-process", "spark"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import onnxruntime as ort
    import pandas as pd

    job = batch.prepare(args.policy, args.route, features=FEATURES)
    figures: dict[str, float] = {}

    def report(name: str, seconds: float) -> None:
        figures[name] = round(args.rows / seconds)
        print(f"{name:>11}: {seconds:7.1f} s  {args.rows / seconds:>10,.0f} rows/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        started = time.perf_counter()
        source = make_input(args.rows, args.files, Path(tmp) / "input")
        print(f"wrote {args.rows:,} rows in {args.files} files in {time.perf_counter() - started:.1f} s", flush=True)
        if "bare" not in args.skip:
            control = dict(job.models)[next(c for c, _ in job.models if ".control." in c)]
            s = ort.InferenceSession(control, providers=["CPUExecutionProvider"])
            started = time.perf_counter()
            x = pd.read_parquet(source, columns=FEATURES).to_numpy(dtype=np.float32)
            s.run(None, {job.input: x})
            report("bare", time.perf_counter() - started)
        if "assign" not in args.skip:
            frame = pd.read_parquet(source, columns=["sub", "residency", "x-device"])
            a = batch.assigner(job)
            started = time.perf_counter()
            a.place({c: frame[c].tolist() for c in frame.columns}, len(frame))
            report("assign", time.perf_counter() - started)
            del frame
        if "in-process" not in args.skip:
            started = time.perf_counter()
            summary = batch.run_pandas(job, source, Path(tmp) / "scored.parquet", Path(tmp) / "rejects.parquet")
            report("in-process", time.perf_counter() - started)
            print(f"             {summary}")
        if "spark" not in args.skip:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                started = time.perf_counter()
                spark = batch.session(args.master)
                spark.range(1).count()
                print(f"SparkSession {args.master} up in {time.perf_counter() - started:.1f} s", flush=True)
                started = time.perf_counter()
                summary = batch.run_spark(
                    job, str(source), str(Path(tmp) / "scored"), str(Path(tmp) / "rejects"), spark=spark
                )
                report("spark", time.perf_counter() - started)
                print(f"             {summary}")
                spark.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
