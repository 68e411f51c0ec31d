"""Writing the rendered texts where a local Envoy reads them: the only file I/O of this package.

``render`` writes the CDS file then ``bootstrap.yaml`` into one directory; `write_cds` /
`write_cds_clusters` replace the CDS file atomically (Envoy's directory watch sees one complete
file), and leave it alone when it already holds exactly these clusters. The CDS file is
``cds.yaml`` by default (what operators and the k8s manifests know); ``cds_file=JSON_CDS_FILE``
(what `cohortgate up` uses) makes it JSON, which Envoy reads ~10x faster (`clusters`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cohortgate.deploy.envoy.addresses import AccessLogTarget, ProcessorAddress, TraceCollector
from cohortgate.deploy.envoy.bootstrap import MAX_REQUEST_BYTES, bootstrap_text, render_bootstrap
from cohortgate.deploy.envoy.clusters import cds_form, cds_text, text_version
from cohortgate.deploy.envoy.extproc import MESSAGE_TIMEOUT, EnvoyTls
from cohortgate.support.files import write_atomic

if TYPE_CHECKING:
    from cohortgate.core.policy import Backend, Policy
    from cohortgate.deploy.pki import CertPaths

BOOTSTRAP_FILE = "bootstrap.yaml"
CDS_FILE = "cds.yaml"
JSON_CDS_FILE = "cds.json"  # the same clusters as JSON: Envoy picks its parser by the suffix
ADMIN_SOCKET_FILE = "admin.sock"


@dataclass(frozen=True, slots=True)
class EnvoyFiles:
    """What `render` wrote: start Envoy with ``-c bootstrap``; `write_cds` replaces ``cds``.

    Admin is on ``admin_socket`` (mode 0600) when set, else on 127.0.0.1:``admin_port``."""

    bootstrap: Path
    cds: Path
    listen_port: int
    admin_port: int | None
    admin_socket: Path | None = None
    xds_socket: Path | None = None  # set: Envoy takes its clusters from the gateway's delta CDS there, not ``cds``


def written_version(path: Path | str) -> str | None:
    """The ``version_info`` of a CDS file we wrote (Envoy reports the one it accepted)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = "".join(line for _, line in zip(range(20), f, strict=False))
    except FileNotFoundError:
        return None
    return text_version(head)


def write_cds_clusters(
    backends: Iterable[Backend], path: Path | str, *, upstream_ca: str | None = None, source: str = "a policy"
) -> bool:
    """Write these backends' clusters (a live reload writes the union of two policies' clusters
    first); True when the file changed. Confirm with `EnvoyProcess.wait_clusters` before the
    gateway names a new cluster, and stop naming a cluster before it leaves this file."""
    path = Path(path)
    version, text = cds_text(backends, upstream_ca=upstream_ca, source=source, form=cds_form(path))
    if written_version(path) == version:
        return False
    write_atomic(path, text)
    return True


def write_cds(policy: Policy, path: Path | str, *, upstream_ca: str | None = None) -> bool:
    """`write_cds_clusters` for one policy's clusters (weight-only edits leave the file alone)."""
    return write_cds_clusters(policy.backends, path, upstream_ca=upstream_ca, source=policy.path)


def render(
    policy: Policy,
    *,
    certs: CertPaths | EnvoyTls,
    out_dir: Path | str,
    processor: ProcessorAddress,
    transport: str = "grpc",
    listen_port: int = 8443,
    admin_port: int | None = 9901,
    admin_socket: Path | str | None = None,
    access_log: AccessLogTarget | None = None,
    concurrency: int | None = None,
    listen_address: str = "127.0.0.1",
    upstream_ca: str | None = None,
    message_timeout: dt.timedelta = MESSAGE_TIMEOUT,
    max_request_bytes: int | None = MAX_REQUEST_BYTES,
    tracing: TraceCollector | None = None,
    cds_file: str = CDS_FILE,
    deferred_stats: bool = False,
    xds_socket: Path | str | None = None,
) -> EnvoyFiles:
    """Write the CDS file (``cds_file``: `CDS_FILE` or `JSON_CDS_FILE`) and ``bootstrap.yaml`` into
    ``out_dir`` and say where they are.

    Paths (certificates, ``out_dir``) are written as given: relative ones resolve against Envoy's
    working directory. ``admin_socket`` puts admin on a 0600 Unix socket instead of ``admin_port``.
    ``deferred_stats``: see `render_bootstrap`. ``xds_socket``: Envoy subscribes to delta CDS from the
    gateway on that socket (``cohortgate gateway --envoy-xds``); the CDS file is still written (what
    ``envoy validate`` checks and an operator reads) but Envoy does not read it.
    """
    out_dir = Path(out_dir)
    cds = out_dir / cds_file
    bootstrap = out_dir / BOOTSTRAP_FILE
    tls = certs if isinstance(certs, EnvoyTls) else EnvoyTls.from_certs(certs)
    document = render_bootstrap(
        tls=tls,
        cds_path=cds,
        processor=processor,
        transport=transport,
        listen_port=listen_port,
        admin_port=None if admin_socket is not None else admin_port,
        admin_socket=str(admin_socket) if admin_socket is not None else None,
        access_log=access_log,
        concurrency=concurrency,
        listen_address=listen_address,
        message_timeout=message_timeout,
        max_request_bytes=max_request_bytes,
        tracing=tracing,
        deferred_stats=deferred_stats,
        xds_socket=str(xds_socket) if xds_socket is not None else None,
    )
    source = f"delta CDS from the gateway on {xds_socket}" if xds_socket is not None else f"filesystem CDS in {cds}"
    header = (
        "Envoy bootstrap rendered by `cohortgate envoy render` (static: the policy's clusters\n"
        f"arrive through {source}). ext_proc transport: {transport}. Do not edit."
    )
    # the CDS file first: Envoy must find it when it starts from the bootstrap.
    write_cds(policy, cds, upstream_ca=upstream_ca)
    write_atomic(bootstrap, bootstrap_text(document, header))
    return EnvoyFiles(
        bootstrap=bootstrap,
        cds=cds,
        listen_port=listen_port,
        admin_port=None if admin_socket is not None else admin_port,
        admin_socket=Path(admin_socket) if admin_socket is not None else None,
        xds_socket=Path(xds_socket) if xds_socket is not None else None,
    )
