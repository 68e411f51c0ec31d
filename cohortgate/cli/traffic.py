"""`cohortgate traffic`: realistic demo load on the running stack, so the experiment visibly evolves.

Many sticky users (``user-00000`` ...), each with a residency drawn once from ``--residency-mix``
and a token minted once; requests are paced open-loop at ``--rps`` (a slow answer never slows the
schedule, as with real clients), each from a user drawn at random, over mTLS to Envoy. Every second
one line: requests/s, status counts and which variants answered, so a rollback shows as the
canary's count falling to zero; the controller's rollbacks (read from its audit trail) are printed
as they happen. At the end a summary: answers by status and by variant, latency, rollbacks seen.
Everything random takes ``--seed``.

With ``--outcomes-model`` it also plays the shoppers of an outcome experiment (docs/outcomes.md):
visitors of that model, each a fresh unit (``x-visitor-id``), paced at ``--outcomes-rps``; each
answered visit converts or not at its variant's planted rate (``--conversion``), decided by a keyed
hash of the seed and the visitor (the same seed, the same conversions), and its outcome -- 1 or 0,
with the response's exposure token -- is posted in batches to ``POST /v1/outcomes`` every second.
The zeros are posted too: the controller does not yet learn exposures from the access log, so a
visitor who never reports would be missing rather than a non-conversion.

With ``--drift feature=N[,after=S][,by=F][,variant=V]`` it plants input drift (docs/quality.md): from
S seconds on, feature N of every row it sends is multiplied by F (default 1.5) -- for every user, or
only for the users variant V answers (learnt from the sticky ``x-cohortgate-variant`` answers), so a
canary's inputs can move while control's do not, as a broken feature pipeline in front of one model
would; the route's ``quality:`` block then rolls it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from cohortgate.cli._stack import (
    NoStack,
    add_controller_options,
    add_gateway_options,
    add_state_dir,
    stack_info,
    state_dir,
)
from cohortgate.core.contract import HEADER_EXPOSURE, HEADER_VARIANT
from cohortgate.local.shoppers import OutcomeDemo, outcome_for, visitor
from cohortgate.support.durations import duration_arg

ROLLBACK_POLL_S = 1.0
OUTCOMES_PATH = "/v1/outcomes"  # the policy's `kind: outcomes` route (policies/example.yaml)
OUTCOMES_FLUSH_S = 1.0  # outcomes are posted in one batch this often
VISIT_TOKEN_TTL_S = 600  # a visitor's own token: one request, then its outcome within the attribution window
VISITOR_HEADER = "x-visitor-id"  # the shop route's unit: `cohorts.unit: {header: x-visitor-id}`
DESCRIPTION = (
    "Drive realistic load through the running stack, so the experiment visibly evolves: many sticky "
    "users, each with a residency drawn once from --residency-mix and a token minted once, paced open "
    "loop at --rps over mTLS to Envoy. Every second one line (requests/s, statuses, the variants that "
    "answered); the controller's rollbacks as they happen; a summary at the end. Everything random "
    "takes --seed."
)

if TYPE_CHECKING:
    from cohortgate.local.client import StackInfo


def parse_mix(text: str) -> dict[str, float]:
    """``ae=0.3,eu=0.7`` -> shares normalised to sum to 1 (``eu`` alone means everyone)."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        region, sep, share = part.partition("=")
        try:
            value = float(share) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad share in {part!r}: use REGION=SHARE, e.g. ae=0.3") from None
        if not region.strip() or value < 0:
            raise argparse.ArgumentTypeError(f"bad entry {part!r}: use REGION=SHARE, e.g. ae=0.3")
        mix[region.strip()] = value
    total = sum(mix.values())
    if total <= 0:
        raise argparse.ArgumentTypeError("the residency mix needs a positive share")
    return {region: share / total for region, share in mix.items()}


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("the share must be within [0, 1]")
    return value


def parse_rates(text: str) -> dict[str, float]:
    """``control=0.10,big-images=0.15`` -> each variant's conversion probability."""
    rates: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        variant, sep, rate = part.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or not variant.strip() or not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"bad entry {part!r}: use VARIANT=RATE with a rate in [0, 1]")
        rates[variant.strip()] = value
    if not rates:
        raise argparse.ArgumentTypeError("name at least one VARIANT=RATE")
    return rates


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "traffic",
        help="drive sticky multi-user demo traffic through the running stack",
        description=DESCRIPTION,
    )
    p.add_argument("--users", type=_positive(int), default=1000, help="distinct users (default 1000)")
    p.add_argument("--rps", type=_positive(float), default=100.0, help="requests per second, open loop (default 100)")
    p.add_argument("--duration", type=duration_arg, default=60.0, help="how long, e.g. 60s or 5m (default 60s)")
    p.add_argument(
        "--residency-mix",
        type=parse_mix,
        default=parse_mix("ae=0.3,eu=0.7"),
        help="users' residency claims, e.g. ae=0.3,eu=0.7 (the default)",
    )
    p.add_argument(
        "--bad-share",
        type=_share,
        default=0.0,
        metavar="F",
        help="this fraction of requests misbehaves as client apps do: no token (401), a token without "
        "the route's scope (403), a residency no backend serves (451) (default 0)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed for users, regions and inputs (default 1)")
    p.add_argument("--model", default="tabular", help="OIP model name to call (default tabular)")
    p.add_argument("--client", default="app-demo", help="client certificate name (default app-demo)")
    p.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=512,
        help="requests allowed in flight; beyond it a due request is skipped and counted (default 512)",
    )
    add_state_dir(p)
    add_gateway_options(p)
    add_controller_options(p)
    p.add_argument(
        "--outcomes-model",
        metavar="MODEL",
        help="also send visitors to this OIP model (a route with outcome metrics) and post each visit's "
        "conversion with its exposure token to /v1/outcomes (needs --conversion)",
    )
    p.add_argument("--outcomes-rps", type=_positive(float), default=30.0, help="visitors per second (default 30)")
    p.add_argument(
        "--conversion",
        type=parse_rates,
        metavar="VARIANT=RATE,...",
        help="each variant's planted conversion rate, e.g. control=0.10,big-images=0.15,small-images=0.05",
    )
    p.add_argument("--metric", default="conversion", help="the binary metric outcomes name (default conversion)")
    p.add_argument(
        "--until-rollback",
        action="store_true",
        help="stop as soon as the controller rolls a variant back; exit 1 if none did (demo scripts, tests)",
    )
    p.add_argument(
        "--wait",
        type=duration_arg,
        default=None,
        metavar="S",
        help="wait up to this long for cohortgate up to write its run.json (e.g. 2m), for scripts that start both",
    )
    p.add_argument(
        "--drift",
        type=parse_drift,
        default=None,
        metavar="feature=N[,after=S][,by=F][,variant=V]",
        help="plant input drift: from S seconds on (default 0) multiply feature N of each row by F (default 1.5), "
        "for every user or only those variant V answers (docs/quality.md)",
    )
    p.set_defaults(func=_traffic)


# ------------------------------------------------------------------------------ the plan (pure)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    users: int = 1000
    rps: float = 100.0
    duration_s: float = 60.0
    residency_mix: Mapping[str, float] = field(default_factory=lambda: {"ae": 0.3, "eu": 0.7})
    seed: int = 1
    model: str = "tabular"
    client: str = "app-demo"
    max_in_flight: int = 512
    until_rollback: bool = False
    bad_share: float = 0.0
    outcomes: OutcomeDemo | None = None
    drift: Drift | None = None


def plan_users(count: int, mix: Mapping[str, float], seed: int) -> list[tuple[str, str]]:
    """``(sub, region)`` per user, the same for the same arguments (so cohorts are reproducible)."""
    rng = random.Random(seed)
    regions = sorted(mix)
    weights = [mix[r] for r in regions]
    return [(f"user-{i:05d}", rng.choices(regions, weights)[0]) for i in range(count)]


def due(elapsed_s: float, rps: float) -> int:
    """How many requests an open-loop schedule at ``rps`` has started ``elapsed_s`` after its start."""
    # The epsilon absorbs float error, so the request due exactly at ``k / rps`` counts at that instant.
    return int(elapsed_s * rps + 1e-6) + 1 if elapsed_s >= 0 else 0


def bodies(seed: int, count: int = 64) -> list[bytes]:
    """``count`` encoded OIP bodies: the demo rows, each feature jittered by up to ±5 %."""
    from cohortgate.local.client import DEMO_ROWS, oip_body

    rng = random.Random(seed)
    out = []
    for i in range(count):
        row = DEMO_ROWS[i % len(DEMO_ROWS)]
        out.append(json.dumps(oip_body([[v * (1 + rng.uniform(-0.05, 0.05)) for v in row]])).encode())
    return out


@dataclass(frozen=True, slots=True)
class Drift:
    """Planted input drift: feature ``feature`` times ``by`` from ``after_s``, for ``variant``'s users (None: all)."""

    feature: int
    after_s: float = 0.0
    by: float = 1.5
    variant: str | None = None

    def applies(self, elapsed_s: float, variant: str | None) -> bool:
        """Does a request sent ``elapsed_s`` into the run, by a user last answered by ``variant``, drift?"""
        return elapsed_s >= self.after_s and (self.variant is None or variant == self.variant)


def parse_drift(text: str) -> Drift:
    """``feature=N[,after=S][,by=F][,variant=V]`` (argparse type: a clear sentence when it is wrong)."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("feature", "after", "by", "variant") or not value:
            raise argparse.ArgumentTypeError(f"expected feature=N[,after=S][,by=F][,variant=V], got {part!r}")
        fields[key] = value
    if "feature" not in fields:
        raise argparse.ArgumentTypeError("--drift needs feature=N (the column of the model's input to shift)")
    try:
        drift = Drift(
            int(fields["feature"]),
            duration_arg(fields["after"]) if "after" in fields else 0.0,
            float(fields.get("by", 1.5)),
            fields.get("variant"),
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--drift {text!r}: {exc}") from None
    if drift.feature < 0 or drift.after_s < 0:
        raise argparse.ArgumentTypeError("--drift: feature and after are not negative")
    return drift


def drifted_bodies(seed: int, drift: Drift, count: int = 64) -> list[bytes]:
    """`bodies` with feature ``drift.feature`` of every row multiplied by ``drift.by`` (same rows, same jitter)."""
    out = []
    for raw in bodies(seed, count):
        doc = json.loads(raw)
        tensor = doc["inputs"][0]
        width = tensor["shape"][-1]
        if drift.feature >= width:
            raise ValueError(f"--drift feature={drift.feature}: the demo rows have {width} features (0..{width - 1})")
        data = tensor["data"]
        for i in range(drift.feature, len(data), width):
            data[i] *= drift.by
        out.append(json.dumps(doc).encode())
    return out


def new_rollbacks(records: Iterable[Any], seen: set[str], since: float) -> list[Mapping[str, Any]]:
    """The controller's rollback records (``/audit``, newest first) made at or after ``since`` and
    not yet in ``seen`` (which this updates), oldest first."""
    out = []
    for record in reversed(list(records)):
        if not isinstance(record, Mapping) or record.get("action") != "rollback":
            continue
        try:
            ts = float(record.get("ts", 0))
        except (TypeError, ValueError):
            continue
        key = f"{record.get('route')}/{record.get('variant')}@{ts}"
        if ts >= since and key not in seen:
            seen.add(key)
            out.append(record)
    return out


class Tally:
    """Counts per status and per variant, and latencies, for the last second and for the whole run."""

    def __init__(self) -> None:
        self.sent = 0
        self.skipped = 0
        self.rollbacks: list[tuple[float, str]] = []  # (seconds into the run, what the controller said)
        self.status: Counter[str] = Counter()
        self.variant: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.visits: Counter[str] = Counter()  # the outcome experiment's visits answered, by variant
        self.conversions: Counter[str] = Counter()  # ... of which converted
        self.outcomes: Counter[str] = Counter()  # posted outcomes by the controller's status (or the HTTP error)
        self._window = Counter[str]()
        self._window_variant = Counter[str]()
        self._window_latencies: list[float] = []

    def record(self, status: str, variant: str, latency_s: float) -> None:
        self.status[status] += 1
        self.variant[variant] += 1
        self._window[status] += 1
        self._window_variant[variant] += 1
        self.latencies.append(latency_s)
        self._window_latencies.append(latency_s)

    @staticmethod
    def _counts(counter: Counter[str]) -> str:
        return " ".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def window_line(self, t: float, in_flight: int) -> str:
        """One line for the last second, then start a new second."""
        done = sum(self._window.values())
        lat = self._window_latencies
        line = (
            f"{t:5.0f}s  {done:4d} req/s  status {self._counts(self._window):<22} "
            f"variants {self._counts(self._window_variant):<28} "
            f"p50 {self._pct(lat, 0.5):5.1f}ms  p99 {self._pct(lat, 0.99):6.1f}ms  in flight {in_flight}"
        )
        self._window.clear()
        self._window_variant.clear()
        self._window_latencies = []
        return line

    def summary(self, elapsed_s: float) -> str:
        done = sum(self.status.values())
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        skipped = f", {self.skipped} skipped (in-flight cap)" if self.skipped else ""
        rollbacks = "".join(f"\n    at {t:.0f}s: {what}" for t, what in self.rollbacks)
        outcomes = ""
        if self.visits:
            rates = " ".join(
                f"{v}:{self.conversions[v]}/{n} ({self.conversions[v] / n:.1%})" for v, n in sorted(self.visits.items())
            )
            outcomes = f"  visits    converted {rates}\n  outcomes  {self._counts(self.outcomes)}\n"
        return (
            f"total: {done} answers in {elapsed_s:.1f}s ({rate:.1f}/s){skipped}\n"
            f"  status    {self._counts(self.status)}\n"
            f"  variants  {self._counts(self.variant)}\n"
            f"  latency   p50 {self._pct(self.latencies, 0.5):.1f}ms  p99 {self._pct(self.latencies, 0.99):.1f}ms\n"
            f"{outcomes}"
            f"  rollbacks {len(self.rollbacks)}{rollbacks}"
        )


# ------------------------------------------------------------------------------ the load (I/O)


async def run_load(info: StackInfo, config: LoadConfig, out: TextIO) -> Tally:
    """Send the load; print a line per second and a summary; return the tally."""
    import asyncio
    import signal
    import time

    import aiohttp

    from cohortgate.local.client import describe_audit, infer_path, ssl_context, token_minter

    mint = token_minter(info)
    users = plan_users(config.users, config.residency_mix, config.seed)
    tokens = [
        f"Bearer {mint(sub, residency=region, claims={'tier': 'gold'}, ttl_s=config.duration_s + 3600)}"
        for sub, region in users
    ]
    # The misbehaving clients: no token, a token lacking the scope, a region no backend serves.
    bad_tokens = [
        None,
        f"Bearer {mint('user-bad-scope', residency='eu', scopes=('read',), ttl_s=config.duration_s + 3600)}",
        f"Bearer {mint('user-bad-region', residency='zz', ttl_s=config.duration_s + 3600)}",
    ]
    payloads = bodies(config.seed)
    drifted = drifted_bodies(config.seed, config.drift) if config.drift else payloads
    answered_by: dict[int, str] = {}  # user -> the variant that last answered (sticky): --drift variant=V
    rng = random.Random(config.seed + 1)
    url = f"{info.gateway_url}{infer_path(config.model)}"
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    in_flight: set[asyncio.Task[None]] = set()
    regions = Counter(region for _, region in users)
    demo = config.outcomes
    shop_url = f"{info.gateway_url}{infer_path(demo.model)}" if demo else ""
    storefront = {  # the storefront app posts every visitor's outcome (each visit has its own token)
        "outcomes": f"Bearer {mint('storefront', residency='eu', scopes=('outcomes',), ttl_s=config.duration_s + 3600)}"
    }
    pending: list[dict[str, Any]] = []  # outcomes not yet posted
    print(
        f"traffic: {config.users} users ({', '.join(f'{r} {n}' for r, n in sorted(regions.items()))}), "
        f"{config.rps:g} req/s for {config.duration_s:g}s to {url}",
        file=out,
        flush=True,
    )
    if demo:
        print(
            f"traffic: {demo.rps:g} visitors/s to {shop_url}, converting at "
            + ", ".join(f"{v} {r:.1%}" for v, r in demo.rates.items())
            + f"; outcomes ({demo.metric}) to {info.gateway_url}{OUTCOMES_PATH}",
            file=out,
            flush=True,
        )

    connector = aiohttp.TCPConnector(ssl=ssl_context(info, config.client), limit=config.max_in_flight)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(user: int, body: bytes, token: str | None) -> None:
            headers = {"content-type": "application/json"}
            if token is not None:
                headers["authorization"] = token
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = str(response.status)
                    variant = response.headers.get(HEADER_VARIANT, "-")
                    answered_by[user] = variant
            except (TimeoutError, aiohttp.ClientError, OSError):
                status, variant = "error", "-"
            tally.record(status, variant, time.perf_counter() - started)

        async def visit(n: int, body: bytes) -> None:
            """One shopper: an answer with an exposure token, then (later, batched) 1 or 0 converted."""
            assert demo is not None
            who = visitor(config.seed, n)
            # the visitor is the unit whether the route keys it by the visitor header (the shop) or by
            # the token's subject (a bandit route such as policies/bandit.yaml): its own token, sub = visitor
            token = f"Bearer {mint(who, residency='eu', scopes=('predict',), ttl_s=VISIT_TOKEN_TTL_S)}"
            headers = {"content-type": "application/json", "authorization": token, VISITOR_HEADER: who}
            try:
                async with session.post(shop_url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                    variant = response.headers.get(HEADER_VARIANT, "")
                    exposure = response.headers.get(HEADER_EXPOSURE, "")
            except (TimeoutError, aiohttp.ClientError, OSError):
                return
            if status == 200:
                record = outcome_for(demo, config.seed, who, variant, exposure)
                if record is not None:
                    tally.visits[variant] += 1
                    tally.conversions[variant] += int(record["value"])
                    pending.append(record)
                elif not exposure:
                    tally.outcomes["no_exposure_token"] += 1

        async def post_outcomes() -> None:
            """Post what is pending as one batch; count each item's status."""
            if not pending:
                return
            batch = pending[:10_000]
            del pending[: len(batch)]
            headers = {"content-type": "application/json", "authorization": storefront["outcomes"]}
            try:
                async with session.post(
                    f"{info.gateway_url}{OUTCOMES_PATH}", data=json.dumps({"outcomes": batch}), headers=headers
                ) as response:
                    answer = await response.json(content_type=None) if response.status == 202 else {}
                    if response.status != 202:
                        tally.outcomes[f"http_{response.status}"] += len(batch)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                tally.outcomes["error"] += len(batch)
                return
            for status, count in (answer.get("counts") or {}).items() if isinstance(answer, dict) else ():
                tally.outcomes[str(status)] += int(count)

        async def flush_outcomes() -> None:
            while True:
                await asyncio.sleep(OUTCOMES_FLUSH_S)
                await post_outcomes()

        async def report(start: float) -> None:
            tick = 1
            while True:
                await asyncio.sleep(max(0.0, start + tick - loop.time()))
                print(tally.window_line(tick, len(in_flight)), file=out, flush=True)
                tick += 1

        api, admin_token = info.controller_api, _admin_token(info)
        seen: set[str] = set()
        since = time.time()

        async def look_for_rollbacks(start: float) -> None:
            """Read the controller's audit trail once; print each new rollback (and stop, if asked)."""
            try:
                async with session.get(
                    f"{api}/audit?limit=50", headers={"authorization": f"Bearer {admin_token}"}, ssl=False
                ) as response:
                    records = (await response.json()).get("records", []) if response.status == 200 else []
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError):
                return
            for record in new_rollbacks(records, seen, since):
                what = describe_audit(record)
                tally.rollbacks.append((loop.time() - start, what))
                print(f"{loop.time() - start:5.0f}s  ROLLBACK {what}", file=out, flush=True)
                if config.until_rollback:
                    stop.set()

        async def watch_rollbacks(start: float) -> None:
            while True:
                await asyncio.sleep(ROLLBACK_POLL_S)
                await look_for_rollbacks(start)

        if not api or not admin_token:
            print("traffic: no controller API or admin token in run.json: rollbacks go unseen", file=out)

        start = loop.time()
        reporter = asyncio.create_task(report(start))
        watcher = asyncio.create_task(watch_rollbacks(start)) if api and admin_token else None
        flusher = asyncio.create_task(flush_outcomes()) if demo else None
        started = visits = 0
        try:
            while not stop.is_set():
                elapsed = loop.time() - start
                if elapsed >= config.duration_s:
                    break
                for _ in range(due(elapsed, config.rps) - started):
                    started += 1
                    if len(in_flight) >= config.max_in_flight:
                        tally.skipped += 1
                        continue
                    user = rng.randrange(config.users)
                    bad = config.bad_share and rng.random() < config.bad_share
                    token = rng.choice(bad_tokens) if bad else tokens[user]
                    i = rng.randrange(len(payloads))  # as rng.choice(payloads) would draw
                    drifts = config.drift is not None and config.drift.applies(elapsed, answered_by.get(user))
                    task = asyncio.create_task(one(user, (drifted if drifts else payloads)[i], token))
                    tally.sent += 1
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                for _ in range(due(elapsed, demo.rps) - visits if demo else 0):
                    visits += 1
                    if len(in_flight) >= config.max_in_flight:
                        tally.skipped += 1
                        continue
                    task = asyncio.create_task(visit(visits, rng.choice(payloads)))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                next_at = start + started / config.rps
                if demo:
                    next_at = min(next_at, start + visits / demo.rps)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if in_flight:
                await asyncio.wait(set(in_flight), timeout=10)
            if flusher is not None:  # the last visits' outcomes too
                flusher.cancel()
                await post_outcomes()
            if watcher is not None:  # a rollback since the last look still counts
                watcher.cancel()
                await look_for_rollbacks(start)
        finally:
            reporter.cancel()
            if flusher is not None:
                flusher.cancel()
            if watcher is not None:
                watcher.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    print(tally.summary(loop.time() - start), file=out, flush=True)
    return tally


def _admin_token(info: StackInfo) -> str | None:
    """The controller's admin token (the audit trail needs it), from the file run.json names."""
    from pathlib import Path

    path = info.raw.get("admin_token_file")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _outcome_demo(args: argparse.Namespace) -> OutcomeDemo | None:
    if not args.outcomes_model or not args.conversion:
        return None
    return OutcomeDemo(args.outcomes_model, args.conversion, rps=args.outcomes_rps, metric=args.metric)


def _traffic(args: argparse.Namespace) -> int:
    import time

    from cohortgate.local.client import StackInfo, StackNotRunning

    deadline = time.monotonic() + (args.wait or 0.0)
    while True:
        try:
            # --wait waits for `up`: only its run.json says the stack is ready
            info = StackInfo.load(state_dir(args)) if args.wait else stack_info(args)
            info.client_pair(args.client)
            break
        except (StackNotRunning, NoStack, OSError) as exc:
            if time.monotonic() >= deadline:
                print(f"cohortgate traffic: {exc}", file=sys.stderr)
                return 2
            time.sleep(0.25)
    config = LoadConfig(
        users=args.users,
        rps=args.rps,
        duration_s=args.duration,
        residency_mix=args.residency_mix,
        seed=args.seed,
        model=args.model,
        client=args.client,
        max_in_flight=args.max_in_flight,
        until_rollback=args.until_rollback,
        bad_share=args.bad_share,
        outcomes=_outcome_demo(args),
        drift=args.drift,
    )
    if args.outcomes_model and config.outcomes is None:
        print("cohortgate traffic: --outcomes-model needs --conversion VARIANT=RATE,...", file=sys.stderr)
        return 2
    if config.drift is not None:
        try:
            drifted_bodies(config.seed, config.drift, count=1)
        except ValueError as exc:
            print(f"cohortgate traffic: {exc}", file=sys.stderr)
            return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        import asyncio

        runner = asyncio.run
    tally = runner(run_load(info, config, out=sys.stdout))
    if config.until_rollback and not tally.rollbacks:
        print("cohortgate traffic: no rollback within the duration", file=sys.stderr)
        return 1
    return 0 if tally.sent else 1
