"""HPACK decoding with a memo that is correct by construction.

Envoy sends the same request header block on every ext_proc stream; once its literals sit in the
dynamic table, the block is pure indexed references and decoding it again is wasted work. A block's
meaning depends on the dynamic table, so the memo is keyed by ``(block bytes, generation)``, where
the generation counts every change to the table (an insertion from a literal with incremental
indexing, or a table-size update). Only a block whose decoding left the generation unchanged is
stored: replaying it cannot alter the table, so skipping the decoder keeps both ends in sync, and
the same bytes at the same generation can only decode to the same headers. Entries of older
generations can never match again and are dropped as soon as the generation moves.

The decoding itself is the ``hpack`` package's; nothing here reads HPACK bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hpack
from hpack.table import HeaderTable

Headers = tuple[tuple[bytes, bytes], ...]


class _GenerationTable(HeaderTable):
    """hpack's table, counting every mutation the decoder can make to it."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


def _no_verdict(headers: Headers) -> None:
    return None


class MemoDecoder:
    """An ``hpack.Decoder`` plus a bounded memo of ``block -> (headers, derive(headers))``.

    ``derive`` lets the caller memoise its own validation of the headers alongside them; it must
    be a pure function of the headers. Raises whatever ``hpack`` raises; after an error the
    decoder's state is undefined and the connection must end (COMPRESSION_ERROR).
    """

    __slots__ = ("_cache", "_decoder", "_derive", "_max_entries", "_table", "hits", "misses")

    def __init__(
        self,
        *,
        max_header_list_size: int = 65536,
        max_entries: int = 256,
        derive: Callable[[Headers], Any] = _no_verdict,
    ) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._table = _GenerationTable()
        self._decoder.header_table = self._table
        self._cache: dict[tuple[bytes, int], tuple[Headers, Any]] = {}
        self._max_entries = max_entries
        self._derive = derive
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        return self._table.generation

    def decode(self, block: bytes) -> tuple[Headers, Any]:
        key = (block, self._table.generation)
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        before = self._table.generation
        headers: Headers = tuple((n, v) for n, v in self._decoder.decode(block, raw=True))
        result = (headers, self._derive(headers))
        cache = self._cache
        if self._table.generation != before:
            cache.clear()  # every stored key names an older generation now
        else:
            if len(cache) >= self._max_entries:
                del cache[next(iter(cache))]
            cache[key] = result
        return result
