"""The JSON form of the CDS file (what `cohortgate up` writes) and Envoy's deferred cluster stats.

Envoy picks its parser by the file's suffix; a 4 000-cluster union as YAML took it ~6-8 s on 2 busy
cores, as JSON ~0.6 s (issue 29). Both forms must carry the same document and the same version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from cohortgate.core.policy import Policy
from cohortgate.deploy import envoy as ec
from cohortgate.deploy.envoy.clusters import text_version
from cohortgate.deploy.envoyproc import EnvoyProcess, validate
from cohortgate.deploy.pki import CertPaths, init_certs
from tests.deploy.test_envoy import make_policy

ENVOY_TIMEOUT_S = 30.0  # generous: a busy 2-core machine


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("certs"))


def _two_routes() -> Policy:
    return make_policy(
        {"control": ["http://127.0.0.1:9", "https://models.example.com"], "canary": ["http://10.0.0.1:80"]},
        shadows={"judge": ["http://127.0.0.1:10"]},
    )


def test_json_and_yaml_forms_carry_the_same_document_and_version() -> None:
    policy = _two_routes()
    yaml_version, yaml_text = ec.cds_text(policy.backends, upstream_ca="/ca.pem", form="yaml")
    json_version, json_text = ec.cds_text(policy.backends, upstream_ca="/ca.pem", form="json")
    assert json_version == yaml_version
    assert json.loads(json_text) == yaml.safe_load(yaml_text)
    assert json.loads(json_text)["resources"] == ec.cluster_resources(policy.backends, upstream_ca="/ca.pem")
    assert text_version(json_text) == text_version(yaml_text) == json_version
    empty_version, empty = ec.cds_text((), form="json")
    assert json.loads(empty)["resources"] == [] and text_version(empty) == empty_version != json_version
    with pytest.raises(ValueError, match="unknown CDS form"):
        ec.cds_text(policy.backends, form="toml")


def test_the_suffix_picks_the_form_and_an_unchanged_file_is_left_alone(tmp_path: Path) -> None:
    policy = _two_routes()
    assert (ec.cds_form(tmp_path / "cds.json"), ec.cds_form(tmp_path / "cds.yaml")) == ("json", "yaml")
    cds = tmp_path / ec.JSON_CDS_FILE
    assert ec.write_cds(policy, cds) is True
    document = json.loads(cds.read_text())  # strict JSON: Envoy reads it with its JSON parser
    assert [r["name"] for r in document["resources"]] == list(dict.fromkeys(b.cluster for b in policy.backends))
    assert ec.written_version(cds) == document["version_info"]
    inode = cds.stat().st_ino
    assert ec.write_cds(policy, cds) is False and cds.stat().st_ino == inode
    assert ec.write_cds(make_policy({"control": ["http://127.0.0.1:9"]}), cds) is True
    assert [r["name"] for r in json.loads(cds.read_text())["resources"]] == ["cg.m.control.0"]


def test_deferred_stats_only_when_asked(tmp_path: Path, certs: CertPaths) -> None:
    def bootstrap(**kw: object) -> dict:
        return ec.render_bootstrap(
            tls=ec.EnvoyTls.from_certs(certs),
            cds_path=tmp_path / ec.JSON_CDS_FILE,
            processor=ec.ProcessorAddress(uds=str(tmp_path / "p.sock")),
            **kw,  # type: ignore[arg-type]
        )

    assert "deferred_stat_options" not in bootstrap()
    assert bootstrap(deferred_stats=True)["deferred_stat_options"] == {"enable_deferred_creation_stats": True}


@pytest.mark.integration
def test_envoy_reads_the_json_file_and_follows_its_replacements(tmp_path: Path, certs: CertPaths) -> None:
    """`render(cds_file=JSON_CDS_FILE, deferred_stats=True)`, as `up` does: Envoy validates it, starts
    with its clusters, adds and drops clusters as the JSON file is replaced, and reports the version."""
    first = make_policy({"control": ["http://127.0.0.1:9"]})
    files = ec.render(
        first,
        certs=certs,
        out_dir=tmp_path,
        processor=ec.ProcessorAddress(uds=str(tmp_path / "p.sock")),
        listen_port=0,
        admin_port=0,
        cds_file=ec.JSON_CDS_FILE,
        deferred_stats=True,
    )
    assert files.cds == tmp_path / "cds.json"
    validate(files.bootstrap)
    with EnvoyProcess(files, log_path=tmp_path / "envoy.log") as envoy:
        envoy.wait_clusters({"cg.m.control.0"}, timeout=ENVOY_TIMEOUT_S)
        many = make_policy({"control": ["http://127.0.0.1:9"], **{f"v{i}": ["http://127.0.0.1:11"] for i in range(50)}})
        ec.write_cds(many, files.cds)
        envoy.wait_clusters({b.cluster for b in many.backends}, timeout=ENVOY_TIMEOUT_S)
        ec.write_cds(make_policy({"canary": ["http://127.0.0.1:9"]}), files.cds)
        envoy.wait_clusters_removed({"cg.m.control.0", "cg.m.v0.0"}, timeout=ENVOY_TIMEOUT_S)
        assert "cg.m.canary.0" in envoy.clusters()
        deadline = time.monotonic() + ENVOY_TIMEOUT_S
        accepted = None
        while time.monotonic() < deadline and accepted != ec.written_version(files.cds):
            _, body = envoy.admin_get("/stats?filter=^cluster_manager.cds.version_text$")
            accepted = body.decode().partition(":")[2].strip().strip('"')
            time.sleep(0.05)
        assert accepted == ec.written_version(files.cds)
        assert "rejected" not in (tmp_path / "envoy.log").read_text()
