"""Core Kubernetes objects (Deployments, Services, HPA, PDB, NetworkPolicies, ConfigMaps, Redis).

Built with the official client's model classes (``kubernetes.client.V1Deployment`` …), so a
misspelt field or a wrong type fails here, at construction, not at ``kubectl apply``. Nothing here
holds Secret material: certificates, the unit salt and a Redis URL with credentials are read
from Secrets at run time, by name.

The edge pod runs Envoy and the gateway side by side; the processor hop is a Unix socket on a
shared in-memory ``emptyDir`` (both containers run as the same non-root user, so the socket's 0600
mode admits Envoy and nobody else). Envoy's bootstrap is the one `cohortgate.deploy.envoy` renders, held in
a ConfigMap; the policy's clusters (filesystem CDS) sit beside the policy in another ConfigMap, so
one ConfigMap update swaps both at once and Envoy's ``watched_directory`` sees the symlink swap.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k

from cohortgate.core.contract import REDIS_ENV, UNIT_SALT_ENV
from cohortgate.deploy.k8s import sizing
from cohortgate.deploy.k8s.options import Mesh, RenderOptions
from cohortgate.deploy.k8s.plan import JWKS_DIR, MODELS_DIR, POLICY_DIR, POLICY_FILE, SIDECAR_PORT, Plan, Sidecar

PART_OF = "cohortgate"
L_NAME = "app.kubernetes.io/name"
L_COMPONENT = "app.kubernetes.io/component"
L_PART_OF = "app.kubernetes.io/part-of"
L_MANAGED = "app.kubernetes.io/managed-by"
L_ROUTE = "cohortgate.dev/route"
L_OWNER = "cohortgate.dev/variant"
L_ROLE = "cohortgate.dev/role"
L_REGION = "cohortgate.dev/region"
L_BACKEND = "cohortgate.dev/backend"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
GPU_RESOURCE = "nvidia.com/gpu"

EDGE = "cohortgate-edge"
GATEWAY = "cohortgate-gateway"
CONTROLLER = "cohortgate-controller"
REDIS = "cohortgate-redis"
POLICY_CONFIGMAP = "cohortgate-policy"
ENVOY_CONFIGMAP = "cohortgate-envoy"
JWKS_CONFIGMAP = "cohortgate-jwks"
UNIT_SALT_SECRET = "cohortgate-unit-salt"  # key `salt`: created by the operator, never rendered
ADMIN_TOKEN_SECRET = "cohortgate-admin-token"  # key `token`: the controller API's bearer token
ENVOY_TLS_SECRET = "cohortgate-envoy-tls"  # cert-manager: tls.crt, tls.key, ca.crt
PROCESSOR_TLS_SECRET = "cohortgate-processor-tls"

HTTPS_PORT = 8443
ADMIN_PORT = 9901
PROCESSOR_PORT = 9002
REDIS_PORT = 6379
RUN_DIR = "/run/cohortgate"
SOCKET = f"{RUN_DIR}/processor.sock"
ENVOY_DIR = "/etc/cohortgate/envoy"
ENVOY_TLS_DIR = "/etc/cohortgate/tls/envoy"
CERTS_DIR = "/etc/cohortgate/certs"
ADMIN_DIR = "/etc/cohortgate/admin"
STATE_DIR = "/var/lib/cohortgate"
CONTROLLER_API_PORT = 9480
BOOTSTRAP_FILE = "bootstrap.yaml"
CDS_FILE = "cds.yaml"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle: in the image and in Istio's proxy
UID = 10001
REDIS_UID = 999  # the official redis image's user
REDIS_IMAGE = "redis:7.4-alpine"
PROBE = ["python", "-m", "cohortgate.deploy.k8s.probe"]


# ---------------------------------------------------------------------------------------- helpers


def labels(component: str, **extra: str) -> dict[str, str]:
    out = {L_NAME: "cohortgate", L_COMPONENT: component, L_PART_OF: PART_OF, L_MANAGED: "cohortgate-k8s-render"}
    out.update(extra)
    return out


def selector(component: str, **extra: str) -> dict[str, str]:
    return {L_NAME: "cohortgate", L_COMPONENT: component, **extra}


def meta(name: str, options: RenderOptions, component: str, *, namespace: str | None = None,
         annotations: Mapping[str, str] | None = None, **extra: str) -> k.V1ObjectMeta:
    return k.V1ObjectMeta(
        name=name,
        namespace=namespace or options.namespace,
        labels=labels(component, **extra),
        annotations=dict(annotations) if annotations else None,
    )


def _pod_security(uid: int = UID) -> k.V1PodSecurityContext:
    return k.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"),
    )


def _container_security() -> k.V1SecurityContext:
    return k.V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=k.V1Capabilities(drop=["ALL"]),
    )


def _exec(*argv: str) -> k.V1ExecAction:
    return k.V1ExecAction(command=list(argv))


def _probe(*, exec_: list[str] | None = None, tcp: int | None = None, http: tuple[str, int] | None = None,
           period: int = 10, failures: int = 3, timeout: int = 2, initial: int = 0) -> k.V1Probe:
    return k.V1Probe(
        _exec=_exec(*exec_) if exec_ else None,
        tcp_socket=k.V1TCPSocketAction(port=tcp) if tcp else None,
        http_get=k.V1HTTPGetAction(path=http[0], port=http[1]) if http else None,
        period_seconds=period,
        failure_threshold=failures,
        timeout_seconds=timeout,
        initial_delay_seconds=initial or None,
    )


def _pre_stop_sleep(seconds: int) -> k.V1Lifecycle:
    # Endpoints leave the Service a moment after the pod is marked terminating; keep serving meanwhile.
    return k.V1Lifecycle(pre_stop=k.V1LifecycleHandler(sleep=k.V1SleepAction(seconds=seconds)))


def _mount(name: str, path: str, read_only: bool = True) -> k.V1VolumeMount:
    return k.V1VolumeMount(name=name, mount_path=path, read_only=read_only)


def _configmap_volume(name: str, configmap: str, items: Iterable[str] | None = None) -> k.V1Volume:
    return k.V1Volume(
        name=name,
        config_map=k.V1ConfigMapVolumeSource(
            name=configmap,
            default_mode=0o444,
            items=[k.V1KeyToPath(key=i, path=i) for i in items] if items else None,
        ),
    )


def _tmp_volume() -> k.V1Volume:
    return k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource(size_limit="64Mi"))


def _region_affinity(values: Iterable[str]) -> k.V1Affinity:
    """A hard node affinity: the pod runs in these regions or not at all (data residency)."""
    return k.V1Affinity(
        node_affinity=k.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k.V1NodeSelector(
                node_selector_terms=[
                    k.V1NodeSelectorTerm(
                        match_expressions=[
                            k.V1NodeSelectorRequirement(key=REGION_LABEL, operator="In", values=sorted(values))
                        ]
                    )
                ]
            )
        )
    )


def _spread(component: str) -> list[k.V1TopologySpreadConstraint]:
    return [
        k.V1TopologySpreadConstraint(
            max_skew=1,
            topology_key=key,
            when_unsatisfiable="ScheduleAnyway",
            label_selector=k.V1LabelSelector(match_labels=selector(component)),
        )
        for key in (ZONE_LABEL, "kubernetes.io/hostname")
    ]


def redis_env(options: RenderOptions) -> k.V1EnvVar:
    """The Redis URL: a literal for in-cluster or credential-free Redis, else read from a Secret."""
    if options.with_redis:
        return k.V1EnvVar(name=REDIS_ENV, value=f"redis://{options.service_host(REDIS)}:{REDIS_PORT}/0")
    if options.redis_url is not None:
        return k.V1EnvVar(name=REDIS_ENV, value=options.redis_url)
    return k.V1EnvVar(
        name=REDIS_ENV,
        value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(name=options.redis_secret, key="url")),
    )


def _unit_salt_env() -> k.V1EnvVar:
    return k.V1EnvVar(
        name=UNIT_SALT_ENV,
        value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(name=UNIT_SALT_SECRET, key="salt")),
    )


def _deployment(name: str, options: RenderOptions, component: str, pod: k.V1PodSpec, *, replicas: int | None,
                pod_labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
                strategy: k.V1DeploymentStrategy | None = None, **extra: str) -> k.V1Deployment:
    sel = selector(component, **({L_BACKEND: extra[L_BACKEND]} if L_BACKEND in extra else {}))
    return k.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=meta(name, options, component, **extra),
        spec=k.V1DeploymentSpec(
            replicas=replicas,
            revision_history_limit=5,
            selector=k.V1LabelSelector(match_labels=sel),
            strategy=strategy,
            template=k.V1PodTemplateSpec(
                metadata=k.V1ObjectMeta(
                    labels={**labels(component, **extra), **(pod_labels or {})},
                    annotations=dict(annotations) if annotations else None,
                ),
                spec=pod,
            ),
        ),
    )


def _service(name: str, options: RenderOptions, component: str, ports: list[k.V1ServicePort], *,
             service_type: str = "ClusterIP", headless: bool = False, sel: Mapping[str, str] | None = None,
             **extra: str) -> k.V1Service:
    return k.V1Service(
        api_version="v1",
        kind="Service",
        metadata=meta(name, options, component, **extra),
        spec=k.V1ServiceSpec(
            type=service_type,
            cluster_ip="None" if headless else None,
            selector=dict(sel or selector(component)),
            ports=ports,
        ),
    )


# ------------------------------------------------------------------------------------ ConfigMaps


def envoy_files(plan: Plan, options: RenderOptions, envoy_concurrency: int) -> tuple[str, str]:
    """(bootstrap.yaml, cds.yaml): `cohortgate.deploy.envoy`'s own rendering, with in-pod paths."""
    from cohortgate.deploy import envoy as envoyconf
    from cohortgate.deploy.pki import CertPaths

    tls = Path(ENVOY_TLS_DIR)
    certs = CertPaths(
        dir=tls,
        trust_domain=options.trust_domain,
        ca_cert=tls / "ca.crt",
        ca_key=tls / "unused-ca.key",  # never read: the CA's key stays with the issuer
        envoy_cert=tls / "tls.crt",
        envoy_key=tls / "tls.key",
        processor_cert=tls / "unused-processor.crt",
        processor_key=tls / "unused-processor.key",
        envoy_client_cert=tls / "unused-envoy-client.crt",  # the processor hop is a Unix socket
        envoy_client_key=tls / "unused-envoy-client.key",
        jwt_key=tls / "unused-jwt.key",
        jwks=Path(JWKS_DIR) / "jwks.json",
    )
    bootstrap = envoyconf.render_bootstrap(
        certs=certs,
        cds_path=Path(POLICY_DIR) / CDS_FILE,
        processor=envoyconf.ProcessorAddress(uds=SOCKET),
        transport=options.transport,
        listen_port=HTTPS_PORT,
        admin_port=ADMIN_PORT,
        concurrency=envoy_concurrency,
        listen_address="0.0.0.0",
    )
    header = (
        "# Envoy bootstrap rendered by `cohortgate k8s render` (cohortgate.deploy.envoy): static; the policy's\n"
        f"# clusters arrive through filesystem CDS in {POLICY_DIR}/{CDS_FILE}. Do not edit.\n"
    )
    bootstrap_text = header + yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False, width=100)
    with tempfile.TemporaryDirectory(prefix="cohortgate-k8s-") as tmp:
        cds = Path(tmp) / CDS_FILE
        envoyconf.write_cds(plan.policy, cds, upstream_ca=SYSTEM_CA)
        cds_text = cds.read_text()
    return bootstrap_text, cds_text


def config_map(name: str, options: RenderOptions, component: str, data: Mapping[str, str]) -> k.V1ConfigMap:
    return k.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta(name, options, component), data=dict(data))


# ------------------------------------------------------------------------------------------- edge


def _gateway_container(plan: Plan, options: RenderOptions, *, listen: str, cpu_milli: int,
                       mesh: bool) -> k.V1Container:
    args = [
        "gateway",
        "--policy", f"{POLICY_DIR}/{POLICY_FILE}",
        "--transport", options.transport,
        "--grpc-server", options.grpc_server,
        "--listen", listen,
        "--trust-domain", options.trust_domain,
        "--redis", f"$({REDIS_ENV})",
    ]  # fmt: skip
    mounts = [_mount("policy", POLICY_DIR), _mount("tmp", "/tmp", read_only=False)]
    if plan.jwks_file:
        mounts.append(_mount("jwks", JWKS_DIR))
    if mesh:
        args += ["--certs", CERTS_DIR]
        mounts.append(_mount("processor-tls", CERTS_DIR))
        probe = ["tcp", f"127.0.0.1:{PROCESSOR_PORT}"]
        ports = [k.V1ContainerPort(name="grpc", container_port=PROCESSOR_PORT)]
    else:
        mounts.append(_mount("run", RUN_DIR, read_only=False))
        probe = ["uds", SOCKET]
        ports = None
    memory = sizing.GATEWAY_MEMORY
    return k.V1Container(
        name="gateway",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["cohortgate"],
        args=args,
        env=[redis_env(options), _unit_salt_env()],
        ports=ports,
        volume_mounts=mounts,
        resources=k.V1ResourceRequirements(
            requests={"cpu": f"{cpu_milli}m", "memory": memory[0]}, limits={"memory": memory[1]}
        ),
        readiness_probe=_probe(exec_=[*PROBE, *probe], period=5, failures=2),
        liveness_probe=_probe(exec_=[*PROBE, *probe], period=10, failures=3, timeout=3),
        startup_probe=_probe(exec_=[*PROBE, *probe], period=2, failures=30),
        # Outlive Envoy's own pre-stop pause, so Envoy never loses its processor while it drains.
        lifecycle=_pre_stop_sleep(8),
        security_context=_container_security(),
    )


def edge(plan: Plan, options: RenderOptions, bootstrap_digest: str) -> list[Any]:
    """The edge Deployment (Envoy + gateway), its Service, HPA and PDB."""
    size = sizing.edge(options.transport, options.grpc_server, options.target_rps_per_pod)
    envoy = k.V1Container(
        name="envoy",
        image=options.image,
        image_pull_policy="IfNotPresent",
        command=["envoy"],
        args=[
            "-c", f"{ENVOY_DIR}/{BOOTSTRAP_FILE}",
            "--concurrency", str(size.envoy_concurrency),
            "--log-level", "info",
            "--drain-time-s", "15",
        ],
        ports=[k.V1ContainerPort(name="https", container_port=HTTPS_PORT)],
        volume_mounts=[
            _mount("envoy-config", ENVOY_DIR),
            _mount("policy", POLICY_DIR),
            _mount("envoy-tls", ENVOY_TLS_DIR),
            _mount("run", RUN_DIR, read_only=False),
            _mount("tmp", "/tmp", read_only=False),
        ],
        resources=k.V1ResourceRequirements(
            requests={"cpu": f"{size.envoy_cpu_milli}m", "memory": sizing.ENVOY_MEMORY[0]},
            limits={"memory": sizing.ENVOY_MEMORY[1]},
        ),
        # Admin listens on loopback only; the probe runs inside the pod's network namespace.
        readiness_probe=_probe(exec_=[*PROBE, "http", f"http://127.0.0.1:{ADMIN_PORT}/ready"], period=5, failures=2),
        liveness_probe=_probe(tcp=HTTPS_PORT, period=10, failures=3),
        startup_probe=_probe(tcp=HTTPS_PORT, period=2, failures=30),
        lifecycle=_pre_stop_sleep(5),
        security_context=_container_security(),
    )
    gateway = _gateway_container(plan, options, listen=f"uds:{SOCKET}", cpu_milli=size.gateway_cpu_milli, mesh=False)
    volumes = [
        _configmap_volume("envoy-config", ENVOY_CONFIGMAP),
        _configmap_volume("policy", POLICY_CONFIGMAP),
        k.V1Volume(name="envoy-tls", secret=k.V1SecretVolumeSource(secret_name=ENVOY_TLS_SECRET, default_mode=0o400)),
        k.V1Volume(name="run", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Mi")),
        _tmp_volume(),
    ]
    if plan.jwks_file:
        volumes.append(_configmap_volume("jwks", JWKS_CONFIGMAP))
    pod = k.V1PodSpec(
        containers=[envoy, gateway],
        volumes=volumes,
        security_context=_pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=30,
        topology_spread_constraints=_spread("edge"),
        affinity=_region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    deployment = _deployment(
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
    service = _service(
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
                        target=k.V2MetricTarget(
                            type="Utilization", average_utilization=sizing.HPA_TARGET_UTILIZATION
                        ),
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
    size = sizing.edge("grpc", options.grpc_server, options.target_rps_per_pod)
    container = _gateway_container(
        plan, options, listen=f"tcp:0.0.0.0:{PROCESSOR_PORT}", cpu_milli=size.gateway_cpu_milli, mesh=True
    )
    volumes = [
        _configmap_volume("policy", POLICY_CONFIGMAP),
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
        _tmp_volume(),
    ]
    if plan.jwks_file:
        volumes.append(_configmap_volume("jwks", JWKS_CONFIGMAP))
    pod = k.V1PodSpec(
        containers=[container],
        volumes=volumes,
        security_context=_pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=30,
        topology_spread_constraints=_spread("gateway"),
        affinity=_region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    annotations = {"sidecar.istio.io/inject": "false"} if options.mesh is Mesh.ISTIO else None
    deployment = _deployment(GATEWAY, options, "gateway", pod, replicas=None, annotations=annotations)
    service = _service(
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


# --------------------------------------------------------------------------------------- sidecars


def sidecar(s: Sidecar, plan: Plan, options: RenderOptions) -> list[Any]:
    """One model-backed backend: a Deployment pinned to its region, and its Service."""
    extra = {L_ROUTE: s.route, L_OWNER: s.owner, L_ROLE: s.role, L_BACKEND: s.name}
    region_values = options.node_regions(s.region)
    if len(region_values) == 1:
        extra[L_REGION] = region_values[0]
    args = [
        "sidecar",
        "--model", f"{MODELS_DIR}/{s.model_file}",
        "--name", s.model_name,
        "--host", "0.0.0.0",
        "--port", str(SIDECAR_PORT),
        "--variant", s.owner,
        "--device", "cuda" if s.gpu else "cpu",
        "--threads", "1",
    ]  # fmt: skip
    env = None
    route = plan.policy.by_name[s.route]
    if route.shadows:
        # Shadow comparison joins the shadow's and the primary's reports by request id.
        args += ["--report-to", f"$({REDIS_ENV})"]
        env = [redis_env(options)]
    requests = {"cpu": sizing.SIDECAR_CPU, "memory": sizing.SIDECAR_MEMORY[0]}
    limits = {"memory": sizing.SIDECAR_MEMORY[1]}
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
        volume_mounts=[_mount("models", MODELS_DIR), _mount("tmp", "/tmp", read_only=False)],
        resources=k.V1ResourceRequirements(requests=requests, limits=limits),
        readiness_probe=_probe(http=("/v2/health/ready", SIDECAR_PORT), period=5, failures=2),
        liveness_probe=_probe(http=("/v2/health/live", SIDECAR_PORT), period=10, failures=3),
        # The port opens at once; the model then loads and warms up before `ready`.
        startup_probe=_probe(http=("/v2/health/live", SIDECAR_PORT), period=2, failures=60),
        lifecycle=_pre_stop_sleep(5),
        security_context=_container_security(),
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
            _tmp_volume(),
        ],
        security_context=_pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=45,  # the sidecar drains its queue for up to 30 s
        affinity=_region_affinity(region_values),
        tolerations=tolerations,
    )
    annotations = {"sidecar.istio.io/inject": "false"} if options.mesh is Mesh.ISTIO else None
    deployment = _deployment(s.name, options, "sidecar", pod, replicas=1, annotations=annotations, **extra)
    service = _service(
        s.name, options, "sidecar",
        [k.V1ServicePort(name="http", port=SIDECAR_PORT, target_port="http", protocol="TCP", app_protocol="http")],
        sel=selector("sidecar", **{L_BACKEND: s.name}),
        **extra,
    )  # fmt: skip
    return [deployment, service]


# --------------------------------------------------------------------------- controller and Redis


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
            "--policy", f"{POLICY_DIR}/{POLICY_FILE}",
            "--redis", f"$({REDIS_ENV})",
            "--listen", f"127.0.0.1:{CONTROLLER_API_PORT}",
            "--token-file", f"{ADMIN_DIR}/token",
            "--state-file", f"{STATE_DIR}/state.json",
        ],
        env=[redis_env(options)],
        volume_mounts=[
            _mount("policy", POLICY_DIR),
            _mount("admin-token", ADMIN_DIR),
            _mount("state", STATE_DIR, read_only=False),
            _mount("tmp", "/tmp", read_only=False),
        ],
        resources=k.V1ResourceRequirements(requests={"cpu": cpu, "memory": mem_request}, limits={"memory": mem_limit}),
        readiness_probe=_probe(exec_=health, period=10, failures=3),
        liveness_probe=_probe(exec_=health, period=20, failures=3, timeout=3),
        security_context=_container_security(),
    )
    pod = k.V1PodSpec(
        containers=[container],
        volumes=[
            _configmap_volume("policy", POLICY_CONFIGMAP, items=[POLICY_FILE]),
            k.V1Volume(
                name="admin-token",
                secret=k.V1SecretVolumeSource(
                    secret_name=ADMIN_TOKEN_SECRET, default_mode=0o400, items=[k.V1KeyToPath(key="token", path="token")]
                ),
            ),
            k.V1Volume(name="state", empty_dir=k.V1EmptyDirVolumeSource(size_limit="16Mi")),
            _tmp_volume(),
        ],
        security_context=_pod_security(),
        automount_service_account_token=False,
        enable_service_links=False,
        affinity=_region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
    )
    return _deployment(CONTROLLER, options, "controller", pod, replicas=1)


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
        volume_mounts=[_mount("data", "/data", read_only=False)],
        resources=k.V1ResourceRequirements(requests={"cpu": cpu, "memory": mem_request}, limits={"memory": mem_limit}),
        readiness_probe=_probe(exec_=["redis-cli", "ping"], period=5),
        liveness_probe=_probe(tcp=REDIS_PORT, period=10),
        security_context=_container_security(),
    )  # fmt: skip
    pod = k.V1PodSpec(
        containers=[container],
        security_context=_pod_security(REDIS_UID),
        automount_service_account_token=False,
        enable_service_links=False,
        affinity=_region_affinity(options.node_regions(options.edge_region)) if options.edge_region else None,
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
    service = _service(
        REDIS, options, "redis",
        [k.V1ServicePort(name="redis", port=REDIS_PORT, target_port="redis", protocol="TCP")],
        headless=True,
    )  # fmt: skip
    return [stateful, service]


# ------------------------------------------------------------------------------ network policies


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


def _ingress_policy(name: str, options: RenderOptions, component: str, peers: list[k.V1NetworkPolicyPeer],
                    port: int) -> k.V1NetworkPolicy:
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


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
