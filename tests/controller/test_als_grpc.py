"""gRPC answers in Envoy's access log: a failure inside HTTP 200 counts in the error-rate guardrail (issue 25)."""

from __future__ import annotations

from typing import Any

import pytest

from cohortgate.controller.als import GRPC_AS_HTTP, AccessLogReceiver, event_from_entry
from cohortgate.controller.loop import Controller
from cohortgate.controller.metrics import TrafficMetrics
from cohortgate.controller.windows import is_error
from cohortgate.core.contract import HEADER_GRPC_STATUS
from cohortgate.core.rollout import Phase
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy
from tests.controller.test_als import entry, feed


def grpc_entry(code: str | None, *, trailers_only: bool = False, status: int = 200, **kw: Any) -> Any:
    """An entry as Envoy logs a gRPC answer: HTTP 200 and ``grpc-status`` as a trailer, or as a response
    header of a trailers-only answer (an error without a body; Envoy's local replies to gRPC callers)."""
    e = entry(status=status, **kw)
    if code is not None:
        fields = e.response.response_headers if trailers_only else e.response.response_trailers
        fields[HEADER_GRPC_STATUS] = code
    return e


SERVER_FAILURES = [("2", 500), ("4", 504), ("13", 500), ("14", 503), ("15", 500)]
CLIENTS_OWN = [("1", 499), ("3", 400), ("5", 404), ("8", 429), ("9", 400), ("12", 405), ("16", 401)]


@pytest.mark.parametrize("trailers_only", [False, True], ids=["trailer", "trailers-only"])
@pytest.mark.parametrize(("code", "status"), SERVER_FAILURES, ids=[c for c, _ in SERVER_FAILURES])
def test_a_server_side_grpc_failure_inside_http_200_is_an_error(code: str, status: int, trailers_only: bool) -> None:
    ev = event_from_entry(grpc_entry(code, trailers_only=trailers_only))
    assert ev.status == status and is_error(ev.status)


@pytest.mark.parametrize(("code", "status"), CLIENTS_OWN, ids=[c for c, _ in CLIENTS_OWN])
def test_a_callers_own_mistake_or_cancel_is_not_an_error(code: str, status: int) -> None:
    """As for REST (a 4xx is not counted): a client must not push its variant towards rollback."""
    ev = event_from_entry(grpc_entry(code))
    assert ev.status == status and not is_error(ev.status)


def test_ok_and_plain_http_answers_are_unchanged() -> None:
    assert event_from_entry(grpc_entry("0")).status == 200
    assert event_from_entry(grpc_entry(None)).status == 200  # a REST answer
    assert event_from_entry(grpc_entry(None, status=502)).status == 502
    # an HTTP error stays what it was, whatever grpc-status says
    assert event_from_entry(grpc_entry("0", status=503)).status == 503
    assert event_from_entry(grpc_entry("14", status=0)).status == 0
    # the trailer is the answer's last word: it wins over a header
    e = grpc_entry("13")
    e.response.response_headers[HEADER_GRPC_STATUS] = "0"
    assert event_from_entry(e).status == 500


@pytest.mark.parametrize("code", ["", "abc", "-1", "99", "1234567", " 14x", "١٤"])
def test_an_unreadable_or_unknown_grpc_status_is_a_server_error(code: str) -> None:
    """A gRPC client reads it as UNKNOWN: the backend answered something no client can use."""
    assert event_from_entry(grpc_entry(code)).status == 500


def test_every_grpc_code_has_an_http_status() -> None:
    assert sorted(GRPC_AS_HTTP) == list(range(17))
    assert {c for c, s in GRPC_AS_HTTP.items() if is_error(s)} == {2, 4, 13, 14, 15}


async def test_grpc_failures_of_a_canary_reach_the_error_rate_and_roll_it_back() -> None:
    """Through the receiver and the controller's own windows: before issue 25 every entry was a 200."""
    policy = make_policy(min_samples=20)
    now = [1_000.0]
    sink = InProcessSink()
    await sink.start()
    controller = Controller(policy, InProcessState(), sink, clock=lambda: now[0])
    await controller.start()
    receiver = AccessLogReceiver(sink, TrafficMetrics())
    for second in range(10):
        units = [(f"{second:04d}{i:012d}", "canary" if i % 5 == 0 else "control") for i in range(50)]
        feed(
            receiver,
            [
                # the canary fails half its calls with INTERNAL in a trailer; control answers OK
                grpc_entry(
                    "13" if v == "canary" and i % 2 else "0", rid=u, unit=u, variant=v, cluster=f"cg.tabular.{v}.0"
                )
                for i, (u, v) in enumerate(units)
            ],
        )
        controller.ingest(await sink.read(10_000, 0.01), now[0])
        now[0] += 1
        await controller.tick()
    routes = controller.status()["routes"]["tabular"]["variants"]
    assert routes["control"]["window"]["errors"] == 0
    canary = routes["canary"]["window"]
    assert canary["requests"] == 100 and canary["errors"] == 50
    assert controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK
