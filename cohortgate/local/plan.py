"""`cohortgate up`'s plan, pure (no process, no socket): what to run for a policy, and where.

- `sidecar_specs`: one model sidecar per distinct backend URL that names a local ``model``
  (backends without one are external endpoints, left alone);
- `effective_policy_data`: the policy's YAML data with backend URLs rewritten to the ports the
  sidecars actually bound and every relative path made absolute (done on data, never on text);
- `choose_port`: the usual port when free, else a free one, given probes the caller supplies.

`cohortgate.local.stack` does the I/O. Errors: `StackError` (a `CohortgateError`) says what cannot
be planned; `supervisor.ChildFailed` derives from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cohortgate.core.errors import CohortgateError
from cohortgate.core.policy import Features, Policy, Route

OIP_PREFIX = "/v2/models/"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class StackError(CohortgateError):
    """The stack cannot be planned, prepared or kept running; the message says why."""


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """One model sidecar: the backend URL it stands for and what it serves there."""

    name: str  # child name, also its log file's stem: sidecar-<route>-<variant>-<region>
    url: str  # the backend URL as the policy writes it
    port: int  # the port that URL names (the preferred one)
    model_path: str  # the sidecar's --model: an absolute path or a reference (docs/models.md)
    model_name: str  # OIP v2 name: /v2/models/<model_name>/infer
    variant: str  # variant or shadow name: the sidecar's x-cohortgate-served-by
    route: str
    region: str
    shadow: bool
    fault_rate: float = 0.0
    trusted_keys: tuple[str, ...] = ()  # the route's model-signing keys: the sidecar's --trusted-key
    features: Features | None = None  # the route's features: block when this variant joins (docs/features.md)
    features_policy: str = ""  # the policy file that declares it: the sidecar's --features-policy
    contract: str = ""  # the backend's data contract (a path, or inline JSON): the sidecar's --contract

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two specs the same running process (a reload keeps those)."""
        return (
            url_key(self.url),
            self.model_path,
            self.model_name,
            self.variant,
            self.fault_rate,
            self.trusted_keys,
            self.features,  # an edited features: block restarts the sidecars that join it
            self.contract,  # so does an edited data contract
        )


_PIN = "@sha256:"


def local_model_file(reference: str) -> Path | None:
    """The local file or store directory a ``model:`` names (a pin stripped), or None when it is
    remote (https://, s3://): what `up` can check exists, or build when it is a demo model."""
    text = reference.partition(_PIN)[0] if _PIN in reference else reference
    if "://" not in text:
        return Path(text)
    parts = urlsplit(text)
    return Path(parts.path) if parts.scheme.lower() == "file" else None


def url_key(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)``: ``http://127.0.0.1:1`` and ``http://127.0.0.1:1/`` are one backend."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def oip_model_name(route: Route) -> str | None:
    """The OIP model name a route's requests carry: ``match.model``, else ``/v2/models/NAME`` prefix."""
    if route.model is not None:
        return route.model
    prefix = route.path_prefix or ""
    if prefix.startswith(OIP_PREFIX):
        name = prefix[len(OIP_PREFIX) :].strip("/")
        if name and "/" not in name:
            return name
    return None


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-")


def sidecar_specs(
    policy: Policy, *, fault_rates: Mapping[tuple[str, str], float] | None = None
) -> tuple[SidecarSpec, ...]:
    """One spec per distinct backend URL that names a local ``model``, in policy order.

    Backends without ``model`` are external endpoints and are left alone. ``fault_rates`` maps
    ``(route, variant)`` to the sidecar's ``--fault-rate`` (the demo's canary knob). Raises
    `StackError` listing every problem: a model on a non-loopback or https URL, a route whose
    OIP model name cannot be known, or one URL asked to serve two different things.
    """
    rates = fault_rates or {}
    found: dict[tuple[str, str, int], SidecarSpec] = {}
    names: set[str] = set()
    problems: list[str] = []
    for route in policy.routes:
        owners = [(v.name, v.backends, False) for v in route.variants]
        owners += [(s.name, s.backends, True) for s in route.shadows]
        for owner, backends, shadow in owners:
            for b in backends:
                if b.model is None:
                    continue
                where = f"route {route.name!r}, {'shadow' if shadow else 'variant'} {owner!r}, backend {b.url}"
                model_name = oip_model_name(route)
                if model_name is None:
                    problems.append(
                        f"{where}: a local model needs `match.model` or a `/v2/models/NAME` path_prefix "
                        "(the sidecar must know the OIP model name)"
                    )
                    continue
                if b.scheme != "http" or b.host.lower() not in _LOOPBACK:
                    problems.append(f"{where}: a local model is served on http://127.0.0.1:PORT, not {b.url}")
                    continue
                key = url_key(b.url)
                spec = SidecarSpec(
                    name="",
                    url=b.url,
                    port=b.port,
                    model_path=b.model,
                    model_name=model_name,
                    variant=owner,
                    route=route.name,
                    region=b.region,
                    shadow=shadow,
                    fault_rate=float(rates.get((route.name, owner), 0.0)),
                    trusted_keys=route.trusted_keys,
                    contract=b.contract or "",
                    **_features_of(policy, route, owner),
                )
                seen = found.get(key)
                if seen is not None:
                    if seen.key != spec.key:
                        keys = ", other trusted keys" if seen.trusted_keys != spec.trusted_keys else ""
                        problems.append(
                            f"{where}: {b.url} already serves {seen.model_name!r} ({seen.variant}, "
                            f"{Path(seen.model_path).name}{keys}) for route {seen.route!r}; one URL is one sidecar"
                        )
                    continue
                name = _slug("sidecar", route.name, owner, b.region)
                base, n = name, 2
                while name in names:
                    name, n = f"{base}-{n}", n + 1
                names.add(name)
                found[key] = dataclasses.replace(spec, name=name)
    if problems:
        raise StackError("the policy cannot be served locally:\n  " + "\n  ".join(problems))
    return tuple(found.values())


def _features_of(policy: Policy, route: Route, owner: str) -> dict[str, Any]:
    """The spec's features fields: the route's block and its file when ``owner`` joins, else none.

    The sidecar reads the block from the policy file `up` validated (its relative paths resolve
    against that file's directory), not from the effective file: during an edit the new sidecars
    start before the gateway's file changes.
    """
    f = route.features
    return {"features": f, "features_policy": policy.path} if f is not None and f.joins(owner) else {}


def canary_variants(policy: Policy) -> set[tuple[str, str]]:
    """``(route, variant)`` pairs the canary knob applies to: each route's rollout variant.

    A route without a ``rollout`` has its non-control variants as canaries. A route with outcome
    metrics is left alone: its challengers are judged on what users do (the demo's experiment).
    """
    out = set()
    for route in policy.routes:
        if route.metrics:
            continue
        if route.rollout is not None:
            out.add((route.name, route.rollout.variant))
        else:
            out.update((route.name, v.name) for v in route.variants[1:])
    return out


def effective_policy_data(
    data: Mapping[str, Any], base_dir: Path, urls: Mapping[str, str], outcomes_url: str | None = None
) -> dict[str, Any]:
    """The policy's YAML data with backend URLs rewritten and every file path made absolute.

    ``urls`` maps a backend URL (any spelling of the same scheme/host/port) to the URL to use;
    ``outcomes_url`` (the controller API `up` started) replaces every backend of a ``kind: outcomes``
    route, whatever port the policy wrote;
    ``jwt.jwks``, backend ``model`` paths and a route's PEM ``trusted_keys`` are resolved against
    ``base_dir`` (the source file's directory) unless already absolute or a URL (a ``model:``
    reference such as ``file://…@sha256:…`` or ``s3://…`` is kept as written). The input is not
    modified.
    """
    by_key = {url_key(src): dst for src, dst in urls.items()}
    out: dict[str, Any] = json.loads(json.dumps(data, default=str))  # a deep copy; a YAML date becomes ISO text

    def absolute(path: str) -> str:
        return str((base_dir / path).resolve()) if not os.path.isabs(path) and "://" not in path else path

    jwt = out.get("jwt")
    if isinstance(jwt, dict) and isinstance(jwt.get("jwks"), str) and not jwt["jwks"].startswith("https://"):
        jwt["jwks"] = absolute(jwt["jwks"])
    for route in out.get("routes") or []:
        if not isinstance(route, dict):
            continue
        keys = route.get("trusted_keys")
        if isinstance(keys, list):
            route["trusted_keys"] = [
                k if not isinstance(k, str) or k.startswith("ed25519:") else absolute(k) for k in keys
            ]
        for group in ("variants", "shadows"):
            for owner in route.get(group) or []:
                for backend in (owner or {}).get("backends") or []:
                    if not isinstance(backend, dict):
                        continue
                    url = backend.get("url")
                    if outcomes_url and route.get("kind") == "outcomes" and group == "variants":
                        backend["url"] = outcomes_url
                    elif isinstance(url, str):
                        with contextlib.suppress(ValueError):
                            backend["url"] = by_key.get(url_key(url), url)
                    if isinstance(backend.get("model"), str):
                        backend["model"] = absolute(backend["model"])
        features = route.get("features")  # its fallback model, like a backend's
        fallback = features.get("fallback") if isinstance(features, dict) else None
        if isinstance(fallback, dict) and isinstance(fallback.get("model"), str):
            fallback["model"] = absolute(fallback["model"])
    return out


def choose_port(
    preferred: int | None, *, taken: set[int], is_free: Callable[[int], bool], any_free: Callable[[], int]
) -> int:
    """``preferred`` when it is free and not already handed out, else a free one; records it in ``taken``."""
    if preferred and preferred not in taken and is_free(preferred):
        taken.add(preferred)
        return preferred
    for _ in range(100):
        port = any_free()
        if port not in taken:
            taken.add(port)
            return port
    raise StackError("no free TCP port on 127.0.0.1")
