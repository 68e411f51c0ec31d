"""Batch scoring: a Parquet file through the same cohorts, residency and models as the gateway.

    assign.py   rows -> the gateway's own `decide` (same salt, weights, residency, fallback)
    score.py    one onnxruntime session per model file, rows grouped by the backend they landed on
    job.py      the job: in-process with pandas, or a Spark `mapInPandas` with the models shipped

Every row either lands in the scored output (variant, bucket, region, the model's outputs) or in the
rejects output with the same denial code the gateway would have answered; no row is ever scored by
a backend outside its region.
"""

from cohortgate.batch.job import BatchError, Job, run_pandas, run_spark

__all__ = ["BatchError", "Job", "run_pandas", "run_spark"]
