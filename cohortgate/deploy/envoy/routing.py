"""Routing by the processor's headers: the primary by ``x-cohortgate-cluster``, copies to the mirror slots.

The exposure token the processor mints (``x-cohortgate-exposure``, a request header) is copied to the
response with ``%REQ(...)%``: no response-phase round trip to the processor; so is a bandit route's
sticky assignment note (``x-cohortgate-assignment``, core/sticky.py). A request the processor
marks ``x-cohortgate-outcomes`` (a route of kind ``outcomes``) takes its own route, which rewrites
the path to the controller API's ``/outcomes``; only the processor can set the mark (it strips every
client-sent ``x-cohortgate-*`` header).

The same route action serves the edge's route table and a mesh gateway's patched route (Istio), so
the slots, the shadow marker and the response headers are spelled once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cohortgate.core.contract import (
    HEADER_ASSIGNMENT,
    HEADER_CLUSTER,
    HEADER_EXPOSURE,
    HEADER_OUTCOMES,
    HEADER_ROUTE,
    HEADER_SHADOW_OF,
    HEADER_SHADOWS,
    HEADER_VARIANT,
    OUTCOMES_PATH,
)
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
    """Which variant and route answered, and the exposure token (x-request-id is set on every response by
    the HCM instead). A header the processor did not set renders empty and is left out."""
    return [
        header_value(HEADER_VARIANT, f"%REQ({HEADER_VARIANT})%"),
        header_value(HEADER_ROUTE, f"%REQ({HEADER_ROUTE})%"),
        header_value(HEADER_EXPOSURE, f"%REQ({HEADER_EXPOSURE})%"),
        header_value(HEADER_ASSIGNMENT, f"%REQ({HEADER_ASSIGNMENT})%"),  # bandit routes' sticky note
    ]


def outcomes_route() -> Any:
    """Outcome reports: the processor's mark sends them to the controller's ``/outcomes`` (never mirrored)."""
    m = pb()
    return m.route.Route(
        name="outcomes",
        match=m.route.RouteMatch(prefix="/", headers=[m.route.HeaderMatcher(name=HEADER_OUTCOMES, present_match=True)]),
        route=m.route.RouteAction(
            cluster_header=HEADER_CLUSTER,
            timeout=ROUTE_TIMEOUT,
            regex_rewrite=m.matcher.RegexMatchAndSubstitute(
                pattern=m.matcher.RegexMatcher(regex="^.*$"), substitution=OUTCOMES_PATH
            ),
            cluster_not_found_response_code=m.route.RouteActionClusterNotFoundResponseCode.SERVICE_UNAVAILABLE,
        ),
    )


def route_config(*, buffer_unsized: bool = False) -> Any:
    """The edge's whole route table: one virtual host, every path routed by the processor's headers.

    With ``buffer_unsized``, a request without ``content-length`` (HTTP/1.1 chunked, HTTP/2 DATA
    frames) takes a second route on which the buffer filter holds its body until it is complete or
    over the limit: an oversized one is refused before any backend or shadow sees even its headers.
    Requests with a ``content-length`` (the fast path) are never buffered.
    """
    m = pb()
    routes = [
        outcomes_route(),
        m.route.Route(
            name="by-cluster-header",
            match=m.route.RouteMatch(prefix="/"),
            route=route_action(),
            response_headers_to_add=response_headers(),
        ),
    ]
    if buffer_unsized:
        sized = m.route.RouteMatch(prefix="/", headers=[m.route.HeaderMatcher(name=CONTENT_LENGTH, present_match=True)])
        unbuffered = {BUFFER_FILTER: pack(m.buffer.BufferPerRoute(disabled=True))}
        routes = [
            outcomes_route(),
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
