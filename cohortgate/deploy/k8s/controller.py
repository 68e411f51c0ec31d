"""The controller (one leader at a time) and, when asked for, an in-cluster Redis."""

from __future__ import annotations

from typing import Any

from kubernetes import client as k

from cohortgate.core.contract import REDIS_ENV
from cohortgate.deploy.k8s import sizing
from cohortgate.deploy.k8s.objects import (
    ADMIN_DIR,
    ADMIN_TOKEN_SECRET,
    CONTROLLER,
    CONTROLLER_API_PORT,
    POLICY_CONFIGMAP,
    PROBE,
    REDIS,
    REDIS_IMAGE,
    REDIS_PORT,
    REDIS_UID,
    STATE_DIR,
    configmap_volume,
    container_security,
    deployment_of,
    labels,
    meta,
    mount,
    pod_security,
    probe_of,
    redis_env,
    region_affinity,
    selector,
    service_of,
    tmp_volume,
)
from cohortgate.deploy.k8s.options import RenderOptions
from cohortgate.deploy.k8s.plan import POLICY_DIR, POLICY_FILE, Plan


def controller(plan: Plan, options: RenderOptions) -> k.V1Deployment:
    """One replica; a second one would wait on the Redis leader lock, so a rolling update is safe.

    Its JSON API stays on loopback (the controller refuses anything else: it is plaintext), so the
    probes run inside the container and operators reach it with ``kubectl port-forward``.
    """
    cpu, mem_request, mem_limit = sizing.CONTROLLER
    health = [*PROBE, "http", f"http://127.0.0.1:{CONTROLLER_API_PORT}/healthz"]
    container = k.V1Container(
        name="controller",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["cohortgate"],
        args=[
            "controller",
            "--policy",
            f"{POLICY_DIR}/{POLICY_FILE}",
            "--redis",
            f"$({REDIS_ENV})",
            "--listen",
            f"127.0.0.1:{CONTROLLER_API_PORT}",
            "--token-file",
            f"{ADMIN_DIR}/token",
            "--state-file",
            f"{STATE_DIR}/state.json",
            *options.tracing_args(follow=False),  # its decisions are traces of their own
        ],
        env=[redis_env(options)],
        volume_mounts=[
            mount("policy", POLICY_DIR),
            mount("admin-token", ADMIN_DIR),
            mount("state", STATE_DIR, read_only=False),
            mount("tmp", "/tmp", read_only=False),
        ],
        resources=k.V1ResourceRequirements(requests={"cpu": cpu, "memory": mem_request}, limits={"memory": mem_limit}),
        readiness_probe=probe_of(exec_=health, period=10, failures=3),
        liveness_probe=probe_of(exec_=health, period=20, failures=3, timeout=3),
        security_context=container_security(),
    )
    pod = k.V1PodSpec(
        containers=[container],
        volumes=[
            configmap_volume("policy", POLICY_CONFIGMAP, items=[POLICY_FILE]),
            k.V1Volume(
                name="admin-token",
                secret=k.V1SecretVolumeSource(
                    secret_name=ADMIN_TOKEN_SECRET, default_mode=0o400, items=[k.V1KeyToPath(key="token", path="token")]
                ),
            ),
            k.V1Volume(name="state", empty_dir=k.V1EmptyDirVolumeSource(size_limit="16Mi")),
            tmp_volume(),
        ],
        security_context=pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        affinity=region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    return deployment_of(CONTROLLER, options, "controller", pod, replicas=1)


def redis(options: RenderOptions) -> list[Any]:
    """A one-replica Redis for trials (``--with-redis``): AOF on a small volume, no auth, in-namespace only."""
    cpu, mem_request, mem_limit = sizing.REDIS
    container = k.V1Container(
        name="redis",
        image=REDIS_IMAGE,
        image_pull_policy="IfNotPresent",
        args=["redis-server", "--appendonly", "yes", "--save", "", "--maxmemory", "400mb",
              "--maxmemory-policy", "noeviction", "--protected-mode", "no"],
        ports=[k.V1ContainerPort(name="redis", container_port=REDIS_PORT)],
        volume_mounts=[mount("data", "/data", read_only=False)],
        resources=k.V1ResourceRequirements(requests={"cpu": cpu, "memory": mem_request}, limits={"memory": mem_limit}),
        readiness_probe=probe_of(exec_=["redis-cli", "ping"], period=5),
        liveness_probe=probe_of(tcp=REDIS_PORT, period=10),
        security_context=container_security(),
    )  # fmt: skip
    pod = k.V1PodSpec(
        containers=[container],
        security_context=pod_security(REDIS_UID),
        automount_service_account_token=False,
        enable_service_links=False,
        affinity=region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    stateful = k.V1StatefulSet(
        api_version="apps/v1",
        kind="StatefulSet",
        metadata=meta(REDIS, options, "redis"),
        spec=k.V1StatefulSetSpec(
            replicas=1,
            service_name=REDIS,
            selector=k.V1LabelSelector(match_labels=selector("redis")),
            template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels("redis")), spec=pod),
            volume_claim_templates=[
                k.V1PersistentVolumeClaim(
                    api_version="v1",
                    kind="PersistentVolumeClaim",
                    metadata=k.V1ObjectMeta(name="data", labels=labels("redis")),
                    spec=k.V1PersistentVolumeClaimSpec(
                        access_modes=["ReadWriteOnce"],
                        resources=k.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                    ),
                )
            ],
        ),
    )
    service = service_of(
        REDIS, options, "redis",
        [k.V1ServicePort(name="redis", port=REDIS_PORT, target_port="redis", protocol="TCP")],
        headless=True,
    )  # fmt: skip
    return [stateful, service]
