"""Envoy 1.40's body-size-limit filter message, which envoy-data-plane's generated classes predate.

Written the way envoy-data-plane generates its classes (betterproto2 + pydantic, registered in the
same message pool), so the filter is built, packed and read back like every other message. The
field list is the proto's (``envoy/extensions/filters/http/body_size_limit/v3/body_size_limit.proto``:
one ``UInt64Value max_request_bytes = 1``, which must be > 0).
"""

from __future__ import annotations

import functools
from typing import Any

FILTER_NAME = "envoy.filters.http.body_size_limit"
PACKAGE = "envoy.extensions.filters.http.body_size_limit.v3"


@functools.cache
def message_class() -> Any:
    import betterproto2
    from envoy_data_plane.google import protobuf
    from envoy_data_plane.message_pool import default_message_pool
    from pydantic.dataclasses import dataclass

    @dataclass(eq=False, repr=False, config={"extra": "forbid"})
    class BodySizeLimit(betterproto2.Message):
        """Reject a request whose body passes ``max_request_bytes`` with 413, streaming (no buffering)."""

        max_request_bytes: int | None = betterproto2.field(
            1, betterproto2.TYPE_MESSAGE, unwrap=lambda: protobuf.UInt64Value, optional=True
        )

    default_message_pool.register_message(PACKAGE, "BodySizeLimit", BodySizeLimit)
    return BodySizeLimit
