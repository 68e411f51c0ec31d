"""Assemble and serialise everything `cohortgate k8s render` writes: a Kustomize directory.

`render` is pure apart from reading nothing and writing nothing: it returns the file names and
their YAML text; `write` puts them on disk (replacing only the files it owns). YAML comes from
``yaml.safe_dump`` of the typed objects' plain data: never string templates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from cohortgate.core.policy import Policy
from cohortgate.deploy.envoy.files import BOOTSTRAP_FILE, CDS_FILE
from cohortgate.deploy.k8s import controller, edge, mesh, network, objects, sidecars
from cohortgate.deploy.k8s.options import RenderOptions
from cohortgate.deploy.k8s.plan import POLICY_FILE, Plan, make_plan
from cohortgate.support.files import write_atomic

KUSTOMIZATION = "kustomization.yaml"
_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


@dataclass(frozen=True, slots=True)
class Rendered:
    plan: Plan
    files: Mapping[str, str]  # file name -> YAML text, in kustomization order
    documents: Mapping[str, tuple[dict[str, Any], ...]]  # file name -> its objects as plain data
    warnings: tuple[str, ...]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the policy, Envoy's bootstrap) as literal blocks a reviewer can read."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def _plain(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "to_dict") and obj.__class__.__module__.startswith("gateway."):
        return obj.to_dict()
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def dump(documents: tuple[dict[str, Any], ...], header: str) -> str:
    body = yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def render(policy: Policy, raw: bytes | str, options: RenderOptions, *, source: str = "policy.yaml") -> Rendered:
    """Every manifest for ``policy`` (its file's text is ``raw``; ``source`` labels the headers)."""
    from kubernetes import client as k

    plan = make_plan(policy, raw, options)
    outcome_clusters = {
        b.cluster for r in policy.routes if r.kind == "outcomes" for v in r.variants for b in v.backends
    }
    warnings = [
        f"backend {b.url} ({b.cluster}) has no `model` and a loopback address: inside a pod that is the pod "
        "itself; give it a reachable URL or a model"
        for b in plan.external
        if b.host.startswith(_LOOPBACK) and b.cluster not in outcome_clusters
    ]
    warnings += [
        f"route {r.name} (kind: outcomes) posts to the controller's API, which this render keeps pod-local: "
        "outcomes through the edge are not wired on Kubernetes yet; producers XADD to the controller's "
        "Redis stream instead (docs/outcomes.md)"
        for r in policy.routes
        if r.kind == "outcomes"
    ]
    groups: dict[str, list[Any]] = {}
    namespace = k.V1Namespace(
        api_version="v1",
        kind="Namespace",
        metadata=k.V1ObjectMeta(
            name=options.namespace,
            labels={
                **objects.labels("namespace"),
                # Every cohortgate pod meets the `restricted` Pod Security Standard.
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        ),
    )
    groups["namespace.yaml"] = [namespace]
    policy_data = {POLICY_FILE: plan.policy_text}
    if options.mesh is None:
        size = options.edge_sizing
        bootstrap, cds = edge.envoy_files(plan, options, size.envoy_concurrency, size.gateway_workers)
        policy_data[CDS_FILE] = cds
        groups["policy.yaml"] = [objects.config_map(objects.POLICY_CONFIGMAP, options, "edge", policy_data)]
        groups["envoy.yaml"] = [
            objects.config_map(objects.ENVOY_CONFIGMAP, options, "edge", {BOOTSTRAP_FILE: bootstrap})
        ]
        groups["edge.yaml"] = edge.edge(plan, options, objects.digest(bootstrap))
    else:
        groups["policy.yaml"] = [objects.config_map(objects.POLICY_CONFIGMAP, options, "gateway", policy_data)]
        groups["gateway.yaml"] = edge.mesh_gateway(plan, options)
        groups["mesh.yaml"] = mesh.mesh_resources(plan, options)
    model_servers: list[Any] = []
    for s in plan.sidecars:
        model_servers.extend(sidecars.sidecar(s, plan, options))
    if model_servers:
        groups["sidecars.yaml"] = model_servers
    groups["controller.yaml"] = [controller.controller(plan, options)]
    if options.with_redis:
        groups["redis.yaml"] = controller.redis(options)
    groups["network-policies.yaml"] = network.network_policies(options)
    groups["certificates.yaml"] = mesh.certificates(options)

    header = (
        f"Rendered by `cohortgate k8s render` from {source} (policy digest {policy.digest[:16]}).\n"
        "Do not edit: change the policy or the flags and render again."
    )
    documents = {name: tuple(_plain(o) for o in objs) for name, objs in groups.items()}
    files = {name: dump(docs, header) for name, docs in documents.items()}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    files[KUSTOMIZATION] = dump((kustomization,), header)
    documents[KUSTOMIZATION] = (kustomization,)
    return Rendered(
        plan=plan,
        files=MappingProxyType(files),
        documents=MappingProxyType(documents),
        warnings=tuple(warnings),
    )


def write(rendered: Rendered, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write every file atomically into ``out_dir``; stale cohortgate files from an earlier render go."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered.files.items():
        path = out / name
        write_atomic(path, text)
        written.append(path)
    for stale in _OWNED - set(rendered.files):
        (out / stale).unlink(missing_ok=True)
    return written


_OWNED = frozenset(
    {
        "namespace.yaml", "policy.yaml", "envoy.yaml", "edge.yaml", "gateway.yaml", "mesh.yaml",
        "sidecars.yaml", "controller.yaml", "redis.yaml", "network-policies.yaml", "certificates.yaml",
        KUSTOMIZATION,
    }
)  # fmt: skip
