"""Argument types several commands share, so one option means one syntax everywhere."""

from __future__ import annotations

import argparse


def parse_header(text: str) -> tuple[str, str]:
    """``--header NAME:VALUE`` (curl's syntax); ``NAME=VALUE`` is read the same way.

    A header name can hold neither ``:`` nor ``=``, so whichever comes first ends the name and the
    value keeps any later ones (``x-route: a=b`` is name ``x-route``, value ``a=b``).
    """
    cuts = [i for i in (text.find(":"), text.find("=")) if i >= 0]
    name = text[: min(cuts)].strip().lower() if cuts else ""
    if not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"invalid header {text!r}: use NAME:VALUE, e.g. x-device:phone")
    return name, text[min(cuts) + 1 :].strip()
