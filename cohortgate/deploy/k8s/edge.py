"""The gateway's pods: the edge (Envoy + gateway side by side) or, with a mesh, the gateway alone.

The edge pod's processor hop is a Unix socket on a shared in-memory ``emptyDir`` (both containers run
as the same non-root user, so the socket's 0600 mode admits Envoy and nobody else). Envoy's bootstrap
is the one `cohortgate.deploy.envoy` renders, held in a ConfigMap; the policy's clusters (filesystem
CDS) sit beside the policy in another ConfigMap, so one ConfigMap update swaps both at once and
Envoy's ``watched_directory`` sees the symlink swap.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubernetes import client as k

from cohortgate.core.contract import REDIS_ENV, worker_socket
from cohortgate.deploy.envoy.files import BOOTSTRAP_FILE, CDS_FILE
from cohortgate.deploy.k8s import sizing
from cohortgate.deploy.k8s.objects import (
    ADMIN_PORT,
    CERTS_DIR,
    EDGE,
    ENVOY_CONFIGMAP,
    ENVOY_DIR,
    ENVOY_TLS_DIR,
    ENVOY_TLS_SECRET,
    GATEWAY,
    HTTPS_PORT,
    JWKS_CONFIGMAP,
    POLICY_CONFIGMAP,
    PROBE,
    PROCESSOR_PORT,
    PROCESSOR_TLS_SECRET,
    RUN_DIR,
    SOCKET,
    SYSTEM_CA,
    configmap_volume,
    container_security,
    deployment_of,
    meta,
    mount,
    pod_security,
    pre_stop_sleep,
    probe_of,
    redis_env,
    region_affinity,
    selector,
    service_of,
    spread,
    tmp_volume,
    unit_salt_env,
)
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import JWKS_DIR, POLICY_DIR, POLICY_FILE, Plan


def envoy_files(plan: Plan, options: RenderOptions, envoy_concurrency: int, workers: int = 1) -> tuple[str, str]:
    """(bootstrap.yaml, cds.yaml): `cohortgate.deploy.envoy`'s own rendering, with in-pod paths; the
    processor cluster has one endpoint per gateway worker's socket."""
    from cohortgate.deploy.envoy import EnvoyTls, ProcessorAddress, cds_text, render_bootstrap
    from cohortgate.deploy.envoy.bootstrap import bootstrap_text

    # cert-manager's Secret layout; the processor hop is a Unix socket, so no client certificate.
    tls = EnvoyTls(
        ca_cert=f"{ENVOY_TLS_DIR}/ca.crt", server_cert=f"{ENVOY_TLS_DIR}/tls.crt", server_key=f"{ENVOY_TLS_DIR}/tls.key"
    )
    bootstrap = render_bootstrap(
        tls=tls,
        cds_path=f"{POLICY_DIR}/{CDS_FILE}",
        processor=ProcessorAddress(uds=SOCKET, workers=workers),
        transport=options.transport,
        listen_port=HTTPS_PORT,
        admin_port=ADMIN_PORT,
        concurrency=envoy_concurrency,
        listen_address="0.0.0.0",
        message_timeout=dt.timedelta(seconds=options.processor_timeout_s),
        tracing=options.trace_collector,
    )
    header = (
        "Envoy bootstrap rendered by `cohortgate k8s render` (cohortgate.deploy.envoy): static; the policy's\n"
        f"clusters arrive through filesystem CDS in {POLICY_DIR}/{CDS_FILE}. Do not edit."
    )
    _, cds = cds_text(plan.policy.backends, upstream_ca=SYSTEM_CA, source=plan.policy.path)
    return bootstrap_text(bootstrap, header), cds


def _gateway_container(
    plan: Plan, options: RenderOptions, *, listen: str, cpu_milli: int, mesh: bool, workers: int = 1
) -> k.V1Container:
    args = [
        "gateway",
        "--policy", f"{POLICY_DIR}/{POLICY_FILE}",
        "--transport", options.transport,
        "--grpc-server", options.grpc_server,
        "--listen", listen,
        "--trust-domain", options.trust_domain,
        "--redis", f"$({REDIS_ENV})",
        *options.tracing_args(),
        *(["--workers", str(workers)] if workers > 1 else []),
    ]  # fmt: skip
    mounts = [mount("policy", POLICY_DIR), mount("tmp", "/tmp", read_only=False)]
    if plan.jwks_file:
        mounts.append(mount("jwks", JWKS_DIR))
    if mesh:
        args += ["--certs", CERTS_DIR]
        mounts.append(mount("processor-tls", CERTS_DIR))
        probe = ["tcp", f"127.0.0.1:{PROCESSOR_PORT}"]
        ports = [k.V1ContainerPort(name="grpc", container_port=PROCESSOR_PORT)]
    else:
        mounts.append(mount("run", RUN_DIR, read_only=False))
        probe = ["uds", *(worker_socket(SOCKET, i, workers) for i in range(workers))]  # every worker answers
        ports = None
    memory = sizing.GATEWAY_MEMORY
    return k.V1Container(
        name="gateway",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["cohortgate"],
        args=args,
        env=[redis_env(options), unit_salt_env()],
        ports=ports,
        volume_mounts=mounts,
        resources=k.V1ResourceRequirements(
            requests={"cpu": f"{cpu_milli}m", "memory": memory[0]}, limits={"memory": memory[1]}
        ),
        readiness_probe=probe_of(exec_=[*PROBE, *probe], period=5, failures=2),
        liveness_probe=probe_of(exec_=[*PROBE, *probe], period=10, failures=3, timeout=3),
        startup_probe=probe_of(exec_=[*PROBE, *probe], period=2, failures=30),
        # Outlive Envoy's own pre-stop pause, so Envoy never loses its processor while it drains.
        lifecycle=pre_stop_sleep(8),
        security_context=container_security(),
    )


def edge(plan: Plan, options: RenderOptions, bootstrap_digest: str) -> list[Any]:
    """The edge Deployment (Envoy + gateway), its Service, HPA and PDB."""
    size = options.edge_sizing
    envoy = k.V1Container(
        name="envoy",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["envoy"],
        args=[
            "-c",
            f"{ENVOY_DIR}/{BOOTSTRAP_FILE}",
            "--concurrency",
            str(size.envoy_concurrency),
            "--log-level",
            "info",
            "--drain-time-s",
            "15",
        ],
        ports=[k.V1ContainerPort(name="https", container_port=HTTPS_PORT)],
        volume_mounts=[
            mount("envoy-config", ENVOY_DIR),
            mount("policy", POLICY_DIR),
            mount("envoy-tls", ENVOY_TLS_DIR),
            mount("run", RUN_DIR, read_only=False),
            mount("tmp", "/tmp", read_only=False),
        ],
        resources=k.V1ResourceRequirements(
            requests={"cpu": f"{size.envoy_cpu_milli}m", "memory": sizing.ENVOY_MEMORY[0]},
            limits={"memory": sizing.ENVOY_MEMORY[1]},
        ),
        # Admin listens on loopback only; the probe runs inside the pod's network namespace.
        readiness_probe=probe_of(exec_=[*PROBE, "http", f"http://127.0.0.1:{ADMIN_PORT}/ready"], period=5, failures=2),
        liveness_probe=probe_of(tcp=HTTPS_PORT, period=10, failures=3),
        startup_probe=probe_of(tcp=HTTPS_PORT, period=2, failures=30),
        lifecycle=pre_stop_sleep(5),
        security_context=container_security(),
    )
    gateway = _gateway_container(
        plan,
        options,
        listen=f"uds:{SOCKET}",
        cpu_milli=size.gateway_cpu_milli,
        mesh=False,
        workers=size.gateway_workers,
    )
    volumes = [
        configmap_volume("envoy-config", ENVOY_CONFIGMAP),
        configmap_volume("policy", POLICY_CONFIGMAP),
        k.V1Volume(name="envoy-tls", secret=k.V1SecretVolumeSource(secret_name=ENVOY_TLS_SECRET, default_mode=0o400)),
        k.V1Volume(name="run", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Mi")),
        tmp_volume(),
    ]
    if plan.jwks_file:
        volumes.append(configmap_volume("jwks", JWKS_CONFIGMAP))
    pod = k.V1PodSpec(
        containers=[envoy, gateway],
        volumes=volumes,
        security_context=pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=30,
        topology_spread_constraints=spread("edge"),
        affinity=region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    deployment = deployment_of(
        EDGE,
        options,
        "edge",
        pod,
        replicas=None,  # the HPA owns the count
        # The bootstrap is static: a new one needs new pods. The policy is not: it reloads live.
        annotations={"cohortgate.dev/bootstrap-sha256": bootstrap_digest},
        strategy=k.V1DeploymentStrategy(
            type="RollingUpdate", rolling_update=k.V1RollingUpdateDeployment(max_surge="25%", max_unavailable=0)
        ),
    )
    service = service_of(
        EDGE, options, "edge",
        [k.V1ServicePort(name="https", port=443, target_port="https", protocol="TCP", app_protocol="https")],
    )  # fmt: skip
    hpa = k.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=meta(EDGE, options, "edge"),
        spec=k.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment", name=EDGE),
            min_replicas=options.min_replicas,
            max_replicas=options.max_replicas,
            metrics=[
                # Per container: the gateway is one Python process (one core at most), so its own
                # utilisation is the signal; Envoy's is the second guard.
                k.V2MetricSpec(
                    type="ContainerResource",
                    container_resource=k.V2ContainerResourceMetricSource(
                        name="cpu",
                        container=container,
                        target=k.V2MetricTarget(type="Utilization", average_utilization=sizing.HPA_TARGET_UTILIZATION),
                    ),
                )
                for container in ("gateway", "envoy")
            ],
        ),
    )
    pdb = k.V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=meta(EDGE, options, "edge"),
        spec=k.V1PodDisruptionBudgetSpec(max_unavailable=1, selector=k.V1LabelSelector(match_labels=selector("edge"))),
    )
    return [deployment, service, hpa, pdb]


def mesh_gateway(plan: Plan, options: RenderOptions) -> list[Any]:
    """The gateway alone (a mesh's Envoy calls it over mTLS on TCP), its Service, HPA and PDB."""
    size = options.edge_sizing
    container = _gateway_container(
        plan, options, listen=f"tcp:0.0.0.0:{PROCESSOR_PORT}", cpu_milli=size.gateway_cpu_milli, mesh=True
    )
    volumes = [
        configmap_volume("policy", POLICY_CONFIGMAP),
        # cert-manager's keys, renamed to the layout `cohortgate gateway --certs` reads.
        k.V1Volume(
            name="processor-tls",
            projected=k.V1ProjectedVolumeSource(
                default_mode=0o400,
                sources=[
                    k.V1VolumeProjection(
                        secret=k.V1SecretProjection(
                            name=PROCESSOR_TLS_SECRET,
                            items=[
                                k.V1KeyToPath(key="tls.crt", path="processor.crt"),
                                k.V1KeyToPath(key="tls.key", path="processor.key"),
                                k.V1KeyToPath(key="ca.crt", path="ca.crt"),
                            ],
                        )
                    )
                ],
            ),
        ),
        tmp_volume(),
    ]
    if plan.jwks_file:
        volumes.append(configmap_volume("jwks", JWKS_CONFIGMAP))
    pod = k.V1PodSpec(
        containers=[container],
        volumes=volumes,
        security_context=pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=30,
        topology_spread_constraints=spread("gateway"),
        affinity=region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    annotations = {"sidecar.istio.io/inject": "false"} if options.mesh is Mesh.ISTIO else None
    deployment = deployment_of(GATEWAY, options, "gateway", pod, replicas=None, annotations=annotations)
    service = service_of(
        GATEWAY, options, "gateway",
        [k.V1ServicePort(name="grpc", port=PROCESSOR_PORT, target_port="grpc", protocol="TCP", app_protocol="grpc")],
    )  # fmt: skip
    hpa = k.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=meta(GATEWAY, options, "gateway"),
        spec=k.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment", name=GATEWAY),
            min_replicas=options.min_replicas,
            max_replicas=options.max_replicas,
            metrics=[
                k.V2MetricSpec(
                    type="Resource",
                    resource=k.V2ResourceMetricSource(
                        name="cpu",
                        target=k.V2MetricTarget(type="Utilization", average_utilization=sizing.HPA_TARGET_UTILIZATION),
                    ),
                )
            ],
        ),
    )
    pdb = k.V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=meta(GATEWAY, options, "gateway"),
        spec=k.V1PodDisruptionBudgetSpec(
            max_unavailable=1, selector=k.V1LabelSelector(match_labels=selector("gateway"))
        ),
    )
    return [deployment, service, hpa, pdb]
