"""Routing by the processor's headers: the primary by ``x-cohortgate-cluster``, copies to the mirror slots.

The same route action serves the edge's route table and a mesh gateway's patched route (Istio), so
the slots, the shadow marker and the response headers are spelled once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cohortgate.core.contract import HEADER_CLUSTER, HEADER_ROUTE, HEADER_SHADOW_OF, HEADER_SHADOWS, HEADER_VARIANT
from cohortgate.deploy.envoy.typed import header_value, pack, pb

ROUTE_TIMEOUT = dt.timedelta(seconds=30)
ROUTE_CONFIG_NAME = "cohortgate"
BUFFER_FILTER = "envoy.filters.http.buffer"
CONTENT_LENGTH = "content-length"  # HTTP's own header


def route_action() -> Any:
    """Forward to the cluster the processor named; mirror to each slot it filled (a shadow is told so)."""
    m = pb()
    mirrors = [
        m.route.RouteActionRequestMirrorPolicy(
            cluster_header=name,
            # Tell the shadow it is one, and of which variant; its answer never reaches the client.
            request_headers_mutations=[
                m.mutation.HeaderMutation(append=header_value(HEADER_SHADOW_OF, f"%REQ({HEADER_VARIANT})%"))
            ],
        )
        for name in HEADER_SHADOWS
    ]
    return m.route.RouteAction(
        cluster_header=HEADER_CLUSTER,
        timeout=ROUTE_TIMEOUT,
        request_mirror_policies=mirrors,
        # A cluster the processor names but Envoy lacks is a configuration race, not a client error.
        cluster_not_found_response_code=m.route.RouteActionClusterNotFoundResponseCode.SERVICE_UNAVAILABLE,
    )


def response_headers() -> list[Any]:
    """Which variant and route answered (x-request-id is set on every response by the HCM instead)."""
    return [
        header_value(HEADER_VARIANT, f"%REQ({HEADER_VARIANT})%"),
        header_value(HEADER_ROUTE, f"%REQ({HEADER_ROUTE})%"),
    ]


def route_config(*, buffer_unsized: bool = False) -> Any:
    """The edge's whole route table: one virtual host, every path routed by the processor's headers.

    With ``buffer_unsized``, a request without ``content-length`` (HTTP/1.1 chunked, HTTP/2 DATA
    frames) takes a second route on which the buffer filter holds its body until it is complete or
    over the limit: an oversized one is refused before any backend or shadow sees even its headers.
    Requests with a ``content-length`` (the fast path) are never buffered.
    """
    m = pb()
    routes = [
        m.route.Route(
            name="by-cluster-header",
            match=m.route.RouteMatch(prefix="/"),
            route=route_action(),
            response_headers_to_add=response_headers(),
        )
    ]
    if buffer_unsized:
        sized = m.route.RouteMatch(prefix="/", headers=[m.route.HeaderMatcher(name=CONTENT_LENGTH, present_match=True)])
        unbuffered = {BUFFER_FILTER: pack(m.buffer.BufferPerRoute(disabled=True))}
        routes = [
            m.route.Route(
                name="by-cluster-header",
                match=sized,
                route=route_action(),
                response_headers_to_add=response_headers(),
                typed_per_filter_config=unbuffered,
            ),
            m.route.Route(
                name="by-cluster-header-unsized",
                match=m.route.RouteMatch(prefix="/"),
                route=route_action(),
                response_headers_to_add=response_headers(),
            ),
        ]
    return m.route.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        validate_clusters=False,  # clusters come and go through CDS; the route names none
        virtual_hosts=[m.route.VirtualHost(name=ROUTE_CONFIG_NAME, domains=["*"], routes=routes)],
    )
