"""One Deployment and Service per model sidecar, pinned to its backend's region."""

from __future__ import annotations

from typing import Any

from kubernetes import client as k

from cohortgate.core.contract import REDIS_ENV
from cohortgate.deploy.k8s import sizing
from cohortgate.deploy.k8s.objects import (
    GPU_RESOURCE,
    L_BACKEND,
    L_OWNER,
    L_REGION,
    L_ROLE,
    L_ROUTE,
    container_security,
    deployment_of,
    mount,
    pod_security,
    pre_stop_sleep,
    probe_of,
    redis_env,
    region_affinity,
    selector,
    service_of,
    tmp_volume,
)
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import MODELS_DIR, SIDECAR_PORT, Plan, Sidecar


def sidecar(s: Sidecar, plan: Plan, options: RenderOptions) -> list[Any]:
    """One model-backed backend: a Deployment pinned to its region, and its Service."""
    extra = {L_ROUTE: s.route, L_OWNER: s.owner, L_ROLE: s.role, L_BACKEND: s.name}
    region_values = options.node_regions(s.region)
    if len(region_values) == 1:
        extra[L_REGION] = region_values[0]
    cpu = options.sidecar_cpu or sizing.SIDECAR_CPU
    cpu_limit = options.sidecar_cpu  # given: request and limit alike, so the threads never outnumber the cores
    args = [
        "sidecar",
        "--model", f"{MODELS_DIR}/{s.model_file}",
        "--name", s.model_name,
        "--host", "0.0.0.0",
        "--port", str(SIDECAR_PORT),
        "--variant", s.owner,
        "--device", "cuda" if s.gpu else "cpu",
        "--threads", str(sizing.sidecar_threads(cpu, cpu_limit)),
        *options.tracing_args(),
    ]  # fmt: skip
    env = None
    route = plan.policy.by_name[s.route]
    if route.shadows:
        # Shadow comparison joins the shadow's and the primary's reports by request id.
        args += ["--report-to", f"$({REDIS_ENV})"]
        env = [redis_env(options)]
    requests = {"cpu": cpu, "memory": sizing.SIDECAR_MEMORY[0]}
    limits = {"memory": sizing.SIDECAR_MEMORY[1]}
    if cpu_limit is not None:
        limits["cpu"] = cpu_limit
    tolerations = None
    if s.gpu:
        requests[GPU_RESOURCE] = "1"
        limits[GPU_RESOURCE] = "1"
        tolerations = [k.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    container = k.V1Container(
        name="sidecar",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["cohortgate"],
        args=args,
        env=env,
        ports=[k.V1ContainerPort(name="http", container_port=SIDECAR_PORT)],
        volume_mounts=[mount("models", MODELS_DIR), mount("tmp", "/tmp", read_only=False)],
        resources=k.V1ResourceRequirements(requests=requests, limits=limits),
        readiness_probe=probe_of(http=("/v2/health/ready", SIDECAR_PORT), period=5, failures=2),
        liveness_probe=probe_of(http=("/v2/health/live", SIDECAR_PORT), period=10, failures=3),
        # The port opens at once; the model then loads and warms up before `ready`.
        startup_probe=probe_of(http=("/v2/health/live", SIDECAR_PORT), period=2, failures=60),
        lifecycle=pre_stop_sleep(5),
        security_context=container_security(),
    )
    pod = k.V1PodSpec(
        containers=[container],
        volumes=[
            k.V1Volume(
                name="models",
                persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
                    claim_name=options.models_pvc, read_only=True
                ),
            ),
            tmp_volume(),
        ],
        security_context=pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=45,  # the sidecar drains its queue for up to 30 s
        affinity=region_affinity(region_values),
        tolerations=tolerations,
    )
    annotations = {"sidecar.istio.io/inject": "false"} if options.mesh is Mesh.ISTIO else None
    deployment = deployment_of(s.name, options, "sidecar", pod, replicas=1, annotations=annotations, **extra)
    service = service_of(
        s.name, options, "sidecar",
        [k.V1ServicePort(name="http", port=SIDECAR_PORT, target_port="http", protocol="TCP", app_protocol="http")],
        sel=selector("sidecar", **{L_BACKEND: s.name}),
        **extra,
    )  # fmt: skip
    return [deployment, service]
