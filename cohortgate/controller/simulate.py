"""Synthetic traffic for tests and `bench/bench_detection.py`: a stand-in for gateways + upstreams.

Units are assigned with the real cohort layout of the *effective* policy (so a rollback or a
promotion moves exactly the users the gateway would move), outcomes are drawn per variant from a
seeded generator: an error probability and a log-normal latency. ``force_split`` replaces the hash
with a random draw, to simulate broken assignment (the SRM test).

Users differ when `Users` says so, identically in every arm (assignment is the only difference):
a share of users fail often whatever variant serves them, heavy users send most requests
(log-normal activity), and each user has a typical latency (log-normal offset). That is what
makes request outcomes clustered by user, which the controller's tests must survive.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cohortgate.core import cohorts
from cohortgate.core.policy import Policy
from cohortgate.store.events import REQUEST, Event

_UNIT_KEY = b"simulated-unit-hashing-key-0001"


@dataclass(frozen=True, slots=True)
class Behaviour:
    error_rate: float = 0.01
    median_ms: float = 20.0
    sigma: float = 0.4  # of log-latency


@dataclass(frozen=True, slots=True)
class Users:
    """How users differ from each other (the same in every arm)."""

    bad_share: float = 0.0  # share of users who fail often whatever serves them ...
    bad_rate: float = 0.5  # ... this often (on top of the variant's own error rate)
    activity_sigma: float = 0.0  # log-normal spread of per-user request rates (heavy users); 0: alike
    latency_sigma: float = 0.0  # log-normal spread of per-user typical latency; 0: alike


@dataclass(frozen=True, slots=True)
class Block:
    """``n`` simulated requests as arrays (what `Traffic.events` turns into `Event` objects)."""

    variant: np.ndarray  # index in the route's variant order
    status: np.ndarray
    latency_ms: np.ndarray
    unit: np.ndarray  # user index in the population


@functools.lru_cache(maxsize=8)
def _population(salt_key: bytes, population: int) -> tuple[np.ndarray, list[str]]:
    """Each user's cohort bucket, and what the processor puts in x-cohortgate-unit (a keyed hash)."""
    buckets = np.array([cohorts.bucket_of(salt_key, f"user-{i}") for i in range(population)])
    hashes = [
        hashlib.blake2b(f"user-{i}".encode(), digest_size=8, key=_UNIT_KEY).hexdigest() for i in range(population)
    ]
    return buckets, hashes


class Traffic:
    def __init__(
        self,
        policy: Policy,
        route: str,
        behaviours: Mapping[str, Behaviour],
        *,
        seed: int = 0,
        population: int = 20_000,
        region: str = "eu",
        force_split: Sequence[float] | None = None,
        users: Users | None = None,
    ) -> None:
        self.route_name = route
        self.behaviours = dict(behaviours)
        self.rng = np.random.default_rng(seed)
        self.population = population
        self.users = users or Users()
        people = np.random.default_rng([seed, 1])  # per-user traits: their own stream
        self._user_bad = people.random(population) < self.users.bad_share
        activity = np.exp(self.users.activity_sigma * people.standard_normal(population))
        self._activity_cdf = np.cumsum(activity) / activity.sum()
        self._user_latency = np.exp(self.users.latency_sigma * people.standard_normal(population))
        self.region = region
        self.force_split = None if force_split is None else np.asarray(force_split, float) / sum(force_split)
        self.served: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._buckets, self._hashes = _population(policy.by_name[route].salt_key, population)
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Apply effective weights, as a gateway does when the state store changes."""
        self.route = policy.by_name[self.route_name]
        owners = np.asarray(self.route.owners)
        self._variant_of_unit = owners[np.searchsorted(np.asarray(self.route.bounds), self._buckets, side="right")]
        self._names = [v.name for v in self.route.variants]

    def block(self, n: int) -> Block:
        """``n`` requests as arrays; counts them in ``served`` / ``failed``."""
        if self.users.activity_sigma:
            units = np.minimum(np.searchsorted(self._activity_cdf, self.rng.random(n)), self.population - 1)
        else:
            units = self.rng.integers(0, self.population, n)
        if self.force_split is not None:
            variants = self.rng.choice(len(self.force_split), size=n, p=self.force_split)
        else:
            variants = self._variant_of_unit[units]
        u = self.rng.random(n)
        z = self.rng.standard_normal(n)
        names = self._names
        error = np.array([self.behaviours.get(name, Behaviour()).error_rate for name in names])
        median = np.array([self.behaviours.get(name, Behaviour()).median_ms for name in names])
        sigma = np.array([self.behaviours.get(name, Behaviour()).sigma for name in names])
        failed = u < error[variants]
        if self.users.bad_share:
            failed |= self._user_bad[units] & (self.rng.random(n) < self.users.bad_rate)
        latency = median[variants] * np.exp(sigma[variants] * z) * self._user_latency[units]
        served = np.bincount(variants, minlength=len(names))
        bad = np.bincount(variants, weights=failed, minlength=len(names))
        for i, name in enumerate(names):
            if served[i]:
                self.served[name] = self.served.get(name, 0) + int(served[i])
                self.failed[name] = self.failed.get(name, 0) + int(bad[i])
        return Block(variants, np.where(failed, 503, 200), latency, units)

    def events(self, n: int, t0: float, t1: float) -> list[Event]:
        """``n`` requests at evenly spread times in ``[t0, t1)``."""
        b = self.block(n)
        return [
            Event(
                kind=REQUEST,
                route=self.route_name,
                variant=self._names[v],
                status=status,
                latency_ms=latency,
                request_id=f"r{t0:.3f}-{i}",
                region=self.region,
                unit=self._hashes[unit],
                ts=t0 + (t1 - t0) * i / max(n, 1),
            )
            for i, (v, status, latency, unit) in enumerate(
                zip(b.variant.tolist(), b.status.tolist(), b.latency_ms.tolist(), b.unit.tolist(), strict=True)
            )
        ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one simulated run ended (times in seconds from the start of the run)."""

    rolled_back_at: float | None
    halted_at: float | None
    served_at_rollback: int  # requests the challenger served from ``onset`` until its rollback
    reason: str


async def run_controller(
    policy: Policy,
    behaviours: Mapping[str, Behaviour],
    *,
    seconds: float,
    rps: int,
    seed: int,
    users: Users | None = None,
    route: str | None = None,
    challenger: str | None = None,
    onset_s: float | None = None,
    after_onset: Mapping[str, Behaviour] | None = None,
    slice_s: float = 1.0,
    delay_slices: int = 0,
    config: Any = None,
    population: int = 20_000,
) -> Outcome:
    """Drive the real `Controller` (simulated clock, in-process store) with `Traffic`; stop at rollback.

    Every ``slice_s`` the traffic of that slice reaches the controller ``delay_slices`` later (Envoy's
    access-log flush); the controller ticks once per ``config.interval_s``; the "gateway" applies
    weights the moment the store changes. From ``onset_s`` on, ``after_onset`` replaces behaviours.
    """
    from cohortgate.controller.loop import Controller, ControllerConfig
    from cohortgate.store.events import InProcessSink
    from cohortgate.store.state import InProcessState, effective_policy

    route = route or policy.routes[0].name
    challenger = challenger or policy.by_name[route].variants[1].name
    config = config or ControllerConfig()
    t0 = now = 1_000.0
    store = InProcessState()
    controller = Controller(policy, store, InProcessSink(), clock=lambda: now, config=config)
    await controller.start()
    traffic = Traffic(policy, route, behaviours, seed=seed, users=users, population=population)
    store.watch(lambda states: traffic.set_policy(effective_policy(policy, states)))
    traffic.set_policy(effective_policy(policy, store.snapshot()))
    per_slice = max(1, round(rps * slice_s))
    in_flight: list[Block] = []
    next_tick = now + config.interval_s
    halted_at: float | None = None
    served_at_onset = 0
    onset = None if onset_s is None else t0 + onset_s
    while now < t0 + seconds:
        if onset is not None and now >= onset and after_onset is not None:
            served_at_onset = traffic.served.get(challenger, 0)
            traffic.behaviours.update(after_onset)
            after_onset = None
        in_flight.append(traffic.block(per_slice))
        if len(in_flight) > delay_slices:
            b = in_flight.pop(0)
            controller.ingest_block(route, b.variant, b.status, b.latency_ms, b.unit, now)
        now = round(now + slice_s, 6)
        if now >= next_tick - 1e-9:
            next_tick += config.interval_s
            for t in await controller.tick():
                if t.variant != challenger:
                    continue
                if t.action == "halt" and halted_at is None:
                    halted_at = now - t0
                if t.action == "rollback":
                    served = traffic.served.get(challenger, 0) - served_at_onset
                    return Outcome(now - t0, halted_at, served, t.reason)
    return Outcome(None, halted_at, 0, "")
