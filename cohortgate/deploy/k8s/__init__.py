"""Kubernetes manifests for cohortgate, rendered from a policy (``cohortgate k8s render``).

Pure data in, typed objects out: `plan` turns a `Policy` and `RenderOptions` into what must run
(one sidecar per model-backed backend, the in-cluster copy of the policy); one module per kind of
workload builds its objects with the official ``kubernetes`` client's model classes (core kinds):
`edge` (Envoy + gateway, or the gateway alone beside a mesh), `sidecars`, `controller` (and Redis),
`network` (NetworkPolicies), all from `objects`' shared building blocks; `mesh` builds the mesh
hook-up with this package's own typed models (CRDs); `render` serialises everything and writes a
Kustomize directory.

Importing this package is cheap: the ``kubernetes`` client (the optional ``k8s`` extra) and
envoy-data-plane load only when something is rendered. ``python -m cohortgate.deploy.k8s.probe`` is the
stdlib-only probe the pods run.
"""

from __future__ import annotations

from cohortgate.deploy.k8s.options import Mesh, RenderOptions

__all__ = ["Mesh", "RenderOptions"]
