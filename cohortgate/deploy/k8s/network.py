"""NetworkPolicies: each component admits only the peers that must reach it."""

from __future__ import annotations

from kubernetes import client as k

from cohortgate.deploy.k8s.objects import L_PART_OF, PART_OF, PROCESSOR_PORT, REDIS_PORT, meta, selector
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import SIDECAR_PORT


def mesh_proxies(options: RenderOptions) -> k.V1NetworkPolicyPeer:
    """The mesh's gateway Envoys, which call the processor and reach the sidecars."""
    ns, name = options.mesh_gateway_ref
    if options.mesh is Mesh.ENVOY_GATEWAY:
        # Envoy Gateway runs its proxies in its own namespace (envoy-gateway-system by default),
        # labelled with the Gateway they serve: any namespace, those labels.
        return k.V1NetworkPolicyPeer(
            pod_selector=k.V1LabelSelector(
                match_labels={
                    "gateway.envoyproxy.io/owning-gateway-name": name,
                    "gateway.envoyproxy.io/owning-gateway-namespace": ns,
                }
            ),
            namespace_selector=k.V1LabelSelector(),
        )
    return k.V1NetworkPolicyPeer(
        pod_selector=k.V1LabelSelector(match_labels=dict(options.istio_selector)),
        namespace_selector=k.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": ns}),
    )


def _ingress_policy(
    name: str, options: RenderOptions, component: str, peers: list[k.V1NetworkPolicyPeer], port: int
) -> k.V1NetworkPolicy:
    return k.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=meta(name, options, component),
        spec=k.V1NetworkPolicySpec(
            pod_selector=k.V1LabelSelector(match_labels=selector(component)),
            policy_types=["Ingress"],
            ingress=[
                k.V1NetworkPolicyIngressRule(_from=peers, ports=[k.V1NetworkPolicyPort(protocol="TCP", port=port)])
            ],
        ),
    )


def network_policies(options: RenderOptions) -> list[k.V1NetworkPolicy]:
    """Only the edge (or the mesh's gateway Envoys) reaches the sidecars; only the mesh reaches the processor."""
    if options.mesh is not None:
        front = [mesh_proxies(options)]
    else:
        front = [k.V1NetworkPolicyPeer(pod_selector=k.V1LabelSelector(match_labels=selector("edge")))]
    out = [_ingress_policy("cohortgate-sidecars", options, "sidecar", front, SIDECAR_PORT)]
    if options.mesh is not None:
        out.append(_ingress_policy("cohortgate-gateway", options, "gateway", [mesh_proxies(options)], PROCESSOR_PORT))
    if options.with_redis:
        members = [k.V1NetworkPolicyPeer(pod_selector=k.V1LabelSelector(match_labels={L_PART_OF: PART_OF}))]
        out.append(_ingress_policy("cohortgate-redis", options, "redis", members, REDIS_PORT))
    return out
