"""One duration syntax for every command: ``500ms``, ``1.5s``, ``90`` (seconds), ``15m``, ``2h``, ``1d``."""

from __future__ import annotations

import argparse
import re

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)(ms|s|m|h|d)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """Seconds; raises ValueError with a sentence a person understands."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use e.g. 500ms, 1s, 90, 15m, 2h or 1d")
    value = float(match.group(1)) * _UNIT_S[match.group(2)]
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"invalid duration {text!r}: it must be {'zero or ' if allow_zero else ''}positive")
    return value


def duration_arg(text: str) -> float:
    """argparse ``type=``: a positive duration."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def interval_arg(text: str) -> float:
    """argparse ``type=``: a duration where 0 means "never" (e.g. a watch interval: SIGHUP only)."""
    try:
        return parse_duration(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
