"""The policy file format, as pydantic models: the schema platform teams write against.

These models only describe and type-check the YAML; cross-field rules (weights sum to 100,
regions, overlaps) live in `policy.py`, which also compiles the result into the frozen, precomputed
`Policy` the hot path reads. `cohortgate policy schema` prints the JSON Schema generated from here.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from cohortgate.core.datacontract import ContractSpec

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
JWT_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class JwtSpec(_Strict):
    """How bearer tokens are verified (for every route)."""

    issuer: str = Field(description="Required `iss` claim.")
    audience: str | list[str] = Field(description="Accepted `aud` value(s).")
    algorithms: list[Literal[JWT_ALGORITHMS]] = Field(  # type: ignore[valid-type]
        default=["ES256"],
        min_length=1,
        description="Signature algorithm allow-list. `none` and HMAC algorithms are never accepted.",
    )
    jwks: str = Field(description="JWKS file (relative to the policy file) or an https:// URL.")
    jwks_hosts: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Hosts an https:// `jwks` may name; a policy (or a reload) naming another host is refused. "
        "Redirects are never followed.",
    )
    leeway_s: int = Field(default=30, ge=0, le=300, description="Clock skew tolerated on exp/nbf.")
    required: bool = Field(default=True, description="Refuse requests without a valid token (401).")


class Source(_Strict):
    """Where a value comes from: exactly one of a verified JWT claim or a request header."""

    claim: str | None = Field(default=None, description="Name of a claim in the verified JWT.")
    header: str | None = Field(default=None, description="Name of a request header (case-insensitive).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.claim is None) == (self.header is None):
            raise ValueError("give exactly one of `claim` or `header`")
        return self


class Predicate(_Strict):
    """An eligibility test on a claim or header; a unit failing any predicate gets control."""

    claim: str | None = None
    header: str | None = None
    in_: list[str] | None = Field(default=None, alias="in", description="Value must be one of these.")
    not_in: list[str] | None = Field(default=None, description="Value must not be one of these.")
    equals: str | None = Field(default=None, description="Value must equal this.")
    exists: bool | None = Field(default=None, description="Value must be present (true) or absent (false).")

    @model_validator(mode="after")
    def _shape(self) -> Predicate:
        if (self.claim is None) == (self.header is None):
            raise ValueError("give exactly one of `claim` or `header`")
        ops = [op for op in (self.in_, self.not_in, self.equals, self.exists) if op is not None]
        if len(ops) != 1:
            raise ValueError("give exactly one of `in`, `not_in`, `equals` or `exists`")
        return self


HOST_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$"


class Match(_Strict):
    """Which requests a route takes. Prefixes match whole path segments."""

    path_prefix: str | None = Field(default=None, pattern=r"^/", description="e.g. /v2/models/ae-scoring")
    model: str | None = Field(
        default=None, min_length=1, pattern=r"^[^/\s]+$", description="OIP v2 model name in /v2/models/{name}."
    )
    methods: list[Literal[HTTP_METHODS]] = Field(  # type: ignore[valid-type]
        default=[], description="Allowed methods; empty means any."
    )
    host: str | None = Field(
        default=None,
        pattern=HOST_PATTERN,
        description="Request authority (Host / :authority), lower case, optional :port; without a port any "
        "port matches. How gRPC clients are routed (KServe's way): their model name is in the body.",
    )

    @model_validator(mode="after")
    def _something(self) -> Match:
        if self.path_prefix is None and self.model is None and self.host is None:
            raise ValueError("give `path_prefix`, `model`, `host` or several")
        return self


class Auth(_Strict):
    """Who may call a route, on top of the CA-verified mTLS handshake and the JWT."""

    identities: list[str] = Field(
        default=[], description="SPIFFE IDs allowed; a trailing `*` matches any suffix. Empty: any."
    )
    scopes: list[str] = Field(default=[], description="Scopes the token must all carry.")
    claims: dict[str, list[str]] = Field(default={}, description="Claim -> allowed values.")


class Cohorts(_Strict):
    """How users are bucketed: a stable hash of salt and unit, never a random draw."""

    unit: Source = Field(default=Source(claim="sub"), description="The unit of assignment.")
    salt: str | None = Field(default=None, min_length=1, description="Per-experiment salt (default: route name).")
    eligibility: list[Predicate] = Field(default=[], description="All must pass, or the unit gets control.")
    overrides: dict[str, str] = Field(default={}, description="Unit -> variant, for QA users.")


class Residency(_Strict):
    """Where a request's data must stay. Never routed or mirrored outside its region."""

    source: Source = Field(default=Source(claim="residency"), description="Where the region comes from.")
    default_region: str | None = Field(
        default=None, description="Region assumed when the request has none; null denies (451)."
    )
    allowed_regions: list[str] | None = Field(
        default=None, description="Regions this route serves (default: every region its variants have)."
    )
    on_missing_region: Literal["fallback_control", "deny"] = Field(
        default="fallback_control",
        description="When the assigned variant has no backend in the region: use control's, or deny (451).",
    )


def _contract_kind(value: object) -> str:
    return "[file]" if isinstance(value, str) else "[inline]"


# A backend's ``contract:``: a file name, or the contract itself, told apart before validation so an
# error points inside the contract rather than at both arms (bracketed tags: policy.py drops them from
# the error's location, as it drops pydantic's own union arms).
DataContract = Annotated[
    Annotated[str, Tag("[file]")] | Annotated[ContractSpec, Tag("[inline]")], Discriminator(_contract_kind)
]


class Backend(_Strict):
    url: str = Field(description="http(s)://host:port of the model server.")
    region: str = Field(min_length=1, description="Data-residency region of this backend.")
    model: str | None = Field(
        default=None,
        description="Local ONNX file or a model reference (file://, https://, s3:// pinned @sha256: or a signed "
        "version; docs/models.md); `cohortgate up` runs a sidecar for it. Absent: external.",
    )
    protocol: Literal["http", "grpc"] = Field(
        default="http",
        description="grpc: Envoy speaks HTTP/2 to this backend (OIP v2 gRPC); http: HTTP/1.1.",
    )
    contract: DataContract | None = Field(
        default=None,
        description="The model's data contract (docs/sidecar.md): a JSON file (relative to the policy file) or the "
        "contract inline; `cohortgate up` hands it to the model's sidecar (--contract).",
    )

    @model_validator(mode="after")
    def _contract_needs_a_model(self) -> Backend:
        if self.contract is not None and self.model is None:
            raise ValueError("`contract` is checked by the sidecar that serves `model`: give `model` too")
        return self


class Variant(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    weight: int = Field(ge=0, le=100, description="Percentage of eligible units; all weights sum to 100.")
    backends: list[Backend] = Field(min_length=1)


class Shadow(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    percent: float = Field(gt=0, le=100, description="Share of allowed requests mirrored to this shadow.")
    backends: list[Backend] = Field(min_length=1)


class Guardrails(_Strict):
    """Absolute limits the controller enforces on every non-control variant."""

    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Error (5xx, no response) share a challenger may not exceed: rolled back once a sequential "
        "test shows it above this with confidence while control is below it; control above it halts and alerts.",
    )
    max_p99_ms: float | None = Field(
        default=None,
        gt=0,
        description="p99 upstream latency limit, tested as 'more than 1 % of requests slower than this' (same rules).",
    )
    min_samples: int = Field(
        default=200,
        ge=1,
        description="Requests on a rollout step before it may be promoted (the sequential tests hold at any size).",
    )
    alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Chance of ever rolling back a healthy challenger: alpha/4 for each harm test (errors, "
        "slow requests) and each guardrail (error rate, p99). See docs/statistics.md.",
    )
    latency_margin_ms: float = Field(
        default=5.0,
        ge=0,
        description="A request counts as slow when it takes longer than control's p95 plus this margin: "
        "a slowdown smaller than the margin is not harm, however many samples show it.",
    )


class Rollout(_Strict):
    """Progressive delivery: the controller promotes `variant` step by step while it stays healthy."""

    variant: str = Field(pattern=NAME_PATTERN)
    steps: list[int] = Field(min_length=1, description="Weights to move through, e.g. [5, 25, 50, 100].")
    interval_s: float = Field(default=30, gt=0, description="Minimum time on a step before promotion.")
    promote_on_win: bool = Field(
        default=False,
        description="Promote to the last step as soon as the route's primary outcome metric wins (always valid) "
        "and every guardrail metric is non-inferior (docs/outcomes.md); needs a primary metric.",
    )


class Metric(_Strict):
    """An outcome metric of a route (docs/outcomes.md): what a client's outcomes are read as."""

    name: str = Field(pattern=NAME_PATTERN, description="The name outcomes carry (`metric` in POST /v1/outcomes).")
    kind: Literal["binary", "mean", "ratio"] = Field(
        default="binary",
        description="binary: share of units that converted; mean: per-unit total (revenue per user); "
        "ratio: per exposure (clicks per session, delta method).",
    )
    direction: Literal["increase", "decrease"] = Field(default="increase", description="Which way is better.")
    role: Literal["primary", "secondary", "guardrail"] = Field(
        default="primary",
        description="primary: can win or lose; secondary: reported; guardrail: must be non-inferior by `margin`.",
    )
    margin: float | None = Field(
        default=None, ge=0, description="Guardrails: how much worse than control is acceptable (relative: 0.01 = 1 %)."
    )
    margin_abs: bool = Field(default=False, description="Read `margin` in the metric's own units, not relative.")
    planned_units: int = Field(
        default=10_000, ge=2, description="Units (both arms) the plan needs (`cohortgate experiment plan`)."
    )
    attribution_window_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        le=90 * 24 * 3600.0,
        description="An outcome reported longer than this after the response is not attributed (expired).",
    )
    covariate: str | None = Field(default=None, min_length=1, description="Pre-exposure covariate name (CUPED).")

    @model_validator(mode="after")
    def _guardrail_margin(self) -> Metric:
        if self.role == "guardrail" and self.margin is None:
            raise ValueError("a guardrail metric needs a non-inferiority `margin`")
        return self


class Experiment(_Strict):
    """The experiment's catalog entry: what it tests and who answers for it (shown in reports, archived)."""

    hypothesis: str = Field(min_length=1, description="What the challenger should change, and why.")
    owner: str = Field(min_length=1, description="Who answers for the experiment (a person or team).")
    primary_metric: str | None = Field(
        default=None, description="The metric that decides it; must be one of the route's `metrics`."
    )
    start: date = Field(description="The day the experiment started (YYYY-MM-DD).")


class Allocation(_Strict):
    """Adaptive allocation (docs/bandits.md): the controller moves the weights toward the arm with the
    best reward; a unit keeps the arm it was first given (a signed assignment it echoes back)."""

    strategy: Literal["thompson", "ucb", "epsilon_greedy"] = Field(
        default="thompson", description="thompson: Beta/Normal posterior sampling; ucb: UCB1; epsilon_greedy."
    )
    reward: str = Field(pattern=NAME_PATTERN, description="The route's outcome metric the bandit maximises.")
    update_s: float = Field(default=10.0, ge=1, le=86_400, description="How often the weights are recomputed.")
    min_share: float = Field(
        default=0.05, ge=0.01, lt=0.5, description="Least share of new units any live arm keeps (exploration)."
    )
    epsilon: float = Field(default=0.1, gt=0, lt=1, description="epsilon_greedy only: the share spread evenly.")
    segments: list[str | Segment] = Field(
        default=[],
        max_length=3,
        description="Per-segment allocation (a contextual bandit): `region` (the request's residency, its values "
        "the route's regions), the name of one of the route's `quality.segments`, or a segment declared here "
        "({name, source, key, values}); any undeclared value is `other`.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the controller's draws (Thompson, epsilon).")


class FeatureFallback(_Strict):
    """What serves a request whose features cannot be joined: exactly one of a model or default values."""

    model: str | None = Field(
        default=None,
        description="A global model that needs no joined features (a file or a model reference, docs/models.md): "
        "it takes the request's own input.",
    )
    defaults: dict[str, float | list[float]] | None = Field(
        default=None, description="`view:feature` -> the value joined instead (one for every feature in `views`)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> FeatureFallback:
        if (self.model is None) == (self.defaults is None):
            raise ValueError("give exactly one of `model` or `defaults`")
        return self


class Features(_Strict):
    """Online features joined into the model's input by its sidecar, from Feast's Redis online store
    (docs/features.md). The gateway passes the entity id; a miss, a stale row or a slow store serves the fallback."""

    store: str = Field(description="redis://[:password@]host:port/db (or rediss://) of Feast's Redis online store.")
    project: str = Field(min_length=1, description="The Feast project.")
    join_key: str = Field(min_length=1, description="The Feast entity's join key, e.g. user_id.")
    entity: Source = Field(description="Where the entity id comes from: a verified JWT claim or a request header.")
    entity_type: Literal["string", "int64"] = Field(
        default="string", description="The join key's Feast value type (it changes the Redis key)."
    )
    views: list[str] = Field(min_length=1, description="`view:feature` entries, appended to the input in this order.")
    input: str | None = Field(
        default=None, min_length=1, description="The model input the joined values extend (default: its first)."
    )
    budget_ms: float = Field(default=5.0, gt=0, le=10_000, description="The store's round trip may take this long.")
    max_age_s: float | None = Field(default=3600.0, gt=0, description="Rows older than this are stale (null: any age).")
    fallback: FeatureFallback
    variants: list[str] | None = Field(
        default=None, description="The variants and shadows whose models join (default: all of them)."
    )


class Segment(_Strict):
    """A declared fact the gateway already sees, by which quality is judged per segment (docs/quality.md).

    Only the listed values are kept; any other value (or none) is the segment ``other``, so the access
    log never carries more than ``len(values) + 1`` values per segment, whatever clients send."""

    name: str = Field(pattern=NAME_PATTERN, description="The segment's name in the access log and the dashboard.")
    source: Literal["region", "claim", "header"] = Field(
        description="region: the request's residency region; claim: a verified JWT claim; header: a request header."
    )
    key: str | None = Field(default=None, min_length=1, description="The claim or header name (not for region).")
    values: list[str] = Field(min_length=1, max_length=16, description="The declared values; anything else is `other`.")


class Quality(_Strict):
    """Model-quality guardrails of a route (docs/quality.md): drift, segments, disparate impact, fallback."""

    alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Chance of ever rolling back a challenger that is no worse in any segment.",
    )
    min_samples: int = Field(
        default=500, ge=10, description="Values a window needs, on each side, before a feature's drift is judged."
    )
    psi: float | None = Field(default=0.2, gt=0, description="Population stability index over which a feature drifts.")
    js: float | None = Field(default=0.1, gt=0, le=1, description="Jensen-Shannon distance (base 2) threshold.")
    wasserstein: float | None = Field(
        default=0.1, gt=0, description="Wasserstein distance, in reference standard deviations, threshold."
    )
    prediction_drift: float | None = Field(
        default=0.1,
        gt=0,
        le=1,
        description="JS distance between a challenger's and control's outputs on the same window; null: off.",
    )
    segments: list[Segment] = Field(default=[], max_length=4, description="Segments judged separately.")
    margin: float = Field(
        default=0.1,
        ge=0,
        description="Within a segment, a challenger's error or slow-request odds may exceed control's by this "
        "much (0.1 = 10 %) before it counts as worse.",
    )
    four_fifths: float | None = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Least ratio of positive-prediction rates between a segment's values (four-fifths rule); "
        "null: off.",
    )
    fallback: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="A challenger that takes the traffic when control's inputs drift (drift-aware switching).",
    )


class Route(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["model", "outcomes"] = Field(
        default="model",
        description="model: an A/B-tested model endpoint; outcomes: the ingest of outcome reports "
        "(POST /v1/outcomes), forwarded to the controller's /outcomes; one variant, its backend the controller API.",
    )
    match: Match
    auth: Auth = Auth()
    cohorts: Cohorts = Cohorts()
    residency: Residency = Residency()
    variants: list[Variant] = Field(min_length=1, description="Control first.")
    shadows: list[Shadow] = []
    guardrails: Guardrails = Guardrails()
    rollout: Rollout | None = None
    forward_authorization: bool = Field(
        default=False,
        description="Pass the client's Authorization header on to this route's variants, for backends "
        "that check it themselves; by default Envoy removes it before any upstream. Shadows never get it.",
    )
    metrics: list[Metric] = Field(
        default=[], description="Outcome metrics read on this route (docs/outcomes.md); at most one primary."
    )
    experiment: Experiment | None = Field(
        default=None, description="The experiment's catalog entry (hypothesis, owner, primary metric, start)."
    )
    allocation: Allocation | None = Field(
        default=None, description="Adaptive (bandit) allocation; absent: the variants' fixed weights (the default)."
    )
    features: Features | None = Field(
        default=None, description="Online features joined into the input by the sidecar (docs/features.md)."
    )
    quality: Quality | None = Field(
        default=None, description="Model-quality guardrails: drift, segments, fairness, fallback (docs/quality.md)."
    )
    trusted_keys: list[str] = Field(
        default=[],
        description="Public keys (`ed25519:<base64>` or a PEM path) that may sign this route's models; "
        "when set, its sidecars serve only store versions signed by one of them (docs/models.md).",
    )


class PolicyModel(_Strict):
    version: Literal[1] = 1
    jwt: JwtSpec
    response_headers: bool = Field(
        default=True, description="Add x-cohortgate-variant / x-cohortgate-route to responses."
    )
    routes: list[Route] = Field(min_length=1)
