"""Command-line options several commands share, declared once so their names, defaults and help agree."""

from __future__ import annotations

import argparse

DEFAULT_TRACE_SAMPLE = 0.01


def sample_ratio(text: str) -> float:
    """A share of requests: a number within 0..1 (argparse turns the ValueError into a usage error)."""
    ratio = float(text)
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of requests, within 0..1 (0.01 = 1 %)")
    return ratio


def add_tracing_options(parser: argparse.ArgumentParser, exports: str, *, sample: str | None = None) -> None:
    """``--otlp-endpoint URL`` (off by default) and, when ``sample`` says what is sampled, ``--trace-sample``.

    ``exports`` completes the endpoint's help: what this command sends to the collector.
    """
    parser.add_argument("--otlp-endpoint", metavar="URL", default=None, help=exports)
    if sample is not None:
        parser.add_argument(
            "--trace-sample",
            type=sample_ratio,
            default=DEFAULT_TRACE_SAMPLE,
            metavar="RATIO",
            help=f"with --otlp-endpoint: {sample} (default {DEFAULT_TRACE_SAMPLE})",
        )
