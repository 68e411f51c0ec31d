"""`cohortgate sidecar`: defined by the sidecar package itself (`sidecar.cli`), so `python -m sidecar`
runs on a machine with only the sidecar's dependencies."""

from sidecar.cli import register

__all__ = ["register"]
