"""The header-block memo never decodes differently from a fresh decoder (issue 12)."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.h2.hpackmemo import MemoDecoder

# A small pool, so blocks repeat (cache hits) while the dynamic table churns (same bytes, other
# meaning: b"\xbe" is "the newest entry", whichever that is at the time).
_NAMES = [b"x-a", b"x-b", b"authorization", b":path", b"content-type", b"x-long"]
_VALUES = [b"", b"1", b"2", b"application/grpc", b"v" * 60, b"w" * 300]

fields = st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES), st.booleans())
steps = st.one_of(
    st.tuples(st.just("block"), st.lists(fields, max_size=5), st.booleans()),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 512, 4096]), st.none()),
    st.tuples(st.just("replay"), st.integers(min_value=0, max_value=50), st.none()),
)


def _run(sequence: list, table_size_limit: int = 4096) -> tuple[list, list, MemoDecoder]:
    """Feed an encoder's blocks (plus replays of earlier bytes) to a memo and a fresh decoder."""
    encoder = hpack.Encoder()
    memo = MemoDecoder(max_entries=8)
    fresh = hpack.Decoder()
    sent: list[bytes] = []
    got_memo, got_fresh = [], []
    for kind, arg, huffman in sequence:
        if kind == "resize":
            encoder.header_table_size = arg
            continue
        if kind == "replay":
            if not sent:
                continue
            block = sent[arg % len(sent)]
        else:
            headers = [hpack.NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in arg]
            block = encoder.encode(headers, huffman=huffman)
        # A replayed block is only sent when it is valid at this point for the fresh decoder,
        # as an honest encoder's would be; the memo must then agree with it.
        probe = hpack.Decoder()
        probe.header_table.dynamic_entries = fresh.header_table.dynamic_entries.copy()
        probe.header_table._current_size = fresh.header_table._current_size
        probe.header_table.maxsize = fresh.header_table.maxsize
        try:
            probe.decode(block, raw=True)
        except hpack.HPACKError:
            continue
        sent.append(block)
        got_fresh.append(tuple((bytes(n), bytes(v)) for n, v in fresh.decode(block, raw=True)))
        got_memo.append(memo.decode(block)[0])
        # Replayed bytes move the table exactly as their original did; keep the encoder in step.
        if kind == "replay":
            encoder = _encoder_matching(fresh)
    return got_memo, got_fresh, memo


def _encoder_matching(decoder: hpack.Decoder) -> hpack.Encoder:
    encoder = hpack.Encoder()
    encoder.header_table.maxsize = decoder.header_table.maxsize
    encoder.header_table.resized = False
    encoder.header_table.dynamic_entries = decoder.header_table.dynamic_entries.copy()
    encoder.header_table._current_size = decoder.header_table._current_size
    return encoder


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=40))
def test_memoised_decode_equals_fresh_decode(sequence):
    got_memo, got_fresh, _ = _run(sequence)
    assert got_memo == got_fresh


def test_a_block_that_changes_the_table_is_never_served_from_the_memo():
    encoder, memo = hpack.Encoder(), MemoDecoder()
    first = encoder.encode([(b"x-a", b"1")])  # literal with incremental indexing
    assert memo.decode(first)[0] == ((b"x-a", b"1"),)
    generation = memo.generation
    assert generation > 0
    again = encoder.encode([(b"x-a", b"1")])  # now a pure index
    assert again != first
    assert memo.decode(again)[0] == ((b"x-a", b"1"),)
    assert memo.generation == generation  # unchanged: cacheable
    memo.decode(again)
    assert (memo.hits, memo.misses) == (1, 2)
    # The same index now names a different entry: the generation moved, so no stale hit.
    memo.decode(encoder.encode([(b"x-b", b"2")]))
    assert memo.generation == generation + 1
    newest = encoder.encode([(b"x-b", b"2")])
    assert newest == again  # same bytes ...
    assert memo.decode(newest)[0] == ((b"x-b", b"2"),)  # ... other meaning


def test_a_size_update_changes_the_generation():
    encoder, memo = hpack.Encoder(), MemoDecoder()
    memo.decode(encoder.encode([(b":method", b"POST")]))
    generation = memo.generation
    encoder.header_table_size = 128
    memo.decode(encoder.encode([(b":method", b"POST")]))
    assert memo.generation > generation


def test_derived_verdict_is_memoised_with_the_headers():
    calls = []
    memo = MemoDecoder(derive=lambda headers: calls.append(headers) or len(headers))
    block = hpack.Encoder().encode([(b":method", b"POST"), (b":path", b"/")])  # static only
    assert memo.decode(block) == (((b":method", b"POST"), (b":path", b"/")), 2)
    assert memo.decode(block)[1] == 2
    assert len(calls) == 1


def test_memo_is_bounded():
    memo = MemoDecoder(max_entries=4)
    encoder = hpack.Encoder()
    for i in range(20):
        memo.decode(encoder.encode([hpack.NeverIndexedHeaderTuple(b"x-n", str(i).encode())]))
    assert len(memo._cache) <= 4


def test_oversized_header_list_raises():
    memo = MemoDecoder(max_header_list_size=100)
    with pytest.raises(hpack.OversizedHeaderListError):
        memo.decode(hpack.Encoder().encode([(b"x-big", b"v" * 200)]))
