"""Routing by the processor's headers: the primary by ``x-cohortgate-cluster``, copies to the mirror slots.

The same route action serves the edge's route table and a mesh gateway's patched route (Istio), so
the slots, the shadow marker and the response headers are spelled once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cohortgate.core.contract import HEADER_CLUSTER, HEADER_ROUTE, HEADER_SHADOW_OF, HEADER_SHADOWS, HEADER_VARIANT
from cohortgate.deploy.envoy.typed import header_value, pb

ROUTE_TIMEOUT = dt.timedelta(seconds=30)
ROUTE_CONFIG_NAME = "cohortgate"


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


def route_config() -> Any:
    """The edge's whole route table: one virtual host, one route, every path."""
    m = pb()
    return m.route.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        validate_clusters=False,  # clusters come and go through CDS; the route names none
        virtual_hosts=[
            m.route.VirtualHost(
                name=ROUTE_CONFIG_NAME,
                domains=["*"],
                routes=[
                    m.route.Route(
                        name="by-cluster-header",
                        match=m.route.RouteMatch(prefix="/"),
                        route=route_action(),
                        response_headers_to_add=response_headers(),
                    )
                ],
            )
        ],
    )
