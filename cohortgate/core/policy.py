"""Policy files: YAML -> validated model -> a frozen `Policy` with every lookup precomputed.

`load_policy(path)` either returns a compiled `Policy` or raises one `PolicyError` listing every
problem as ``FILE:LINE:COL: message`` (schema errors from pydantic and cross-field rules alike).
The compiled objects are immutable, so a reload builds a new `Policy` and swaps one reference;
`Policy.with_weights` does the same for the controller's effective weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import yaml
from pydantic import ValidationError

from cohortgate.core import cohorts
from cohortgate.core.contract import HEADER_PREFIX, MIRROR_SLOTS, SEALED_ARTIFACT_MAGIC, cluster_name
from cohortgate.core.errors import PolicyError
from cohortgate.core.schema import JwtSpec, PolicyModel, Predicate
from cohortgate.core.schema import Route as RouteModel

OIP_MODEL_PREFIX = "/v2/models/"

# --------------------------------------------------------------------------- compiled objects


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    scheme: str
    host: str
    port: int
    region: str
    cluster: str  # Envoy cluster name, unique in the policy
    model: str | None = None  # local ONNX file (resolved path) when `cohortgate up` should serve it
    forward_authorization: bool = False  # Envoy keeps the client's Authorization header for this cluster
    # ``sha256:<hex>`` of the model this backend is meant to serve (`routed_digest`), for the audit line;
    # None when unknown without fetching. Not part of equality: it never changes Envoy's cluster.
    digest: str | None = field(default=None, compare=False)
    protocol: str = "http"  # "grpc": Envoy speaks HTTP/2 to it (explicit http2 protocol options)
    # The model's data contract for its sidecar (`cohortgate up` passes it as --contract): a resolved file
    # path, or the inline contract as JSON (starts with "{"). Not part of equality: Envoy never sees it.
    contract: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: int
    backends: tuple[Backend, ...]
    by_region: Mapping[str, tuple[Backend, ...]]
    enabled: bool = True  # False once rolled back: overrides no longer reach it either


@dataclass(frozen=True, slots=True)
class Shadow:
    name: str
    percent: float
    threshold: int  # mirrored when a request's sample bucket is below this
    backends: tuple[Backend, ...]
    by_region: Mapping[str, tuple[Backend, ...]]
    key: bytes  # hash key for the per-request sampling


@dataclass(frozen=True, slots=True)
class Eligibility:
    source: str  # "claim" | "header"
    key: str
    op: str  # "in" | "not_in" | "equals" | "exists"
    values: frozenset[str] = frozenset()
    flag: bool = True

    def passes(self, value: str | None) -> bool:
        if self.op == "exists":
            return (value is not None) == self.flag
        if self.op == "not_in":
            return value is None or value not in self.values
        return value is not None and value in self.values  # "in" and "equals"

    def describe(self) -> str:
        if self.op == "exists":
            return f"{self.source} {self.key} {'present' if self.flag else 'absent'}"
        return f"{self.source} {self.key} {self.op.replace('_', ' ')} {sorted(self.values)}"


@dataclass(frozen=True, slots=True)
class Guardrails:
    max_error_rate: float
    max_p99_ms: float | None
    min_samples: int
    alpha: float
    latency_margin_ms: float = 5.0


@dataclass(frozen=True, slots=True)
class Rollout:
    variant: str
    steps: tuple[int, ...]
    interval_s: float
    promote_on_win: bool = False  # a primary-metric win jumps to the last step (needs a primary metric)


@dataclass(frozen=True, slots=True)
class Metric:
    """A declared outcome metric; the controller reads it as a `cohortgate.core.lift.MetricSpec` (the same
    fields, plus the attribution window); kept apart so the gateway never imports numpy for it."""

    name: str
    kind: str  # binary | mean | ratio
    direction: str  # increase | decrease
    role: str  # primary | secondary | guardrail
    margin: float | None
    margin_abs: bool
    planned_units: int
    attribution_window_s: float
    covariate: str | None = None


@dataclass(frozen=True, slots=True)
class Experiment:
    """A route's experiment catalog entry (shown in reports and the dashboard, archived with the result)."""

    hypothesis: str
    owner: str
    primary_metric: str | None
    start: str  # ISO date


@dataclass(frozen=True, slots=True)
class Allocation:
    """A route's adaptive allocation (schema.Allocation; the strategies live in core/bandit.py)."""

    strategy: str  # thompson | ucb | epsilon_greedy
    reward: str  # a metric of the route (binary or mean)
    reward_kind: str  # that metric's kind
    reward_direction: str  # increase | decrease
    update_s: float
    min_share: float
    epsilon: float
    segments: tuple[str, ...]  # the segments' names, in order
    seed: int
    segment_defs: tuple[Segment, ...] = ()  # per-segment allocation (a contextual bandit); () : one per route

    def segment_of(self, region: str | None, headers: Mapping[str, str], claims: Mapping[str, Any] | None) -> str:
        """The request's allocation segment: each segment's value, declared or ``other``, joined by ``_``
        (``eu_pro``). A client can never widen the set: at most the product of (values + 1) segments."""
        parts = []
        for s in self.segment_defs:
            if s.source == "region":
                raw: Any = region
            elif s.source == "header":
                raw = headers.get(s.key)
            else:
                raw = claims.get(s.key) if claims is not None else None
            parts.append(s.value_of(raw if isinstance(raw, str) else None))
        return "_".join(parts)

    def segment_names(self) -> tuple[str, ...]:
        """Every segment a request can fall in (declared values and ``other``), in a stable order."""
        out = [""]
        for s in self.segment_defs:
            out = [f"{o}_{v}" if o else v for o in out for v in (*sorted(s.values), "other")]
        return tuple(out) if self.segment_defs else ()


@dataclass(frozen=True, slots=True)
class Features:
    """A route's online-feature join (schema.Features): the gateway reads the entity, the sidecar the rest."""

    store: str = field(repr=False)  # redis:// URL; may hold a password
    project: str
    join_key: str
    entity_source: str  # "claim" | "header"
    entity_key: str  # claim name, or lower-cased header name
    entity_type: str  # "string" | "int64"
    views: tuple[str, ...]  # view:feature, in input order
    input: str | None  # the model input extended (None: the first)
    budget_ms: float
    max_age_s: float | None
    fallback_model: str | None  # resolved path or reference
    defaults: tuple[tuple[float, ...], ...] | None  # per view entry, flattened; None with a fallback model
    variants: frozenset[str] | None  # None: every variant and shadow joins

    def joins(self, variant: str | None) -> bool:
        """Whether the sidecar of ``variant`` joins (a sidecar without a variant name always does)."""
        return self.variants is None or variant is None or variant in self.variants


@dataclass(frozen=True, slots=True)
class Segment:
    """A declared segment (schema.Segment): which fact, and the values kept (anything else: ``other``)."""

    name: str
    source: str  # "region" | "claim" | "header"
    key: str  # claim name, lower-cased header name, or "" for region
    values: frozenset[str]

    def value_of(self, value: str | None) -> str:
        """The segment value the access log carries for ``value``: itself if declared, else ``other``."""
        return value if value is not None and value in self.values else "other"


@dataclass(frozen=True, slots=True)
class Quality:
    """A route's quality guardrails (schema.Quality; read by cohortgate.controller.quality)."""

    alpha: float
    min_samples: int
    psi: float | None
    js: float | None
    wasserstein: float | None
    prediction_drift: float | None
    segments: tuple[Segment, ...]
    margin: float
    four_fifths: float | None
    fallback: str | None

    def label(self, region: str | None, headers: Mapping[str, str], claims: Mapping[str, Any] | None) -> str:
        """The request's segments as the access log carries them: ``name=value;...``, each value a
        declared one or ``other`` (a client can never widen the set). Empty without segments."""
        parts = []
        for s in self.segments:
            if s.source == "region":
                raw: Any = region
            elif s.source == "header":
                raw = headers.get(s.key)
            else:
                raw = claims.get(s.key) if claims is not None else None
            value = (
                raw
                if isinstance(raw, str)
                else str(raw)
                if isinstance(raw, int) and not isinstance(raw, bool)
                else None
            )
            parts.append(f"{s.name}={s.value_of(value)}")
        return ";".join(parts)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path_prefix: str | None
    model: str | None
    methods: frozenset[str] | None  # None: any
    identities: frozenset[str]  # exact SPIFFE ids
    identity_prefixes: tuple[str, ...]  # from `spiffe://td/app-*` patterns
    identity_any: bool  # no identity rule: any CA-verified client
    scopes: frozenset[str]
    claims: Mapping[str, frozenset[str]]
    unit_source: str  # "claim" | "header"
    unit_key: str
    salt: str
    salt_key: bytes = field(repr=False)
    eligibility: tuple[Eligibility, ...]
    overrides: Mapping[str, int]  # unit -> variant index
    residency_source: str
    residency_key: str
    default_region: str | None
    allowed_regions: frozenset[str]
    fallback_control: bool
    variants: tuple[Variant, ...]
    shadows: tuple[Shadow, ...]
    guardrails: Guardrails
    rollout: Rollout | None
    bounds: tuple[int, ...]  # cohort layout for the current weights
    owners: tuple[int, ...]
    trusted_keys: tuple[str, ...] = ()  # model-signing keys: ed25519:<b64> or resolved PEM paths
    kind: str = "model"  # "model" | "outcomes" (the outcome ingest, forwarded to the controller)
    metrics: tuple[Metric, ...] = ()  # outcome metrics read on this route
    features: Features | None = None  # online features the sidecar joins (issue 22)
    allocation: Allocation | None = None  # bandit allocation (issue 21); None: fixed weights
    experiment: Experiment | None = None  # the catalog entry, when the policy gives one
    quality: Quality | None = None  # model-quality guardrails (docs/quality.md)
    # per-segment cohort layouts of a segmented bandit route (segment -> (bounds, owners)); empty: ``bounds``
    segment_layouts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    host: str | None = None  # `match.host`: the request authority (no port here: any port matches)

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def variant_index(self, name: str) -> int:
        for i, v in enumerate(self.variants):
            if v.name == name:
                return i
        raise KeyError(name)

    def with_weights(
        self,
        weights: Mapping[str, int],
        disabled: Iterable[str] = (),
        segment_weights: Mapping[str, Mapping[str, int]] | None = None,
    ) -> Route:
        """A copy with effective weights (missing variants keep theirs) and rolled-back variants off.

        ``segment_weights`` (a segmented bandit route): segment -> variant -> weight; a rolled-back
        variant's share goes to control, as a rollback's does."""
        off = set(disabled)
        variants = tuple(
            replace(v, weight=int(weights.get(v.name, v.weight)), enabled=v.name not in off) for v in self.variants
        )
        bounds, owners = cohorts.layout([v.weight for v in variants])
        layouts = {}
        for segment, sw in (segment_weights or {}).items():
            w = [0 if v.name in off else int(sw.get(v.name, 0)) for v in variants]
            w[0] += 100 - sum(w)
            layouts[segment] = cohorts.layout(w)
        return replace(self, variants=variants, bounds=bounds, owners=owners, segment_layouts=layouts)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks: str  # absolute file path or https URL
    leeway_s: int
    required: bool
    jwks_hosts: tuple[str, ...] | None = None  # the hosts an https:// jwks may name (None: any)


@dataclass(frozen=True, slots=True)
class Policy:
    path: str
    digest: str  # sha256 of the file's bytes: what is serving, for logs and status
    jwt: JwtSettings
    response_headers: bool
    routes: tuple[Route, ...]
    by_name: Mapping[str, Route]
    by_model: Mapping[str, tuple[Route, ...]]
    by_prefix: Mapping[str, tuple[Route, ...]]
    # Envoy cluster -> the routed model digest (backends with a known one): one dict lookup per audit line
    model_digests: Mapping[str, str] = field(default_factory=dict)
    hosts_only: tuple[Route, ...] = ()  # routes matched by `match.host` alone (any path)
    by_host: bool = False  # some route matches on the request authority

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Every backend of every variant and shadow: Envoy needs one cluster per entry."""
        out: list[Backend] = []
        for route in self.routes:
            for v in route.variants:
                out.extend(v.backends)
            for s in route.shadows:
                out.extend(s.backends)
        return tuple(out)

    def match(self, method: str, path: str, authority: str | None = None) -> Route | None:
        """The route for a request (validation guarantees at most one can match); ``authority`` (Host or
        ``:authority``) is read only by routes with ``match.host``."""
        host = authority.lower() if authority and self.by_host else None
        if path.startswith(OIP_MODEL_PREFIX):
            name = path[len(OIP_MODEL_PREFIX) :].split("/", 1)[0]
            for route in self.by_model.get(name, ()):
                if _route_accepts(route, method, path, host):
                    return route
        if self.by_prefix:
            end = len(path)
            while end > 1:  # /a/b/c, /a/b, /a; the root prefix "/" last
                for route in self.by_prefix.get(path[:end], ()):
                    if _route_accepts(route, method, path, host):
                        return route
                end = path.rfind("/", 0, end)
            for route in self.by_prefix.get("/", ()):
                if _route_accepts(route, method, path, host):
                    return route
        for route in self.hosts_only:
            if _route_accepts(route, method, path, host):
                return route
        return None

    def with_weights(
        self,
        weights: Mapping[str, Mapping[str, int]],
        disabled: Mapping[str, Iterable[str]] | None = None,
        segment_weights: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    ) -> Policy:
        """A copy with the controller's effective weights applied (unknown routes are ignored);
        ``segment_weights``: route -> segment -> variant -> weight, for segmented bandit routes."""
        disabled = disabled or {}
        segment_weights = segment_weights or {}
        routes = tuple(
            r.with_weights(weights.get(r.name, {}), disabled.get(r.name, ()), segment_weights.get(r.name))
            if r.name in weights or r.name in disabled
            else r
            for r in self.routes
        )
        return _index(self.path, self.digest, self.jwt, self.response_headers, routes)


def _route_accepts(route: Route, method: str, path: str, host: str | None = None) -> bool:
    if route.methods is not None and method not in route.methods:
        return False
    if route.host is not None and not _host_matches(route.host, host):
        return False
    if route.path_prefix is not None and not _segment_prefix(route.path_prefix, path):
        return False
    if route.model is not None:
        return path.startswith(OIP_MODEL_PREFIX) and path[len(OIP_MODEL_PREFIX) :].split("/", 1)[0] == route.model
    return True


def _host_matches(wanted: str, host: str | None) -> bool:
    """``wanted`` with a port must equal the authority; without one, any port (or none) matches."""
    if host is None:
        return False
    if host == wanted:
        return True
    if ":" in wanted or not host.startswith(wanted):
        return False
    rest = host[len(wanted) :]
    return rest[0] == ":" and rest[1:].isdigit()


def _segment_prefix(prefix: str, path: str) -> bool:
    """Whole-segment prefix: /v2/models/a matches /v2/models/a and /v2/models/a/infer, not /v2/models/ab."""
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


def _index(path: str, digest: str, jwt: JwtSettings, response_headers: bool, routes: tuple[Route, ...]) -> Policy:
    by_model: dict[str, list[Route]] = {}
    by_prefix: dict[str, list[Route]] = {}
    hosts_only: list[Route] = []
    for r in routes:
        if r.model is not None:
            by_model.setdefault(r.model, []).append(r)
        elif r.path_prefix is None:
            hosts_only.append(r)
        else:
            key = r.path_prefix.rstrip("/") or "/"
            by_prefix.setdefault(key, []).append(r)
    digests = {b.cluster: b.digest for r in routes for v in r.variants for b in v.backends if b.digest is not None}
    return Policy(
        path=path,
        digest=digest,
        jwt=jwt,
        response_headers=response_headers,
        routes=routes,
        by_name=MappingProxyType({r.name: r for r in routes}),
        by_model=MappingProxyType({k: tuple(v) for k, v in by_model.items()}),
        by_prefix=MappingProxyType({k: tuple(v) for k, v in by_prefix.items()}),
        model_digests=MappingProxyType(digests),
        hosts_only=tuple(hosts_only),
        by_host=any(r.host is not None for r in routes),
    )


# --------------------------------------------------------------------------- YAML with positions


class _Marks:
    """Positions of every YAML node, keyed by its path of keys and indexes."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.values: dict[tuple[Any, ...], yaml.Mark] = {}
        self.keys: dict[tuple[Any, ...], yaml.Mark] = {}

    def at(self, loc: tuple[Any, ...], *, key: bool = False) -> str:
        """``FILE:LINE:COL`` of the deepest known node on ``loc``."""
        loc = tuple(loc)
        while True:
            mark = (self.keys.get(loc) if key else None) or self.values.get(loc)
            if mark is not None or not loc:
                break
            loc = loc[:-1]
        if mark is None:
            return f"{self.filename}:1:1"
        return f"{self.filename}:{mark.line + 1}:{mark.column + 1}"


# libyaml when present: ~10x faster on big files (a 1 000-route policy parses in ~0.4 s, not ~4 s),
# with the same node marks for FILE:LINE:COL.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"


def _load_yaml(text: str, marks: _Marks, problems: list[str]) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None

        def scalar(n: yaml.Node) -> Any:
            # Plain strings (most of a policy) as they are: PyYAML's generic constructor costs ~30 us
            # a node, which made a 1 000-route file take over a second to read.
            if n.tag == _STR_TAG and isinstance(n, yaml.ScalarNode):
                return n.value
            return loader.construct_object(n, deep=True)

        def walk(n: yaml.Node, loc: tuple[Any, ...]) -> Any:
            marks.values[loc] = n.start_mark
            if isinstance(n, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for k, v in n.value:
                    key = scalar(k)
                    if isinstance(key, list | dict):
                        problems.append(
                            f"{marks.filename}:{k.start_mark.line + 1}:{k.start_mark.column + 1}: "
                            "a key must be a plain value"
                        )
                        continue
                    if key in out:
                        problems.append(
                            f"{marks.filename}:{k.start_mark.line + 1}:{k.start_mark.column + 1}: duplicate key {key!r}"
                        )
                    marks.keys[(*loc, key)] = k.start_mark
                    out[key] = walk(v, (*loc, key))
                return out
            if isinstance(n, yaml.SequenceNode):
                return [walk(item, (*loc, i)) for i, item in enumerate(n.value)]
            return scalar(n)

        return walk(node, ())
    finally:
        loader.dispose()


def yaml_syntax_problem(exc: yaml.MarkedYAMLError, text: str, filename: str) -> str:
    """``FILE:LINE:COL: YAML syntax error: <a sentence>``: PyYAML's terse problem ("did not find
    expected key") said in words a policy author can act on, with the parser's own words after it."""
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{filename}:1:1: YAML syntax error: {exc.problem or exc}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    opened = exc.context_mark.line + 1 if exc.context_mark is not None else mark.line + 1
    problem, context = exc.problem or "", exc.context or ""
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent or ("\t" in line[: mark.column + 1] and "cannot start any token" in problem):
        said = f"line {mark.line + 1} is indented with a tab; YAML indents with spaces only"
    elif "mapping values are not allowed" in problem:
        said = (
            f"a 'key: value' on line {mark.line + 1} where none can start: the line is indented deeper than "
            "the key above it, two keys share a line, or a value containing ': ' needs quotes"
        )
    elif "did not find expected key" in problem:
        said = (
            f"line {mark.line + 1} is not indented like the keys above it: every key of one mapping starts "
            "at the same column"
        )
    elif "expected '-' indicator" in problem:
        said = (
            f"line {mark.line + 1} mixes a key into a list: every item of a list starts with '- ' at the "
            "same column, and a key of the item goes under it, indented past the '-'"
        )
    elif "flow" in context and "did not find expected" in problem:
        said = f"a [...] or {{...}} opened on line {opened} is not closed (or lacks a comma) before this point"
    elif "quoted scalar" in context:
        said = f"a quoted string opened on line {opened} is never closed"
    elif "undefined alias" in problem:
        said = f"line {mark.line + 1} uses an *alias with no &anchor defined before it"
    elif "cannot start any token" in problem:
        said = f"line {mark.line + 1} has a character no YAML value may start with (quote the value)"
    else:
        said = f"{context} {problem}".strip()
        return f"{filename}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {said}"
    return f"{filename}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {said} ({problem})"


# --------------------------------------------------------------------------- loading


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile a policy file; raise `PolicyError` listing every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{p}:1:1: cannot read the file: {exc.strerror or exc}"]) from None
    return parse_policy(raw, filename=str(p), base_dir=p.resolve().parent)


def parse_policy(raw: bytes | str, filename: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Validate and compile policy text (``filename`` only labels the error positions)."""
    return _parse_policy(raw, filename, base_dir)[0]


def parse_policy_data(raw: bytes | str, filename: str = "<policy>", base_dir: Path | None = None) -> tuple[Policy, Any]:
    """`parse_policy`, and the plain data it read (never modify them): `cohortgate up` rewrites
    them into its effective policy without reading the file a second time."""
    return _parse_policy(raw, filename, base_dir)


def _parse_policy(raw: bytes | str, filename: str, base_dir: Path | None) -> tuple[Policy, Any]:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    data_bytes = raw if isinstance(raw, bytes) else raw.encode()
    fast = _json_model(text, filename) or _chunked_model(text, filename)
    if fast is not None:
        model, data = fast
        return _compile(model, filename, hashlib.sha256(data_bytes).hexdigest(), base_dir or Path.cwd()), data
    marks = _Marks(filename)
    problems: list[str] = []
    try:
        data = _load_yaml(text, marks, problems)
    except yaml.MarkedYAMLError as exc:
        raise PolicyError([yaml_syntax_problem(exc, text, filename)]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{filename}:1:1: YAML error: {exc}"]) from None
    if problems:
        raise PolicyError(problems)
    if not isinstance(data, dict):
        raise PolicyError([f"{filename}:1:1: a policy is a mapping with `jwt` and `routes`"])
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as exc:
        # Report the schema errors, plus the cross-field problems of every route that did parse,
        # so one run of `validate` lists every mistake in the file.
        problems = _pydantic_problems(exc, marks)
        problems.extend(_check(_valid_routes(data), marks))
        raise PolicyError(_in_file_order(problems)) from None
    problems = [*_check_jwt(model.jwt, marks), *_check(model.routes, marks)]
    if problems:
        raise PolicyError(_in_file_order(problems))
    return _compile(model, filename, hashlib.sha256(data_bytes).hexdigest(), base_dir or Path.cwd()), data


_JSON_START = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\r?\n)*[ \t]*\{")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Recent(Generic[_K, _V]):
    """The values of the most recent ``size`` keys (a dict kept in use order), shared by the threads
    `parse_policy` runs in: the two route caches below."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[_K, _V] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _K) -> _V | None:
        with self._lock:
            found = self._entries.pop(key, None)
            if found is not None:
                self._entries[key] = found  # most recent last
            return found

    def put(self, key: _K, value: _V) -> _V:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]
        return value


class _RouteCache(_Recent[str, tuple[Any, RouteModel, bool]]):
    """Validated routes by the text they were read from (a YAML item's lines, or a JSON route's
    dump), each with whether `_check_route` found it clean: an edit of one route in 1 000 reads,
    validates and checks that one (~1.1 s -> ~0.15 s). Routes validate alone: no validator of the
    schema looks outside its route."""

    def add(self, key: str, data: Any, route: RouteModel) -> tuple[Any, RouteModel, bool]:
        return self.put(key, (data, route, not any(_check_route(route, lambda *loc: ""))))


_ROUTES = _RouteCache()
_PLAIN = _Marks("<chunk>")  # positions are not kept on the fast paths: any problem reads the file again


def _model_of(head: dict[str, Any], entries: Sequence[tuple[Any, RouteModel, bool]]) -> tuple[PolicyModel, Any] | None:
    """The policy from its top-level keys and its routes, each validated alone; None on any problem
    (the caller's slow path then says what, where)."""
    if not entries:
        return None
    routes = [data for data, _, _ in entries]
    try:
        model = PolicyModel.model_validate({**head, "routes": routes[:1]})  # everything but the routes
    except ValidationError:
        return None
    model = model.model_copy(update={"routes": [route for _, route, _ in entries]})
    known = {i for i, (_, _, clean) in enumerate(entries) if clean}
    if [*_check_jwt(model.jwt, _PLAIN), *_check(model.routes, _PLAIN, known_clean=known)]:
        return None
    return model, {**head, "routes": routes}


# A route item starts at the list's indent with "- "; a YAML anchor, alias or tag, a document marker
# or a directive anywhere sends the file to the whole-document reader (items are read one by one).
_ROUTES_KEY = re.compile(r"^routes:[ \t]*(?:#.*)?$")
_ITEM = re.compile(r"^( *)-(?: |$)")
_SIGILS = re.compile(r"[&*!]")
_TOKEN_START = " \t\r\n[{,"


def _not_plain(text: str) -> bool:
    """An anchor, alias or tag (a sigil where a token starts), a document marker or a directive: a
    few false alarms (``a *b`` in a quoted string) cost only speed. ~6 ms for 1 000 routes."""
    if text.startswith(("---", "...", "%")) or "\n---" in text or "\n..." in text or "\n%" in text:
        return True
    return any(m.start() == 0 or text[m.start() - 1] in _TOKEN_START for m in _SIGILS.finditer(text))


_ANY_YAML_ERROR = (yaml.YAMLError, ValueError, TypeError)


def _chunked_model(text: str, filename: str) -> tuple[PolicyModel, Any] | None:
    """(model, data) of a valid block-style YAML policy, read route by route through `_ROUTES`:
    a route whose lines did not change is neither read nor validated again. None for anything else
    or any problem: `_parse_policy` then reads the whole file with positions and says what, where."""
    if _not_plain(text):
        return None
    lines = text.splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if _ROUTES_KEY.match(line.rstrip("\r\n"))]
    if len(keys) != 1:
        return None
    start = keys[0] + 1
    end, indent, items = len(lines), None, []
    for i in range(start, len(lines)):
        bare = lines[i].rstrip("\r\n")
        content = bare.lstrip(" ")
        if not content or content.startswith("#"):
            continue
        item = _ITEM.match(bare)
        if indent is None:
            if item is None:
                return None
            indent = len(item[1])
        if bare[0] != " " and not (indent == 0 and item is not None):
            end = i  # the next top-level key
            break
        if len(bare) - len(content) < indent:
            return None
        if item is not None and len(item[1]) == indent:
            items.append(i)
    if not items:
        return None
    head_text = "".join(lines[:start] + lines[end:])
    problems: list[str] = []
    try:
        head = _load_yaml(head_text, _Marks(filename), problems)
    except _ANY_YAML_ERROR:
        return None
    if problems or not isinstance(head, dict) or head.get("routes", 0) is not None:
        return None
    entries = []
    for a, b in zip(items, [*items[1:], end], strict=True):
        chunk = "".join(lines[a:b])
        entry = _ROUTES.get("yaml:" + chunk)
        if entry is None:
            try:
                item_data = _load_yaml(chunk, _Marks(filename), problems)
                if problems or not isinstance(item_data, list) or len(item_data) != 1:
                    return None
                entry = _ROUTES.add("yaml:" + chunk, item_data[0], RouteModel.model_validate(item_data[0]))
            except (*_ANY_YAML_ERROR, ValidationError):
                return None
        entries.append(entry)
    return _model_of(head, entries)


def _json_model(text: str, filename: str) -> tuple[PolicyModel, Any] | None:
    """(model, data) of a valid policy written as JSON after optional ``#`` comment lines
    (`cohortgate up`'s effective file), read by the json module: a 1 000-route file in ~40 ms where
    YAML with positions takes ~0.5 s. None for anything else, or any problem: the YAML path then
    reads it and reports FILE:LINE:COL. Duplicate keys and NaN are refused here, as YAML refuses
    them; numbers are read as JSON reads them (``1e-05`` is a number, where YAML 1.1 reads a string)."""
    start = _JSON_START.match(text)
    if start is None:
        return None
    body = text[start.end() - 1 :]
    try:
        lines = _route_lines(body)
        if lines is not None:  # `cohortgate up`'s layout: an unchanged route's line is looked up, not read
            head, items = lines
            return _model_of(head, [_ROUTES.get("json:" + item) or _json_route(item) for item in items])
    except ValueError:  # not quite that layout (or a route that does not validate): read it whole
        pass
    try:
        data = _json_loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
            return None
        entries = []
        for route in data["routes"]:
            key = "json:" + json.dumps(route, ensure_ascii=False)
            entries.append(_ROUTES.get(key) or _ROUTES.add(key, route, RouteModel.model_validate(route)))
    except (ValueError, TypeError):  # ValidationError is a ValueError
        return None
    return _model_of(data, entries)


def _json_loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _json_route(item: str) -> tuple[Any, RouteModel, bool]:
    route = _json_loads(item)
    if not isinstance(route, dict):
        raise ValueError("a route is an object")
    return _ROUTES.add("json:" + item, route, RouteModel.model_validate(route))


ROUTES_LINE_OPEN = '"routes":['  # `up`'s effective file: the head object up to here on one line,
ROUTES_LINE_CLOSE = "]}"  # then one route a line (a comma after all but the last), then this line


def route_lines_json(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as JSON with one route a line: what `_json_model` reads route by route, so that a
    reload of a one-route edit in 1 000 routes reads one line (~40 ms -> a few ms)."""
    routes = doc.get("routes")
    if not isinstance(routes, list) or not routes:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    head = orjson.dumps({k: v for k, v in doc.items() if k != "routes"}, option=orjson.OPT_NON_STR_KEYS)[:-1]
    lines = b",\n".join(orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS) for r in routes)
    comma = b"," if len(head) > 1 else b""
    return head + comma + ROUTES_LINE_OPEN.encode() + b"\n" + lines + b"\n" + ROUTES_LINE_CLOSE.encode()


def _route_lines(body: str) -> tuple[dict[str, Any], list[str]] | None:
    """(head, one JSON text per route) of a document in `route_lines_json`'s layout, else None.
    The same data as reading the whole document: each line holds exactly one JSON value (JSON
    strings cannot hold a raw newline), and the lines between are only the layout's commas."""
    lines = body.rstrip().split("\n")
    if len(lines) < 3 or lines[-1] != ROUTES_LINE_CLOSE or not lines[0].endswith(ROUTES_LINE_OPEN):
        return None
    head_text = lines[0][: -len(ROUTES_LINE_OPEN)]
    head = _json_loads((head_text[:-1] if head_text.endswith(",") else head_text) + "}")
    if not isinstance(head, dict) or "routes" in head:
        return None
    items = lines[1:-1]
    for i in range(len(items) - 1):
        if not items[i].endswith(","):
            return None
        items[i] = items[i][:-1]
    return head, items


def _in_file_order(problems: list[str]) -> list[str]:
    def position(problem: str) -> tuple[int, int]:
        found = _POSITION.match(problem)
        return (int(found[1]), int(found[2])) if found else (0, 0)

    return sorted(problems, key=position)


_POSITION = re.compile(r"^.*?:(\d+):(\d+): ")


def _pydantic_problems(exc: ValidationError, marks: _Marks) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
        loc = tuple("in" if part == "in_" else part for part in loc)
        kind = err["type"]
        field_path = ".".join(str(p) for p in loc) or "(top level)"
        if kind == "extra_forbidden":
            msg = f"unknown field `{loc[-1]}`" + (f" in {'.'.join(map(str, loc[:-1]))}" if len(loc) > 1 else "")
            out.append(f"{marks.at(loc, key=True)}: {msg}")
        elif kind == "missing":
            out.append(f"{marks.at(loc[:-1])}: missing required field `{field_path}`")
        else:
            message = err["msg"].removeprefix("Value error, ")
            out.append(f"{marks.at(loc)}: {field_path}: {message}")
    return out


def _valid_routes(data: dict[str, Any]) -> list[RouteModel | None]:
    """The routes of an invalid file that are valid on their own (None in place of the others)."""
    raw = data.get("routes")
    if not isinstance(raw, list):
        return []
    out: list[RouteModel | None] = []
    for item in raw:
        try:
            out.append(RouteModel.model_validate(item))
            continue
        except ValidationError as exc:
            unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if len(unknown) != len(exc.errors()):
                out.append(None)
                continue
        # Only unknown fields are wrong (already reported): check the rest of the route too.
        cleaned = copy.deepcopy(item)
        for loc in unknown:
            parent = cleaned
            for part in loc[:-1]:
                parent = parent[part]
            parent.pop(loc[-1], None)
        try:
            out.append(RouteModel.model_validate(cleaned))
        except ValidationError:
            out.append(None)
    return out


def _check_jwt(jwt: JwtSpec, marks: _Marks) -> Iterable[str]:
    """Where keys may come from: a file, or https:// on one of ``jwks_hosts`` when the policy lists them."""
    at = marks.at(("jwt", "jwks"))
    if "://" not in jwt.jwks:
        return
    parts = urlsplit(jwt.jwks)
    if parts.scheme != "https" or not parts.hostname:
        yield f"{at}: jwt.jwks {jwt.jwks!r}: keys come from a file path or an https:// URL only"
        return
    hosts = {h.lower().rstrip(".") for h in jwt.jwks_hosts or ()}
    if jwt.jwks_hosts is not None and parts.hostname.rstrip(".") not in hosts:
        yield (
            f"{at}: jwt.jwks names host {parts.hostname!r}, which is not in jwt.jwks_hosts "
            f"{sorted(hosts)}: keys are fetched only from the hosts the policy lists"
        )


def _check(
    routes: Sequence[RouteModel | None], marks: _Marks, known_clean: frozenset[int] | set[int] = frozenset()
) -> Iterable[str]:
    """Cross-field rules pydantic cannot express; each problem carries its position. A route in
    ``known_clean`` passed `_check_route` before (it is checked again only against the others)."""
    seen_routes: dict[str, int] = {}
    for ri, route in enumerate(routes):
        if route is None:
            continue

        def at(*loc: Any, _ri: int = ri) -> str:
            return marks.at(("routes", _ri, *loc), key=True)

        if route.name in seen_routes:
            yield f"{at('name')}: duplicate route name {route.name!r} (first at routes[{seen_routes[route.name]}])"
        else:
            seen_routes[route.name] = ri
        if ri not in known_clean:
            yield from _check_route(route, at)
    for i, j in _overlap_candidates(routes):
        a, b = routes[i], routes[j]
        if a is not None and b is not None and _overlap(a, b):
            yield (
                f"{marks.at(('routes', i, 'match'))}: route {a.name!r} overlaps route {b.name!r}: "
                "some requests would match both; make the paths, models, methods or hosts disjoint"
            )


def _check_route(route: RouteModel, at: Any) -> Iterable[str]:
    total = sum(v.weight for v in route.variants)
    if total != 100:
        yield f"{at('variants')}: variant weights of route {route.name!r} sum to {total}, not 100"
    names: dict[str, str] = {}
    for vi, v in enumerate(route.variants):
        if v.name in names:
            yield f"{at('variants', vi, 'name')}: duplicate variant name {v.name!r}"
        names[v.name] = "variant"
        for bi, b in enumerate(v.backends):
            yield from _check_url(b.url, at("variants", vi, "backends", bi, "url"))
    if len(route.shadows) > MIRROR_SLOTS:
        yield f"{at('shadows')}: route {route.name!r} has {len(route.shadows)} shadows; at most {MIRROR_SLOTS}"
    for si, s in enumerate(route.shadows):
        if s.name in names:
            yield f"{at('shadows', si, 'name')}: shadow name {s.name!r} is already a {names[s.name]} of this route"
        names[s.name] = "shadow"
        for bi, b in enumerate(s.backends):
            yield from _check_url(b.url, at("shadows", si, "backends", bi, "url"))

    variant_regions = {b.region for v in route.variants for b in v.backends}
    res = route.residency
    accepted = set(res.allowed_regions) if res.allowed_regions is not None else variant_regions
    if res.allowed_regions is not None:
        for ai, region in enumerate(res.allowed_regions):
            if region not in variant_regions:
                yield (
                    f"{at('residency', 'allowed_regions', ai)}: region {region!r} is allowed but no variant "
                    "has a backend there"
                )
        for vi, v in enumerate(route.variants):
            for bi, b in enumerate(v.backends):
                if b.region not in accepted:
                    yield (
                        f"{at('variants', vi, 'backends', bi, 'region')}: backend region {b.region!r} is not "
                        f"in the route's allowed_regions {sorted(accepted)}"
                    )
    if res.default_region is not None and res.default_region not in accepted:
        yield (
            f"{at('residency', 'default_region')}: default_region {res.default_region!r} is not a region "
            f"this route serves {sorted(accepted)}"
        )
    for si, s in enumerate(route.shadows):
        for bi, b in enumerate(s.backends):
            if b.region not in accepted:
                yield (
                    f"{at('shadows', si, 'backends', bi, 'region')}: shadow backend region {b.region!r} is "
                    f"outside every region route {route.name!r} accepts {sorted(accepted)}"
                )

    variant_names = {v.name for v in route.variants}
    for unit, target in route.cohorts.overrides.items():
        if target not in variant_names:
            yield (
                f"{at('cohorts', 'overrides', unit)}: override for {unit!r} names unknown variant {target!r} "
                f"(variants: {', '.join(v.name for v in route.variants)})"
            )
    for ii, pattern in enumerate(route.auth.identities):
        if not pattern.startswith("spiffe://") or "*" in pattern[:-1]:
            yield (
                f"{at('auth', 'identities', ii)}: identity {pattern!r} must be a spiffe:// ID, optionally ending in `*`"
            )
    yield from _check_metrics(route, at)
    yield from _check_features(route, at)
    yield from _check_quality(route, at)
    yield from _check_allocation(route, at)
    if route.rollout is not None:
        ro = route.rollout
        if ro.variant not in variant_names:
            yield f"{at('rollout', 'variant')}: rollout names unknown variant {ro.variant!r}"
        elif ro.variant == route.variants[0].name:
            yield f"{at('rollout', 'variant')}: the control variant {ro.variant!r} cannot be rolled out"
        if any(not 0 < s <= 100 for s in ro.steps) or list(ro.steps) != sorted(set(ro.steps)):
            yield f"{at('rollout', 'steps')}: rollout steps must be strictly increasing weights in 1..100"
        if ro.promote_on_win and not any(m.role == "primary" for m in route.metrics):
            yield (
                f"{at('rollout', 'promote_on_win')}: promote_on_win needs a primary metric to win on "
                f"(declare one in route {route.name!r}'s metrics with role: primary)"
            )


def _check_metrics(route: RouteModel, at: Any) -> Iterable[str]:
    """Metric names unique, at most one primary; an outcomes route is a single plain forward."""
    seen: set[str] = set()
    primaries = 0
    for mi, m in enumerate(route.metrics):
        if m.name in seen:
            yield f"{at('metrics', mi, 'name')}: duplicate metric name {m.name!r}"
        seen.add(m.name)
        primaries += m.role == "primary"
        if m.role == "primary" and primaries > 1:
            yield f"{at('metrics', mi, 'role')}: route {route.name!r} has more than one primary metric"
    exp = route.experiment
    if exp is not None and exp.primary_metric is not None and exp.primary_metric not in seen:
        known = ", ".join(sorted(seen)) or "none declared"
        yield (
            f"{at('experiment', 'primary_metric')}: the experiment's primary metric {exp.primary_metric!r} "
            f"is not one of the route's metrics ({known})"
        )
    declared = next((m.name for m in route.metrics if m.role == "primary"), None)
    if exp is not None and exp.primary_metric in seen and declared not in (None, exp.primary_metric):
        yield (
            f"{at('experiment', 'primary_metric')}: the experiment's primary metric {exp.primary_metric!r} "
            f"is not the metric declared `role: primary` ({declared!r})"
        )
    if route.kind == "outcomes":
        if len(route.variants) != 1:
            yield f"{at('variants')}: an outcomes route has one variant (its backend: the controller API)"
        for what in ("shadows", "rollout", "metrics", "experiment"):
            if getattr(route, what):
                yield f"{at(what)}: an outcomes route has no {what}"


def _check_allocation(route: RouteModel, at: Any) -> Iterable[str]:
    """A bandit needs a binary or mean reward the route declares, two arms, room for every floor, no rollout."""
    al = route.allocation
    if al is None:
        return
    metric = next((m for m in route.metrics if m.name == al.reward), None)
    if metric is None:
        known = ", ".join(m.name for m in route.metrics) or "none declared"
        yield f"{at('allocation', 'reward')}: reward {al.reward!r} is not one of the route's metrics ({known})"
    elif metric.kind == "ratio":
        yield f"{at('allocation', 'reward')}: reward {al.reward!r} is a ratio metric; a bandit reads binary or mean"
    if len(route.variants) < 2:
        yield f"{at('allocation')}: route {route.name!r} has one variant; a bandit needs two or more arms"
    elif math.ceil(al.min_share * 100 - 1e-9) * len(route.variants) > 100:
        yield (
            f"{at('allocation', 'min_share')}: min_share {al.min_share:g} for {len(route.variants)} arms asks "
            "for more than all the traffic"
        )
    if route.rollout is not None:
        yield f"{at('allocation')}: a route has a rollout or an allocation, not both"
    if route.kind == "outcomes":
        yield f"{at('allocation')}: an outcomes route has no allocation"
    yield from _check_allocation_segments(route, at)


def _check_allocation_segments(route: RouteModel, at: Any) -> Iterable[str]:
    """Segments by name (`region` or a quality segment) or declared here; values are labels (they travel
    in the exposure token and the state), and the segments a request can fall in stay few."""
    al = route.allocation
    assert al is not None
    quality = {s.name: s for s in route.quality.segments} if route.quality is not None else {}
    names: list[str] = []
    combos = 1
    for si, seg in enumerate(al.segments):
        where = at("allocation", "segments", si)
        if isinstance(seg, str):
            if seg == "region":
                values = sorted({b.region for v in route.variants for b in v.backends})
            elif seg in quality:
                values = list(quality[seg].values)
            else:
                yield (
                    f"{where}: segment {seg!r} is neither `region` nor one of the route's quality.segments; "
                    "declare it here: {name, source: claim, key, values}"
                )
                continue
            names.append(seg)
        else:
            names.append(seg.name)
            values = list(seg.values)
            if seg.source == "region" and seg.key is not None:
                yield f"{where}: a region segment takes no key (it is the request's region)"
            elif seg.source != "region" and not seg.key:
                yield f"{where}: a {seg.source} segment needs `key` (the {seg.source} name)"
            if len(set(values)) != len(values) or "other" in values:
                yield f"{where}: segment {seg.name!r} values must be distinct and not 'other'"
        bad = [v for v in values if not _ALLOCATION_VALUE.fullmatch(v)]
        if bad:
            yield f"{where}: segment value {bad[0]!r} is not a lower-case label (a-z, 0-9, '-')"
        combos *= len(set(values)) + 1
    if len(set(names)) != len(names):
        yield f"{at('allocation', 'segments')}: a segment is named twice"
    elif combos > MAX_ALLOCATION_SEGMENTS:
        yield (
            f"{at('allocation', 'segments')}: {combos} segments (each value and `other`, combined); "
            f"at most {MAX_ALLOCATION_SEGMENTS}"
        )


_ALLOCATION_VALUE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
MAX_ALLOCATION_SEGMENTS = 64  # segments of one bandit route: each has its own weights in the published state


def _check_features(route: RouteModel, at: Any) -> Iterable[str]:
    """The join's names: a Redis store, `view:feature` entries, defaults for each, known variants, a header
    the processor does not strip."""
    f = route.features
    if f is None:
        return
    if route.kind == "outcomes":
        yield f"{at('features')}: an outcomes route has no features"
    if urlsplit(f.store).scheme not in ("redis", "rediss", "unix") or "://" not in f.store:
        yield f"{at('features', 'store')}: features.store must be a redis://, rediss:// or unix:// URL"
    seen: set[str] = set()
    for i, view in enumerate(f.views):
        if view.count(":") != 1 or not all(view.split(":")):
            yield f"{at('features', 'views', i)}: {view!r} is not a `view:feature` entry"
        elif view in seen:
            yield f"{at('features', 'views', i)}: feature {view!r} is named twice"
        seen.add(view)
    if f.entity.header is not None and f.entity.header.lower().startswith(HEADER_PREFIX):
        yield (
            f"{at('features', 'entity', 'header')}: the entity cannot come from {f.entity.header!r}: "
            f"the gateway strips every {HEADER_PREFIX}* header a client sends"
        )
    defaults = f.fallback.defaults
    if defaults is not None:
        for name in defaults:
            if name not in seen:
                yield f"{at('features', 'fallback', 'defaults', name)}: {name!r} is not one of features.views"
        for name in f.views:
            if name not in defaults:
                yield f"{at('features', 'fallback', 'defaults')}: no default for {name!r} (every feature needs one)"
    if f.variants is not None:
        names = {v.name for v in route.variants} | {s.name for s in route.shadows}
        for i, name in enumerate(f.variants):
            if name not in names:
                yield f"{at('features', 'variants', i)}: {name!r} is not a variant or shadow of this route"


def _check_quality(route: RouteModel, at: Any) -> Iterable[str]:
    """Segments named once, each with its key (region has none) and distinct values; region
    values the route serves; the fallback a challenger of the route."""
    q = route.quality
    if q is None:
        return
    if route.kind == "outcomes":
        yield f"{at('quality')}: an outcomes route has no quality block"
        return
    seen: set[str] = set()
    regions = set(route.residency.allowed_regions or ()) or {b.region for v in route.variants for b in v.backends}
    for si, seg in enumerate(q.segments):
        if seg.name in seen:
            yield f"{at('quality', 'segments', si, 'name')}: duplicate segment name {seg.name!r}"
        seen.add(seg.name)
        if seg.source == "region" and seg.key is not None:
            yield f"{at('quality', 'segments', si, 'key')}: a region segment takes no key (it is the request's region)"
        if seg.source != "region" and seg.key is None:
            yield f"{at('quality', 'segments', si)}: a {seg.source} segment needs `key` (the {seg.source} name)"
        if len(set(seg.values)) != len(seg.values) or "other" in seg.values:
            yield (
                f"{at('quality', 'segments', si, 'values')}: segment {seg.name!r} values must be distinct and not "
                "`other` (the name of every undeclared value)"
            )
        if seg.source == "region":
            for vi, value in enumerate(seg.values):
                if value not in regions:
                    yield (
                        f"{at('quality', 'segments', si, 'values', vi)}: region {value!r} is not one this route "
                        f"serves {sorted(regions)}"
                    )
    if q.fallback is not None:
        names = [v.name for v in route.variants]
        if q.fallback not in names:
            yield (
                f"{at('quality', 'fallback')}: fallback names unknown variant {q.fallback!r} "
                f"(variants: {', '.join(names)})"
            )
        elif q.fallback == names[0]:
            yield f"{at('quality', 'fallback')}: the fallback must be a challenger, not control {q.fallback!r}"


def _quality(r: RouteModel) -> Quality | None:
    q = r.quality
    if q is None:
        return None
    segments = tuple(
        Segment(
            s.name,
            s.source,
            "" if s.source == "region" else (s.key or "").lower() if s.source == "header" else s.key or "",
            frozenset(s.values),
        )
        for s in q.segments
    )
    return Quality(
        q.alpha,
        q.min_samples,
        q.psi,
        q.js,
        q.wasserstein,
        q.prediction_drift,
        segments,
        q.margin,
        q.four_fifths,
        q.fallback,
    )


def _check_url(url: str, where: str) -> Iterable[str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        yield f"{where}: backend URL {url!r} does not parse: {exc}"
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        yield f"{where}: backend URL {url!r} must be http(s)://host[:port]"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        yield f"{where}: backend URL {url!r} must not carry a path, query or fragment"
    elif port == 0:
        yield f"{where}: backend URL {url!r} has port 0"


def _overlap_candidates(routes: Sequence[RouteModel | None]) -> list[tuple[int, int]]:
    """Pairs (i, j), j < i, that `_overlap` must compare, in order: two routes that both name a
    model overlap only if the models are equal, so those are compared within their model's group
    (a 1 000-route policy needs ~1 000 comparisons, not 500 000)."""
    by_model: dict[str, list[int]] = {}
    unmodelled: list[int] = []
    for i, r in enumerate(routes):
        if r is not None:
            (by_model.setdefault(r.match.model, []) if r.match.model is not None else unmodelled).append(i)
    pairs: list[tuple[int, int]] = []
    for i, r in enumerate(routes):
        if r is None:
            continue
        if r.match.model is None:
            pairs.extend((i, j) for j in range(i) if routes[j] is not None)
        else:
            pairs.extend((i, j) for j in sorted(unmodelled + by_model[r.match.model]) if j < i)
    return pairs


def _overlap(a: RouteModel, b: RouteModel) -> bool:
    ma, mb = a.match, b.match
    if ma.methods and mb.methods and not set(ma.methods) & set(mb.methods):
        return False
    if ma.host is not None and mb.host is not None and not _hosts_overlap(ma.host, mb.host):
        return False
    if ma.model is not None and mb.model is not None and ma.model != mb.model:
        return False
    paths_a = [p for p in (ma.path_prefix, OIP_MODEL_PREFIX + ma.model if ma.model else None) if p]
    paths_b = [p for p in (mb.path_prefix, OIP_MODEL_PREFIX + mb.model if mb.model else None) if p]
    return all(_segment_prefix(x, y) or _segment_prefix(y, x) for x in paths_a for y in paths_b)


def _hosts_overlap(a: str, b: str) -> bool:
    """Can one authority match both? Equal, or one has no port and names the other's host."""
    return a == b or (":" not in a and b.split(":", 1)[0] == a) or (":" not in b and a.split(":", 1)[0] == b)


def _compile(model: PolicyModel, filename: str, digest: str, base_dir: Path) -> Policy:
    jwt = model.jwt
    jwks = jwt.jwks if jwt.jwks.startswith("https://") else str((base_dir / jwt.jwks).resolve())
    settings = JwtSettings(
        issuer=jwt.issuer,
        audience=(jwt.audience,) if isinstance(jwt.audience, str) else tuple(jwt.audience),
        algorithms=tuple(jwt.algorithms),
        jwks=jwks,
        leeway_s=jwt.leeway_s,
        required=jwt.required,
        jwks_hosts=tuple(jwt.jwks_hosts) if jwt.jwks_hosts is not None else None,
    )
    routes = tuple(_with_digests(_COMPILED.route(r, base_dir)) for r in model.routes)
    return _index(filename, digest, settings, model.response_headers, routes)


class _CompiledRoutes(_Recent[tuple[str, str], Route]):
    """Compiled routes by their validated text and directory: a reload recompiles only the routes it
    changed (a one-route edit of a 1 000-route policy: ~0.2 s of compiling -> ~0.03 s of keys). A
    `Route` is immutable, so two policies may share one."""

    def __init__(self, size: int = 4096) -> None:
        super().__init__(size)
        # the same validated model (a route `_ROUTES` kept) -> its compiled route, without dumping it
        self._by_model: _Recent[tuple[int, str], tuple[RouteModel, Route]] = _Recent(size)

    def route(self, r: RouteModel, base_dir: Path) -> Route:
        where = str(base_dir)
        seen = self._by_model.get((id(r), where))
        if seen is not None and seen[0] is r:  # the entry holds r: its id cannot have been reused
            return seen[1]
        key = (r.model_dump_json(), where)
        found = self.get(key)
        compiled = found if found is not None else self.put(key, _compile_route(r, base_dir))
        self._by_model.put((id(r), where), (r, compiled))
        return compiled


_COMPILED = _CompiledRoutes()


def _backends(
    route: str, owner: str, specs: Iterable[Any], base_dir: Path, forward_authorization: bool = False
) -> tuple[Backend, ...]:
    out = []
    for i, b in enumerate(specs):
        parts = urlsplit(b.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        model = _model_reference(b.model, base_dir) if b.model else None
        cluster = cluster_name(route, owner, i)
        digest = routed_digest(model) if model is not None else None
        contract = None
        if isinstance(b.contract, str):
            contract = _model_reference(b.contract, base_dir)
        elif b.contract is not None:
            contract = b.contract.model_dump_json(exclude_none=True)
        out.append(
            Backend(
                b.url,
                parts.scheme,
                host,
                port,
                b.region,
                cluster,
                model,
                forward_authorization,
                digest,
                b.protocol,
                contract,
            )
        )
    return tuple(out)


def _with_digests(route: Route) -> Route:
    """``route`` with each variant backend's `routed_digest` as of now: a compiled route is reused while its
    text is unchanged (`_CompiledRoutes`), but a local model file may have been replaced since. A stat per
    local model; the same object when nothing changed."""
    if all(b.model is None for v in route.variants for b in v.backends):
        return route  # the common case, ~1 us (the loop below: ~9 us)
    variants = []
    for v in route.variants:
        backends = tuple(
            b if b.model is None or (d := routed_digest(b.model)) == b.digest else replace(b, digest=d)
            for b in v.backends
        )
        changed = any(new is not old for new, old in zip(backends, v.backends, strict=True))
        variants.append(replace(v, backends=backends, by_region=_by_region(backends)) if changed else v)
    if all(new is old for new, old in zip(variants, route.variants, strict=True)):
        return route
    return replace(route, variants=tuple(variants))


# --------------------------------------------------------------------------- routed model digests

_PINNED = re.compile(r"@sha256:([0-9a-fA-F]{64})$")
_ARTIFACT_SUFFIXES = (".onnx", ".sealed")
_MANIFEST = "manifest.json"  # a version directory of `cohortgate models push` (sidecar/artifacts.py)
_file_digests: dict[tuple[str, int, int, int], str | None] = {}  # (path, size, mtime_ns, inode) -> digest
_file_digests_lock = threading.Lock()
_FILE_DIGESTS_MAX = 1024


def routed_digest(reference: str) -> str | None:
    """``sha256:<hex>`` of the model bytes a backend's ``model:`` names, as far as the policy can know it
    without fetching anything -- what the gateway's audit line records as routed (docs/models.md):

    * a pinned reference (``…@sha256:<hex>``): its pin, which the sidecar refuses to serve anything else but;
    * a plain local file: the sha256 of its bytes, or None when it is sealed (the digest is of the plain
      model, which only the key opens) or unreadable;
    * a local store version (``file:///STORE/NAME/VERSION``): its manifest's digest (the sidecar checks the
      manifest's signature and the bytes against it);
    * anything else (an unpinned remote version): None; the served digest Envoy logs still says.

    Files are read at policy compile time only (a reload runs in a thread), once per (path, size, mtime):
    never per request. The one I/O of the compiled policy besides reading the policy file itself.
    """
    pinned = _PINNED.search(reference)
    if pinned is not None:
        return "sha256:" + pinned[1].lower()
    if "://" not in reference:
        return _file_digest(Path(reference), manifest=False)
    parts = urlsplit(reference)
    if parts.scheme.lower() != "file" or parts.path.rstrip("/").endswith(_ARTIFACT_SUFFIXES):
        return None  # remote, or a bare file:// artifact (served only when pinned)
    return _file_digest(Path(unquote(parts.path)) / _MANIFEST, manifest=True)


def model_digests_now(policy: Policy) -> dict[str, str]:
    """cluster -> `routed_digest` of each backend's model as the files are now (a stat per local model,
    a hash only when one changed): compared with ``policy.model_digests`` it tells whether a model file
    was replaced in place since the policy compiled."""
    return {
        b.cluster: d
        for r in policy.routes
        for v in r.variants
        for b in v.backends
        if b.model is not None and (d := routed_digest(b.model)) is not None
    }


def _file_digest(path: Path, *, manifest: bool) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _file_digests_lock:
        if key in _file_digests:
            return _file_digests[key]
    digest = _read_manifest_digest(path) if manifest else _hash_file(path)
    with _file_digests_lock:
        _file_digests[key] = digest
        while len(_file_digests) > _FILE_DIGESTS_MAX:
            del _file_digests[next(iter(_file_digests))]
    return digest


def _hash_file(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            if f.read(len(SEALED_ARTIFACT_MAGIC)) == SEALED_ARTIFACT_MAGIC:
                return None
            f.seek(0)
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _read_manifest_digest(path: Path) -> str | None:
    try:
        digest = json.loads(path.read_bytes()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else None


def _model_reference(model: str, base_dir: Path) -> str:
    """A plain path is resolved against the policy's directory; a reference (``scheme://…``) is kept."""
    return model if "://" in model else str((base_dir / model).resolve())


def _by_region(backends: tuple[Backend, ...]) -> Mapping[str, tuple[Backend, ...]]:
    regions: dict[str, list[Backend]] = {}
    for b in backends:
        regions.setdefault(b.region, []).append(b)
    return MappingProxyType({k: tuple(v) for k, v in regions.items()})


def _eligibility(p: Predicate) -> Eligibility:
    source, key = ("claim", p.claim) if p.claim is not None else ("header", (p.header or "").lower())
    if p.exists is not None:
        return Eligibility(source, key, "exists", flag=p.exists)
    if p.equals is not None:
        return Eligibility(source, key, "equals", frozenset([p.equals]))
    if p.in_ is not None:
        return Eligibility(source, key, "in", frozenset(p.in_))
    return Eligibility(source, key, "not_in", frozenset(p.not_in or ()))


def _allocation(r: RouteModel) -> Allocation | None:
    al = r.allocation
    if al is None:
        return None
    metric = next(m for m in r.metrics if m.name == al.reward)
    quality = {s.name: s for s in r.quality.segments} if r.quality is not None else {}
    defs = []
    for seg in al.segments:
        if seg == "region":
            regions = frozenset(b.region for v in r.variants for b in v.backends)
            defs.append(Segment("region", "region", "", regions))
        else:
            model = quality[seg] if isinstance(seg, str) else seg
            key = "" if model.source == "region" else (model.key or "")
            key = key.lower() if model.source == "header" else key
            defs.append(Segment(model.name, model.source, key, frozenset(model.values)))
    return Allocation(
        al.strategy,
        al.reward,
        metric.kind,
        metric.direction,
        al.update_s,
        al.min_share,
        al.epsilon,
        tuple(s.name for s in defs),
        al.seed,
        tuple(defs),
    )


def _features(r: RouteModel, base_dir: Path) -> Features | None:
    f = r.features
    if f is None:
        return None
    fb = f.fallback
    defaults = None
    if fb.defaults is not None:
        defaults = tuple(
            tuple(float(x) for x in (d if isinstance(d, list) else [d])) for d in (fb.defaults[v] for v in f.views)
        )
    return Features(
        store=f.store,
        project=f.project,
        join_key=f.join_key,
        entity_source="claim" if f.entity.claim is not None else "header",
        entity_key=f.entity.claim if f.entity.claim is not None else (f.entity.header or "").lower(),
        entity_type=f.entity_type,
        views=tuple(f.views),
        input=f.input,
        budget_ms=f.budget_ms,
        max_age_s=f.max_age_s,
        fallback_model=_model_reference(fb.model, base_dir) if fb.model else None,
        defaults=defaults,
        variants=frozenset(f.variants) if f.variants is not None else None,
    )


def _compile_route(r: RouteModel, base_dir: Path) -> Route:
    variants = []
    for v in r.variants:
        backends = _backends(r.name, v.name, v.backends, base_dir, r.forward_authorization)
        variants.append(Variant(v.name, v.weight, backends, _by_region(backends)))
    shadows = []
    for s in r.shadows:
        backends = _backends(r.name, s.name, s.backends, base_dir)  # shadows never get Authorization
        shadows.append(
            Shadow(
                name=s.name,
                percent=s.percent,
                threshold=round(s.percent * cohorts.PER_PERCENT),
                backends=backends,
                by_region=_by_region(backends),
                key=cohorts.salt_key(f"shadow:{r.name}:{s.name}"),
            )
        )
    index = {v.name: i for i, v in enumerate(variants)}
    patterns = r.auth.identities
    unit = r.cohorts.unit
    res = r.residency
    salt = r.cohorts.salt or r.name
    bounds, owners = cohorts.layout([v.weight for v in variants])
    regions = (
        set(res.allowed_regions)
        if res.allowed_regions is not None
        else {b.region for v in variants for b in v.backends}
    )
    return Route(
        name=r.name,
        path_prefix=r.match.path_prefix,
        model=r.match.model,
        host=r.match.host,
        methods=frozenset(r.match.methods) or None,
        identities=frozenset(p for p in patterns if not p.endswith("*")),
        identity_prefixes=tuple(p[:-1] for p in patterns if p.endswith("*")),
        identity_any=not patterns,
        scopes=frozenset(r.auth.scopes),
        claims=MappingProxyType({k: frozenset(v) for k, v in r.auth.claims.items()}),
        unit_source="claim" if unit.claim is not None else "header",
        unit_key=unit.claim if unit.claim is not None else (unit.header or "").lower(),
        salt=salt,
        salt_key=cohorts.salt_key(salt),
        eligibility=tuple(_eligibility(p) for p in r.cohorts.eligibility),
        overrides=MappingProxyType({u: index[name] for u, name in r.cohorts.overrides.items()}),
        residency_source="claim" if res.source.claim is not None else "header",
        residency_key=res.source.claim if res.source.claim is not None else (res.source.header or "").lower(),
        default_region=res.default_region,
        allowed_regions=frozenset(regions),
        fallback_control=res.on_missing_region == "fallback_control",
        variants=tuple(variants),
        shadows=tuple(shadows),
        guardrails=Guardrails(**r.guardrails.model_dump()),
        rollout=Rollout(r.rollout.variant, tuple(r.rollout.steps), r.rollout.interval_s, r.rollout.promote_on_win)
        if r.rollout
        else None,
        bounds=bounds,
        owners=owners,
        trusted_keys=tuple(k if k.startswith("ed25519:") else str((base_dir / k).resolve()) for k in r.trusted_keys),
        kind=r.kind,
        metrics=tuple(Metric(**m.model_dump()) for m in r.metrics),
        features=_features(r, base_dir),
        quality=_quality(r),
        allocation=_allocation(r),
        experiment=Experiment(
            r.experiment.hypothesis, r.experiment.owner, r.experiment.primary_metric, r.experiment.start.isoformat()
        )
        if r.experiment
        else None,
    )
