"""The pure parts of `gateway.workers` and the processor cluster for N workers (no processes)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cohortgate.core.contract import worker_socket
from cohortgate.deploy.envoy import EnvoyTls, ProcessorAddress
from cohortgate.deploy.envoy.extproc import processor_cluster
from gateway.workers import serving_copy, sum_expositions, worker_audit_path


def worker(allowed: float, digest: str, weight: float, reloads: float = 1.0) -> str:
    return f"""# HELP cohortgate_decisions_total d
# TYPE cohortgate_decisions_total counter
cohortgate_decisions_total{{outcome="allowed",code="none"}} {allowed}
# HELP cohortgate_policy_info p
# TYPE cohortgate_policy_info gauge
cohortgate_policy_info{{digest="{digest}"}} 1.0
# HELP cohortgate_variant_weight w
# TYPE cohortgate_variant_weight gauge
cohortgate_variant_weight{{route="r",variant="canary"}} {weight}
# HELP cohortgate_policy_reloads_total r
# TYPE cohortgate_policy_reloads_total counter
cohortgate_policy_reloads_total{{result="ok"}} {reloads}
"""


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def test_counters_sum_replicated_series_take_the_max_and_reloads_are_the_parents() -> None:
    parent = "# HELP cohortgate_policy_reloads_total r\n# TYPE cohortgate_policy_reloads_total counter\n"
    parent += 'cohortgate_policy_reloads_total{result="ok"} 2.0\n'
    got = samples(sum_expositions([worker(3, "aaa", 10), worker(4, "aaa", 10)], parent))
    assert got[("cohortgate_decisions_total", (("code", "none"), ("outcome", "allowed")))] == 7
    assert got[("cohortgate_policy_info", (("digest", "aaa"),))] == 1  # not 2: both serve the same policy
    assert got[("cohortgate_variant_weight", (("route", "r"), ("variant", "canary")))] == 10
    assert got[("cohortgate_policy_reloads_total", (("result", "ok"),))] == 2  # the parent's, not 2 + 1 + 1


def test_workers_on_two_policies_show_both_digests() -> None:
    got = samples(sum_expositions([worker(1, "old", 10), worker(1, "new", 50)]))
    assert got[("cohortgate_policy_info", (("digest", "old"),))] == 1
    assert got[("cohortgate_policy_info", (("digest", "new"),))] == 1
    assert got[("cohortgate_variant_weight", (("route", "r"), ("variant", "canary")))] == 50


def test_a_worker_that_did_not_answer_is_left_out() -> None:
    got = samples(sum_expositions([worker(5, "a", 1)]))
    assert got[("cohortgate_decisions_total", (("code", "none"), ("outcome", "allowed")))] == 5


def test_worker_files_and_sockets() -> None:
    assert worker_audit_path("/var/log/audit.log", 1) == "/var/log/audit.w1.log"
    assert worker_audit_path("-", 1) == "-" and worker_audit_path(None, 0) is None
    assert serving_copy("/etc/cg/policy.yaml").as_posix() == "/etc/cg/.policy.yaml.serving"
    assert worker_socket("/run/p.sock", 0, 1) == "/run/p.sock"
    assert worker_socket("/run/p.sock", 3, 4) == "/run/p.sock.w3"


def test_the_processor_cluster_has_one_endpoint_per_worker() -> None:
    tls = EnvoyTls("ca.pem", "envoy.pem", "envoy.key")
    one = processor_cluster(ProcessorAddress(uds="/run/p.sock"), "grpc", tls).to_dict()
    assert len(one["loadAssignment"]["endpoints"][0]["lbEndpoints"]) == 1 and "outlierDetection" not in one
    four = processor_cluster(ProcessorAddress.parse("uds:/run/p.sock", workers=4), "grpc", tls).to_dict()
    paths = [e["endpoint"]["address"]["pipe"]["path"] for e in four["loadAssignment"]["endpoints"][0]["lbEndpoints"]]
    assert paths == [worker_socket("/run/p.sock", i, 4) for i in range(4)]
    assert four["lbPolicy"] == "LEAST_REQUEST"
    assert four["outlierDetection"]["consecutiveLocalOriginFailure"] == 1  # a refused socket is ejected at once


def test_several_workers_need_unix_sockets() -> None:
    with pytest.raises(ValueError, match="Unix sockets"):
        ProcessorAddress.parse("tcp:127.0.0.1:9000", workers=2)
    with pytest.raises(ValueError, match="1 to 64"):
        ProcessorAddress(uds="/run/p.sock", workers=0)
