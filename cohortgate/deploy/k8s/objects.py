"""The building blocks every cohortgate workload shares: names, labels, security contexts, probes,
volumes, scheduling, environment, and the Deployment / Service / ConfigMap shapes.

Built with the official client's model classes (``kubernetes.client.V1Deployment`` …), so a
misspelt field or a wrong type fails here, at construction, not at ``kubectl apply``. Nothing here
holds Secret material: certificates, the unit salt and a Redis URL with credentials are read
from Secrets at run time, by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from kubernetes import client as k

from cohortgate.core.contract import REDIS_ENV, UNIT_SALT_ENV
from cohortgate.deploy.k8s.options import RenderOptions

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


def meta(
    name: str,
    options: RenderOptions,
    component: str,
    *,
    namespace: str | None = None,
    annotations: Mapping[str, str] | None = None,
    **extra: str,
) -> k.V1ObjectMeta:
    return k.V1ObjectMeta(
        name=name,
        namespace=namespace or options.namespace,
        labels=labels(component, **extra),
        annotations=dict(annotations) if annotations else None,
    )


def pod_security(uid: int = UID) -> k.V1PodSecurityContext:
    return k.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"),
    )


def container_security() -> k.V1SecurityContext:
    return k.V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=k.V1Capabilities(drop=["ALL"]),
    )


def exec_action(*argv: str) -> k.V1ExecAction:
    return k.V1ExecAction(command=list(argv))


def probe_of(
    *,
    exec_: list[str] | None = None,
    tcp: int | None = None,
    http: tuple[str, int] | None = None,
    period: int = 10,
    failures: int = 3,
    timeout: int = 2,
    initial: int = 0,
) -> k.V1Probe:
    return k.V1Probe(
        _exec=exec_action(*exec_) if exec_ else None,
        tcp_socket=k.V1TCPSocketAction(port=tcp) if tcp else None,
        http_get=k.V1HTTPGetAction(path=http[0], port=http[1]) if http else None,
        period_seconds=period,
        failure_threshold=failures,
        timeout_seconds=timeout,
        initial_delay_seconds=initial or None,
    )


def pre_stop_sleep(seconds: int) -> k.V1Lifecycle:
    # Endpoints leave the Service a moment after the pod is marked terminating; keep serving meanwhile.
    return k.V1Lifecycle(pre_stop=k.V1LifecycleHandler(sleep=k.V1SleepAction(seconds=seconds)))


def mount(name: str, path: str, read_only: bool = True) -> k.V1VolumeMount:
    return k.V1VolumeMount(name=name, mount_path=path, read_only=read_only)


def configmap_volume(name: str, configmap: str, items: Iterable[str] | None = None) -> k.V1Volume:
    return k.V1Volume(
        name=name,
        config_map=k.V1ConfigMapVolumeSource(
            name=configmap,
            default_mode=0o444,
            items=[k.V1KeyToPath(key=i, path=i) for i in items] if items else None,
        ),
    )


def tmp_volume() -> k.V1Volume:
    return k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource(size_limit="64Mi"))


def region_affinity(values: Iterable[str]) -> k.V1Affinity:
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


def spread(component: str) -> list[k.V1TopologySpreadConstraint]:
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


def unit_salt_env() -> k.V1EnvVar:
    return k.V1EnvVar(
        name=UNIT_SALT_ENV,
        value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(name=UNIT_SALT_SECRET, key="salt")),
    )


def deployment_of(
    name: str,
    options: RenderOptions,
    component: str,
    pod: k.V1PodSpec,
    *,
    replicas: int | None,
    pod_labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    strategy: k.V1DeploymentStrategy | None = None,
    **extra: str,
) -> k.V1Deployment:
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


def service_of(
    name: str,
    options: RenderOptions,
    component: str,
    ports: list[k.V1ServicePort],
    *,
    service_type: str = "ClusterIP",
    headless: bool = False,
    sel: Mapping[str, str] | None = None,
    **extra: str,
) -> k.V1Service:
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


def config_map(name: str, options: RenderOptions, component: str, data: Mapping[str, str]) -> k.V1ConfigMap:
    return k.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=meta(name, options, component), data=dict(data))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
