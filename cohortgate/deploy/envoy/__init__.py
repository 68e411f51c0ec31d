"""Envoy's configuration, rendered from a `Policy` with envoy-data-plane's typed classes.

Two files, split by what changes:

- ``bootstrap.yaml`` (`bootstrap`) is static for the life of the process: the mTLS listener, the
  ext_proc filter (`extproc`), one route that forwards to the cluster the processor names and
  mirrors to the shadow slots (`routing`), JSON local replies (`replies`), the processor and
  access-log clusters, and admin. Nothing in it depends on the policy, so a policy edit never
  needs a restart.
- ``cds.yaml`` or ``cds.json`` (`clusters`) holds the only policy-dependent part, one cluster per
  variant and shadow backend. Envoy reads it through filesystem CDS and reloads it when a new
  version is renamed into place; the JSON form (`cohortgate up`'s) is the fast one to read.

Renderers return documents and text; `files` is the one place that writes them for a local Envoy
(Kubernetes rendering puts the same text in ConfigMaps). Starting and checking Envoy is
`cohortgate.deploy.envoyproc`'s business, which imports this package, never the reverse.

This module names the package's public surface; each name lives in the submodule that defines it.
"""

from __future__ import annotations

from cohortgate.deploy.envoy.addresses import AccessLogTarget, ProcessorAddress, TraceCollector
from cohortgate.deploy.envoy.bootstrap import ALS_CLUSTER, LISTENER_NAME, MAX_REQUEST_BYTES, render_bootstrap
from cohortgate.deploy.envoy.clusters import cds_form, cds_text, cluster_resources
from cohortgate.deploy.envoy.extproc import (
    HTTP_SERVICE_PATH,
    MESSAGE_TIMEOUT,
    PROCESSOR_CLUSTER,
    REQUEST_ATTRIBUTES,
    EnvoyTls,
)
from cohortgate.deploy.envoy.files import (
    BOOTSTRAP_FILE,
    CDS_FILE,
    JSON_CDS_FILE,
    EnvoyFiles,
    render,
    write_cds,
    write_cds_clusters,
    written_version,
)

__all__ = [
    "ALS_CLUSTER",
    "BOOTSTRAP_FILE",
    "CDS_FILE",
    "HTTP_SERVICE_PATH",
    "JSON_CDS_FILE",
    "LISTENER_NAME",
    "MAX_REQUEST_BYTES",
    "MESSAGE_TIMEOUT",
    "PROCESSOR_CLUSTER",
    "REQUEST_ATTRIBUTES",
    "AccessLogTarget",
    "EnvoyFiles",
    "EnvoyTls",
    "ProcessorAddress",
    "TraceCollector",
    "cds_form",
    "cds_text",
    "cluster_resources",
    "render",
    "render_bootstrap",
    "write_cds",
    "write_cds_clusters",
    "written_version",
]
