"""What must run in the cluster for a policy: pure data, no Kubernetes objects yet.

`make_plan` reads the policy twice: compiled (for cluster names, regions, routes) and as plain YAML
data (to write the in-cluster copy). The copy differs from the file in two ways only: every backend
that names a local ``model`` points at the Service of its own sidecar instead (``model`` dropped),
and a JWKS file moves to where the pod mounts it. The copy is compiled again and must give the
same clusters and regions, so the gateway in the cluster decides exactly as ``policy explain`` does
on the original.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cohortgate.core.policy import OIP_MODEL_PREFIX, Backend, Policy, Route, parse_policy
from cohortgate.deploy.k8s.options import _LABEL_VALUE, RenderOptions

SIDECAR_PORT = 8000
POLICY_DIR = "/etc/cohortgate/policy"
POLICY_FILE = "policy.yaml"
JWKS_DIR = "/etc/cohortgate/jwks"
JWKS_FILE = "jwks.json"
MODELS_DIR = "/models"


class PlanError(ValueError):
    """The policy cannot be deployed as asked (the message says what to change)."""


@dataclass(frozen=True, slots=True)
class Sidecar:
    """One model-backed backend: its own Deployment and Service running `cohortgate sidecar`."""

    name: str  # Deployment and Service name (a DNS-1035 label)
    route: str
    owner: str  # variant or shadow name
    role: str  # "variant" | "shadow"
    cluster: str  # the Envoy cluster the processor names
    region: str
    model_file: str  # file name under the models volume
    model_name: str  # OIP v2 name the sidecar serves (the path segment clients call)
    gpu: bool
    source_url: str  # the URL in the policy file (for the reader)

    def url(self, options: RenderOptions) -> str:
        return f"http://{options.service_host(self.name)}:{SIDECAR_PORT}"


@dataclass(frozen=True, slots=True)
class Plan:
    policy: Policy  # the in-cluster copy, compiled
    policy_text: str  # the in-cluster copy as written to the ConfigMap
    sidecars: tuple[Sidecar, ...]
    external: tuple[Backend, ...]  # backends left as URLs (no model)
    jwks_file: bool  # the policy reads its JWKS from a file (a ConfigMap in the cluster)
    regions: tuple[str, ...]  # every region a backend runs in


def dns_name(*parts: str, limit: int = 63) -> str:
    """``cg-a-b-c`` as a DNS-1035 label; names over ``limit`` keep a prefix and a hash of the whole."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"cg-{name}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def model_name(route: Route, model_path: str) -> str:
    """The OIP model name requests for ``route`` carry, so the sidecar answers to it."""
    if route.model:
        return route.model
    prefix = route.path_prefix or ""
    if prefix.startswith(OIP_MODEL_PREFIX):
        segment = prefix[len(OIP_MODEL_PREFIX) :].split("/", 1)[0]
        if segment:
            return segment
    return Path(model_path).stem


def make_plan(policy: Policy, raw: bytes | str, options: RenderOptions) -> Plan:
    """The sidecars and the in-cluster policy for ``policy`` (whose file text is ``raw``)."""
    data = yaml.safe_load(raw)
    k8s = copy.deepcopy(data)
    sidecars: list[Sidecar] = []
    external: list[Backend] = []
    seen_gpu: set[tuple[str, str]] = set()
    for r_index, route in enumerate(policy.routes):
        raw_route = k8s["routes"][r_index]
        groups = [("variant", v.name, v.backends, raw_route["variants"][i]) for i, v in enumerate(route.variants)]
        groups += [("shadow", s.name, s.backends, raw_route["shadows"][i]) for i, s in enumerate(route.shadows)]
        for role, owner, backends, raw_owner in groups:
            gpu = (route.name, owner) in options.gpu
            if gpu:
                seen_gpu.add((route.name, owner))
            for b_index, backend in enumerate(backends):
                raw_backend = raw_owner["backends"][b_index]
                if backend.model is None:
                    external.append(backend)
                    continue
                if not _LABEL_VALUE.match(backend.region) and backend.region not in options.region_labels:
                    raise PlanError(
                        f"region {backend.region!r} is not a Kubernetes label value; map it with "
                        f"--region {backend.region}=NODE_REGION"
                    )
                sidecar = Sidecar(
                    name=dns_name("cg", route.name, owner, str(b_index)),
                    route=route.name,
                    owner=owner,
                    role=role,
                    cluster=backend.cluster,
                    region=backend.region,
                    model_file=Path(backend.model).name,
                    model_name=model_name(route, backend.model),
                    gpu=gpu,
                    source_url=backend.url,
                )
                sidecars.append(sidecar)
                raw_backend["url"] = sidecar.url(options)
                raw_backend.pop("model", None)
    unknown = sorted(options.gpu - seen_gpu)
    if unknown:
        raise PlanError(
            "--gpu-variant names no variant or shadow of the policy: " + ", ".join(f"{r}/{n}" for r, n in unknown)
        )
    gpu_external = sorted({(r, n) for r, n in options.gpu if not any(s.route == r and s.owner == n for s in sidecars)})
    if gpu_external:
        raise PlanError(
            "--gpu-variant names a variant with no `model` backend (nothing to schedule on a GPU): "
            + ", ".join(f"{r}/{n}" for r, n in gpu_external)
        )
    names = [s.name for s in sidecars]
    if len(set(names)) != len(names):
        raise PlanError("two sidecars would share a name; shorten the route or variant names")

    jwks_file = not policy.jwt.jwks.startswith("https://")
    if jwks_file:
        k8s["jwt"]["jwks"] = f"{JWKS_DIR}/{JWKS_FILE}"
    header = (
        "# The in-cluster copy of the policy, rendered by `cohortgate k8s render`: backends with a local\n"
        "# `model` point at their sidecar's Service; the JWKS is read from the mounted ConfigMap.\n"
    )
    text = header + yaml.safe_dump(k8s, sort_keys=False, default_flow_style=False, width=100)
    compiled = parse_policy(text, filename=f"{POLICY_DIR}/{POLICY_FILE}", base_dir=Path(POLICY_DIR))
    _same_shape(policy, compiled)
    regions = sorted({b.region for b in policy.backends})
    return Plan(
        policy=compiled,
        policy_text=text,
        sidecars=tuple(sidecars),
        external=tuple(external),
        jwks_file=jwks_file,
        regions=tuple(regions),
    )


def _same_shape(original: Policy, copy_: Policy) -> None:
    """The copy must route exactly like the original: same clusters, in the same regions."""

    def shape(p: Policy) -> list[tuple[str, str]]:
        return [(b.cluster, b.region) for b in p.backends]

    if shape(original) != shape(copy_):  # pragma: no cover - a bug in the rewrite, not a user error
        raise AssertionError("the in-cluster policy changed the clusters or their regions")


def load(path: str | Path) -> tuple[Policy, bytes]:
    """The compiled policy and its file's bytes (`cohortgate.core.errors.PolicyError` on a bad file)."""
    from cohortgate.core.policy import load_policy

    p = Path(path)
    return load_policy(p), p.read_bytes()
