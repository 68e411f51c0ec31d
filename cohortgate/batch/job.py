"""The batch job: prepare once on the driver, score frames anywhere (pandas in-process, or Spark).

`score_frame` is the whole per-row work and the only one: the in-process run calls it on the file,
Spark calls it on every partition (`mapInPandas`), so the two modes cannot drift apart. A `Job` is
plain picklable data (the policy's text, not the compiled policy, whose mappings do not pickle);
each worker compiles it once and caches it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cohortgate.batch import score
from cohortgate.batch.assign import Assigner, AssignError
from cohortgate.core.errors import CohortgateError, PolicyError
from cohortgate.core.policy import Policy, load_policy, parse_policy

# Columns the job adds. Scored rows carry ASSIGNED and the model's outputs; rejected rows carry
# REJECTED (the gateway's denial code, its HTTP status and sentence) and nothing scored.
ASSIGNED = (("variant", "str"), ("bucket", "Int64"), ("assignment", "str"), ("region", "str"), ("fallback", "boolean"))
REJECTED = (("reason", "str"), ("status", "Int64"), ("message", "str"))


class BatchError(CohortgateError):
    """The job cannot run as asked: unknown route, a variant without a local model, bad columns."""


@dataclass(frozen=True, slots=True)
class Job:
    policy_text: bytes = field(repr=False)
    policy_file: str
    route: str
    models: tuple[tuple[str, str], ...]  # backend cluster -> model file (on Spark: the shipped name)
    outputs: tuple[score.Output, ...]
    input: str  # the model's input tensor name
    features: tuple[str, ...] | None  # scalar columns in order; None: one array column named `input`
    weights: tuple[tuple[str, int], ...] = ()
    shadows: tuple[str, ...] = ()  # shadow names scored (empty: none asked)
    shipped: bool = False
    threads: int = 0

    @property
    def digest(self) -> str:
        return hashlib.sha256(
            repr((self.policy_text, self.route, self.weights, bool(self.shadows))).encode()
        ).hexdigest()

    def columns(self) -> list[tuple[str, str, int]]:
        """(name, dtype, rank) of every column the job adds, in order."""
        cols = [(n, t, 1) for n, t in ASSIGNED]
        cols += [(o.name, o.dtype, o.rank) for o in self.outputs]
        cols += [(f"shadow_{s}_{o.name}", o.dtype, o.rank) for s in self.shadows for o in self.outputs]
        cols += [(n, t, 1) for n, t in REJECTED]
        return cols


@dataclass(frozen=True, slots=True)
class Summary:
    rows: int
    scored: int
    rejected: dict[str, int]  # by denial code
    by_variant: dict[str, int]


def prepare(
    policy_path: str | Path,
    route: str,
    *,
    weights: dict[str, int] | None = None,
    shadows: bool = False,
    features: list[str] | None = None,
) -> Job:
    """Validate everything a run needs before touching data: route, weights, local models, outputs."""
    path = Path(policy_path)
    try:
        text = path.read_bytes()
        policy = load_policy(path)
    except (OSError, PolicyError) as exc:
        raise BatchError(str(exc)) from None
    assigner = _build(policy, route, weights, shadows)
    r = assigner.route
    backends = [(v.name, b) for v in r.variants for b in v.backends] + [
        (s.name, b) for s in r.shadows for b in s.backends
    ]
    models: dict[str, str] = {}
    for owner, b in backends:
        if b.model is None or "://" in b.model:
            raise BatchError(
                f"route {route!r}: {owner!r} backend {b.url} ({b.region}) has no local model file "
                f"(model: {b.model or 'unset'}); batch scoring runs the .onnx file the sidecar serves"
            )
        if not Path(b.model).is_file():
            raise BatchError(f"route {route!r}: model file {b.model} of {owner!r} does not exist")
        models[b.cluster] = b.model
    try:
        sigs = {p: score.signature(p) for p in sorted(set(models.values()))}
    except score.ScoreError as exc:
        raise BatchError(str(exc)) from None
    first = next(iter(sigs.values()))
    for p, sig in sigs.items():
        if sig.outputs != first.outputs or sig.input != first.input:
            raise BatchError(f"model {p} has another signature than the route's others: every variant must agree")
    return Job(
        policy_text=text,
        policy_file=str(path.resolve()),
        route=route,
        models=tuple(sorted(models.items())),
        outputs=first.outputs,
        input=first.input,
        features=tuple(features) if features else None,
        weights=tuple(sorted((weights or {}).items())),
        shadows=tuple(s.name for s in r.shadows),
    )


def _build(policy: Policy, route: str, weights: dict[str, int] | None, shadows: bool) -> Assigner:
    try:
        return Assigner(policy, route, weights=weights, shadows=shadows)
    except AssignError as exc:
        raise BatchError(str(exc)) from None


_ASSIGNERS: dict[str, Assigner] = {}


def assigner(job: Job) -> Assigner:
    """The job's assigner, compiled once per process from the policy text."""
    found = _ASSIGNERS.get(job.digest)
    if found is None:
        policy = parse_policy(job.policy_text, job.policy_file, Path(job.policy_file).parent)
        found = _ASSIGNERS[job.digest] = _build(policy, job.route, dict(job.weights), bool(job.shadows))
    return found


def _model_path(job: Job, cluster: str) -> str:
    name = dict(job.models)[cluster]
    if job.shipped:
        from pyspark import SparkFiles

        return SparkFiles.get(name)
    return name


def _matrix(job: Job, frame: Any) -> np.ndarray:
    if job.features is not None:
        missing = [c for c in job.features if c not in frame.columns]
        if missing:
            raise BatchError(f"the input has no feature column {missing}")
        return frame[list(job.features)].to_numpy(dtype=np.float32)
    if job.input not in frame.columns:
        raise BatchError(
            f"the input has no column {job.input!r} (the model's input, one array per row); name the scalar "
            "feature columns with --features"
        )
    values = frame[job.input].to_numpy()
    return np.stack(values).astype(np.float32, copy=False) if len(values) else np.zeros((0, 0), np.float32)


def score_frame(job: Job, frame: Any) -> Any:
    """The input rows with the job's columns added: placed by `decide`, scored by their backend's model."""
    import pandas as pd

    a = assigner(job)
    n = len(frame)
    columns = {k.name: frame[k.name].tolist() for k in a.keys if k.name in frame.columns}
    decisions = a.place(columns, n)
    ok = np.fromiter((d.denial is None for d in decisions), dtype=bool, count=n)
    accepted = np.flatnonzero(ok)
    out = frame.copy()
    out["variant"] = pd.array([d.variant if d.denial is None else None for d in decisions], dtype="str")
    out["bucket"] = pd.array([d.bucket if d.denial is None else None for d in decisions], dtype="Int64")
    out["assignment"] = pd.array([d.assignment if d.denial is None else None for d in decisions], dtype="str")
    out["region"] = pd.array([d.region if d.denial is None else None for d in decisions], dtype="str")
    out["fallback"] = pd.array([d.fallback if d.denial is None else None for d in decisions], dtype="boolean")

    matrix = _matrix(job, frame.take(accepted)) if len(accepted) else None
    targets = [("", np.array([d.cluster or "" for d in decisions], dtype=object)[accepted])]
    for name in job.shadows:
        lanes = np.array(
            [dict(zip(d.shadow_names, d.shadows, strict=True)).get(name, "") for d in decisions], dtype=object
        )
        targets.append((f"shadow_{name}_", lanes[accepted]))
    for prefix, clusters in targets:
        results: dict[str, np.ndarray] = {}
        scored = np.zeros(n, dtype=bool)
        for cluster in sorted(set(clusters.tolist()) - {""}):
            sel = np.flatnonzero(clusters == cluster)
            rows = accepted[sel]
            values = score.run(_model_path(job, cluster), matrix[sel], job.threads)  # type: ignore[index]
            for o in job.outputs:
                got = np.asarray(values[o.name])
                if o.name not in results:
                    results[o.name] = np.zeros((n, *got.shape[1:]), dtype=o.dtype)
                results[o.name][rows] = got
            scored[rows] = True
        for o in job.outputs:
            out[prefix + o.name] = _column(o, results.get(o.name), scored)

    out["reason"] = pd.array([d.denial.code if d.denial is not None else None for d in decisions], dtype="str")
    out["status"] = pd.array([d.denial.status if d.denial is not None else None for d in decisions], dtype="Int64")
    out["message"] = pd.array([d.message if d.denial is not None else None for d in decisions], dtype="str")
    return out


_NULLABLE = {"float32": "Float32", "float64": "Float64", "int64": "Int64", "int32": "Int32"}


def _column(o: score.Output, values: np.ndarray | None, scored: np.ndarray) -> Any:
    """A nullable column: the output where the row was scored, null elsewhere."""
    import pandas as pd

    if values is None:
        return pd.array([None] * len(scored), dtype=_NULLABLE[o.dtype]) if o.rank == 1 else [None] * len(scored)
    if o.rank == 1:
        return pd.Series(values).astype(_NULLABLE[o.dtype]).mask(~scored).array
    return [row if s else None for row, s in zip(values, scored, strict=True)]


def split(job: Job, scored: Any) -> tuple[Any, Any]:
    """(scored rows without the reject columns, rejected rows with only the input and reject columns)."""
    reasons = scored["reason"].isna().to_numpy()
    added = [c for c, _, _ in job.columns()]
    inputs = [c for c in scored.columns if c not in added]
    good = scored.loc[reasons, [c for c in scored.columns if c not in {n for n, _ in REJECTED}]]
    bad = scored.loc[~reasons, inputs + [n for n, _ in REJECTED]]
    return good.reset_index(drop=True), bad.reset_index(drop=True)


def _summary(rows: int, reasons: Counter[str], variants: Counter[str]) -> Summary:
    rejected = sum(reasons.values())
    return Summary(rows, rows - rejected, dict(sorted(reasons.items())), dict(sorted(variants.items())))


def run_pandas(job: Job, source: str | Path, output: str | Path, rejects: str | Path) -> Summary:
    """In-process: read the whole file, score it, write the two outputs (fine for files that fit in memory)."""
    import pandas as pd

    frame = pd.read_parquet(source)
    good, bad = split(job, score_frame(job, frame))
    good.to_parquet(output, index=False)
    bad.to_parquet(rejects, index=False)
    return _summary(len(frame), Counter(bad["reason"].tolist()), Counter(good["variant"].tolist()))


def _spark_type(dtype: str, rank: int) -> Any:
    from pyspark.sql import types as T

    base = {
        "str": T.StringType(),
        "Int64": T.LongType(),
        "boolean": T.BooleanType(),
        "float32": T.FloatType(),
        "float64": T.DoubleType(),
        "int64": T.LongType(),
        "int32": T.IntegerType(),
    }[dtype]
    return base if rank == 1 else T.ArrayType(base)


def session(master: str) -> Any:
    """A SparkSession for ``master``; local masters run their Python workers on this interpreter."""
    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName("cohortgate-batch")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )


def run_spark(
    job: Job, source: str, output: str, rejects: str, *, master: str = "local[2]", spark: Any = None
) -> Summary:
    """On Spark: the model files are shipped with the job (`addFile`), every partition runs
    `score_frame` through `mapInPandas` with one onnxruntime thread per task, and the scored and
    rejected rows are written as two Parquet directories from one pass (the result is persisted)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark = spark or session(master)
    paths = sorted(set(dict(job.models).values()))
    names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        raise BatchError(f"model files must have distinct file names to be shipped to Spark: {paths}")
    for p in paths:
        spark.sparkContext.addFile(p)
    shipped = replace(job, models=tuple((c, Path(p).name) for c, p in job.models), shipped=True, threads=1)

    frame = spark.read.parquet(str(source))
    inputs = [f.name for f in frame.schema.fields]
    schema = T.StructType(
        [*frame.schema.fields, *(T.StructField(n, _spark_type(t, r), True) for n, t, r in job.columns())]
    )

    def partitions(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            yield score_frame(shipped, batch)

    result = frame.mapInPandas(partitions, schema).persist()
    try:
        counts = result.groupBy("reason", "variant").count().collect()
        rejected = [n for n, _ in REJECTED]
        result.filter(F.col("reason").isNull()).drop(*rejected).write.mode("overwrite").parquet(str(output))
        result.filter(F.col("reason").isNotNull()).select(*inputs, *rejected).write.mode("overwrite").parquet(
            str(rejects)
        )
    finally:
        result.unpersist()
    reasons: Counter[str] = Counter()
    variants: Counter[str] = Counter()
    for row in counts:
        if row["reason"] is not None:
            reasons[row["reason"]] += row["count"]
        else:
            variants[row["variant"]] += row["count"]
    return _summary(sum(reasons.values()) + sum(variants.values()), reasons, variants)
