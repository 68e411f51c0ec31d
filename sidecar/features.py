"""Online features from a Feast Redis online store, read in Feast's own layout (no Feast at runtime).

A team that already runs Feast points a model at the store `feast materialize` fills. The layout
(Feast's ``RedisOnlineStore``; its "online store format" is part of Feast's public contract):

    key    serialize_entity_key(EntityKey(join keys, values), version) + project (UTF-8)
             v3: <count:u32> then per sorted join key <STRING=2:u32><len:u32><name>,
                 then per value <type:u32><len:u32><bytes> (int64 as <q, string as UTF-8)
             v2: as v3 without the count and the key lengths
    field  murmur3_32("view:feature") as 4 little-endian bytes  ->  feast.types.Value (protobuf)
    field  "_ts:view"                                            ->  google.protobuf.Timestamp

A request (or a whole batch) costs one pipelined round trip: one HMGET per entity for every
feature field and every view's timestamp. The answer for each entity is its values, or the reason
the route's ``fallback`` model serves it instead -- ``missing`` (no row, or a feature not set),
``stale`` (a view older than ``max_age_s``), ``over_budget`` (the round trip took longer than
``budget_ms``), ``unavailable`` (Redis refused or failed) -- counted by reason; the age of the
values served goes to a histogram. Redis exceptions are translated here, nowhere else.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mmh3
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.metrics import Histogram

REASONS = ("missing", "stale", "over_budget", "unavailable")
AGE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0)

# feast.types.ValueType.Enum numbers used by the entity-key encoding
_STRING, _INT64, _INT32, _BYTES = 2, 4, 3, 1


def _value_class() -> Any:
    """`feast.types.Value` (the scalar and numeric-list members), built from its field numbers in a
    private descriptor pool, so this module needs protobuf but neither Feast nor generated code."""
    f = descriptor_pb2.FileDescriptorProto(name="cohortgate_feast_value.proto", package="feast.types", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    for name, kind in (("FloatList", T.TYPE_FLOAT), ("DoubleList", T.TYPE_DOUBLE), ("Int32List", T.TYPE_INT32),
                       ("Int64List", T.TYPE_INT64), ("BoolList", T.TYPE_BOOL)):  # fmt: skip
        m = f.message_type.add(name=name)
        m.field.add(name="val", number=1, type=kind, label=T.LABEL_REPEATED)
    value = f.message_type.add(name="Value")
    value.oneof_decl.add(name="val")
    scalars = (("bytes_val", 1, T.TYPE_BYTES), ("string_val", 2, T.TYPE_STRING), ("int32_val", 3, T.TYPE_INT32),
               ("int64_val", 4, T.TYPE_INT64), ("double_val", 5, T.TYPE_DOUBLE), ("float_val", 6, T.TYPE_FLOAT),
               ("bool_val", 7, T.TYPE_BOOL), ("unix_timestamp_val", 8, T.TYPE_INT64))  # fmt: skip
    for name, number, kind in scalars:
        value.field.add(name=name, number=number, type=kind, label=T.LABEL_OPTIONAL, oneof_index=0)
    lists = (("int32_list_val", 13, "Int32List"), ("int64_list_val", 14, "Int64List"),
             ("double_list_val", 15, "DoubleList"), ("float_list_val", 16, "FloatList"),
             ("bool_list_val", 17, "BoolList"))  # fmt: skip
    for name, number, type_name in lists:
        value.field.add(
            name=name, number=number, type=T.TYPE_MESSAGE, type_name=f".feast.types.{type_name}",
            label=T.LABEL_OPTIONAL, oneof_index=0,
        )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("feast.types.Value"))


Value = _value_class()


def field_hash(view: str, feature: str) -> bytes:
    """Feast's hash field for one feature: murmur3_32 (unsigned) of ``view:feature``, little-endian."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def _encode_value(value: str | int) -> tuple[int, bytes]:
    if isinstance(value, bool):
        raise TypeError("an entity value is a string or an integer")
    if isinstance(value, int):
        return _INT64, struct.pack("<q", value)
    return _STRING, value.encode()


def entity_key(join_keys: Sequence[str], values: Sequence[str | int], project: str, version: int = 3) -> bytes:
    """The Redis key Feast writes an entity row under (``_redis_key`` of ``serialize_entity_key``)."""
    pairs = sorted(zip(join_keys, values, strict=True))
    out = [struct.pack("<I", len(pairs))] if version >= 3 else []
    for name, _ in pairs:
        raw = name.encode()
        out.append(struct.pack("<II", _STRING, len(raw)) + raw if version >= 3 else struct.pack("<I", _STRING) + raw)
    for _, value in pairs:
        kind, raw = _encode_value(value)
        out.append(struct.pack("<II", kind, len(raw)) + raw)
    return b"".join(out) + project.encode()


def decode_value(raw: bytes) -> float | list[float] | str | bytes | None:
    """A feature's value as the model takes it (numbers as floats); None when unset (Feast's null)."""
    v = Value.FromString(raw)
    kind = v.WhichOneof("val")
    if kind is None:
        return None
    got = getattr(v, kind)
    if kind.endswith("_list_val"):
        return [float(x) for x in got.val]
    if kind in {"string_val", "bytes_val"}:
        return got
    return float(got)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What a model joins: ``views`` as ``view:feature``; ``join_key`` is the Feast entity's join key."""

    project: str
    join_key: str
    views: tuple[str, ...]
    budget_ms: float = 5.0
    max_age_s: float | None = 3600.0
    key_version: int = 3

    def __post_init__(self) -> None:
        bad = [v for v in self.views if v.count(":") != 1 or not all(v.split(":"))]
        if bad or not self.views:
            raise ValueError(f"features.views must be 'view:feature' entries, got {list(self.views) or 'none'}")

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.split(":")[0] for v in self.views))


@dataclass(frozen=True, slots=True)
class Lookup:
    """One entity's joined features in ``views`` order, or the reason to serve the fallback."""

    values: tuple[Any, ...] | None
    reason: str | None = None
    age_s: float | None = None  # age of the oldest view served

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class FeatureStats:
    fallbacks: Counter[str] = field(default_factory=Counter)  # by reason
    served: int = 0
    age_seconds: Histogram = field(default_factory=lambda: Histogram(AGE_BUCKETS))


class FeastRedisReader:
    """Reads a spec's features for many entities in one pipelined round trip (``redis.asyncio``)."""

    def __init__(self, spec: FeatureSpec, client: Any, *, clock: Any = time.time) -> None:
        self.spec = spec
        self.client = client
        self.clock = clock
        self.stats = FeatureStats()
        self._fields = [field_hash(*v.split(":")) for v in spec.views]
        self._ts_fields = [f"_ts:{name}".encode() for name in spec.view_names]
        self._view_of = [spec.view_names.index(v.split(":")[0]) for v in spec.views]

    def key(self, entity: str | int) -> bytes:
        return entity_key([self.spec.join_key], [entity], self.spec.project, self.spec.key_version)

    async def fetch(self, entities: Sequence[str | int]) -> list[Lookup]:
        """One round trip for all ``entities``; each gets its values or its fallback reason."""
        if not entities:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entity in entities:
            pipe.hmget(self.key(entity), [*self._fields, *self._ts_fields])
        try:
            rows = await asyncio.wait_for(pipe.execute(), timeout=self.spec.budget_ms / 1000)
        except TimeoutError:
            return self._all("over_budget", len(entities))
        except Exception:  # redis-py's errors (connection, protocol): the store is unavailable
            return self._all("unavailable", len(entities))
        now = self.clock()
        return [self._one(row, now) for row in rows]

    def _all(self, reason: str, n: int) -> list[Lookup]:
        self.stats.fallbacks[reason] += n
        return [Lookup(None, reason)] * n

    def _one(self, row: Sequence[bytes | None], now: float) -> Lookup:
        n = len(self._fields)
        stamps = row[n:]
        if any(s is None for s in stamps) or any(v is None for v in row[:n]):
            return self._all("missing", 1)[0]
        ages = [now - Timestamp.FromString(s).ToNanoseconds() / 1e9 for s in stamps]  # type: ignore[arg-type]
        values = tuple(decode_value(v) for v in row[:n])  # type: ignore[arg-type]
        if any(v is None for v in values):
            return self._all("missing", 1)[0]
        oldest = max(ages)
        if self.spec.max_age_s is not None and oldest > self.spec.max_age_s:
            return self._all("stale", 1)[0]
        self.stats.served += 1
        self.stats.age_seconds.observe(max(oldest, 0.0))
        return Lookup(values, None, oldest)
