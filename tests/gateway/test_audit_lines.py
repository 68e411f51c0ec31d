"""The audit writer's fast line is the record's JSON, byte for byte (issue 25): whatever the time (the
millisecond rounding at a second's edge included), and whatever the identity and subject, whose
encoded pair the writer caches (1, True and 1.0 are equal keys; only str and None are cached)."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import OPTIONAL_FIELDS, AuditEntry, AuditLog
from gateway.extproc import hash_unit

SALT = b"audit-lines"


def _hash(subject: str) -> str:
    return hash_unit(SALT, subject)


def reference(entry: tuple[Any, ...]) -> bytes:
    """The line as the trail documents it, computed the slow way: a dict, datetime, an HMAC, orjson."""
    record = dict(zip(AuditEntry._fields, entry, strict=False))
    for name in OPTIONAL_FIELDS:
        if record.get(name) is None:
            record.pop(name, None)
    when = dt.datetime.fromtimestamp(entry[0], dt.UTC).isoformat(timespec="milliseconds")
    record["time"] = when.replace("+00:00", "Z")
    record["subject"] = None if entry[3] is None else _hash(str(entry[3]))
    record["shadows"] = list(record["shadows"])
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


seconds = st.integers(min_value=0, max_value=4_102_444_800)  # 1970 .. 2100
times = st.one_of(
    st.floats(min_value=0, max_value=4.1e9, allow_nan=False),
    st.floats(min_value=-1e9, max_value=0, allow_nan=False),  # before 1970: datetime's own path
    st.builds(lambda s, f: s + f, seconds, st.sampled_from([0.0, 0.0005, 0.9995, 0.9999995, 0.99999949, 0.9999996])),
    st.just(1_700_000_000.25),
)
equal_keys = st.sampled_from([None, 1, True, 1.0, "1", "True", 0, False, "", "user-1"])
identities = st.one_of(equal_keys, st.sampled_from(["spiffe://cohortgate.local/app-a", 'spiffe://x/é"\\']))
subjects = st.one_of(equal_keys, st.text(max_size=12), st.lists(st.integers(), max_size=2).map(tuple))
entries = st.builds(
    lambda t, rid, who, sub, middle, trace, digest: (t, rid, who, sub, *middle, trace, digest),
    times,
    st.text(max_size=40),
    identities,
    subjects,
    st.sampled_from(
        [
            ("tabular", "control", "eu", "allow", "hash", 200, ()),
            ("tabular", "canary", "ae", "allow", "override+fallback", 200, ("challenger",)),
            (None, None, None, "deny", "unauthenticated", 401, ()),
            ('r"ü', None, None, "deny", "forbidden", 403, ()),
            (None, None, None, "error", "internal_error", 503, ()),
        ]
    ),
    st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)),
    st.one_of(st.none(), st.just("sha256:" + "ab" * 32)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries, min_size=1, max_size=20))
def test_every_line_is_the_records_json(batch: list[tuple[Any, ...]]) -> None:
    log = AuditLog(io.BytesIO(), _hash)
    try:
        for entry in batch:
            assert log._line(entry) == reference(entry)
        for entry in reversed(batch):  # now from the caches
            assert log._line(entry) == reference(entry)
    finally:
        log.close()


def test_the_written_trail_is_the_records_json() -> None:
    sink = io.BytesIO()
    log = AuditLog(sink, _hash)
    batch = [
        (
            1_700_000_000.9999996,
            "r-1",
            "spiffe://cohortgate.local/app-a",
            "user-1",
            "t",
            "control",
            "eu",
            "allow",
            "hash",
            200,
            (),
        ),
        (
            1_700_000_001.0004,
            "r-2",
            "spiffe://cohortgate.local/app-a",
            "user-1",
            "t",
            "control",
            "eu",
            "allow",
            "hash",
            200,
            (),
        ),
        (1_700_000_001.5, "r-3", 1, True, None, None, None, "deny", "forbidden", 403, ()),
        (1_700_000_001.5, "r-4", True, 1, None, None, None, "deny", "forbidden", 403, ()),
    ]
    for entry in batch:
        log.record(tuple.__new__(AuditEntry, entry))
    log.flush()
    log.close()
    assert sink.getvalue() == b"".join(reference(e) for e in batch)
    first, second = (orjson.loads(line)["time"] for line in sink.getvalue().splitlines()[:2])
    assert (first, second) == ("2023-11-14T22:13:21.000Z", "2023-11-14T22:13:21.000Z")  # rounded to the next second
