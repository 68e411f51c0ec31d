"""Synthetic traffic for tests and `bench/bench_detection.py`: a stand-in for gateways + upstreams.

Units are assigned with the real cohort layout of the *effective* policy (so a rollback or a
promotion moves exactly the users the gateway would move), outcomes are drawn per variant from a
seeded generator: an error probability and a log-normal latency. ``force_split`` replaces the hash
with a random draw, to simulate broken assignment (the SRM test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    ) -> None:
        self.route_name = route
        self.behaviours = dict(behaviours)
        self.rng = np.random.default_rng(seed)
        self.population = population
        self.region = region
        self.force_split = None if force_split is None else np.asarray(force_split, float) / sum(force_split)
        self.served: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._buckets = np.array(
            [cohorts.bucket_of(policy.by_name[route].salt_key, f"user-{i}") for i in range(population)]
        )
        self._hashes = [  # what the processor puts in x-cohortgate-unit: a keyed hash, never the id
            hashlib.blake2b(f"user-{i}".encode(), digest_size=8, key=_UNIT_KEY).hexdigest() for i in range(population)
        ]
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Apply effective weights, as a gateway does when the state store changes."""
        self.route = policy.by_name[self.route_name]
        owners = np.asarray(self.route.owners)
        self._variant_of_unit = owners[np.searchsorted(np.asarray(self.route.bounds), self._buckets, side="right")]
        self._names = [v.name for v in self.route.variants]

    def events(self, n: int, t0: float, t1: float) -> list[Event]:
        """``n`` requests at evenly spread times in ``[t0, t1)``."""
        units = self.rng.integers(0, self.population, n)
        if self.force_split is not None:
            variants = self.rng.choice(len(self.force_split), size=n, p=self.force_split)
        else:
            variants = self._variant_of_unit[units]
        u = self.rng.random(n)
        z = self.rng.standard_normal(n)
        out = []
        for i in range(n):
            name = self._names[int(variants[i])]
            b = self.behaviours.get(name, Behaviour())
            failed = bool(u[i] < b.error_rate)
            self.served[name] = self.served.get(name, 0) + 1
            self.failed[name] = self.failed.get(name, 0) + failed
            out.append(
                Event(
                    kind=REQUEST,
                    route=self.route_name,
                    variant=name,
                    status=503 if failed else 200,
                    latency_ms=float(b.median_ms * np.exp(b.sigma * z[i])),
                    request_id=f"r{t0:.3f}-{i}",
                    region=self.region,
                    unit=self._hashes[int(units[i])],
                    ts=t0 + (t1 - t0) * i / max(n, 1),
                )
            )
        return out
