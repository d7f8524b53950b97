"""Per-route settings that Envoy sends with each ext_proc stream.

Operators tune the sidecar per route from Envoy's own config: an
``ExtProcPerRoute.overrides.grpc_initial_metadata`` entry arrives as gRPC
metadata on the stream. Keys we read start with ``x-extproc-otel-``:

``x-extproc-otel-http-route``  the route template for ``http.route`` and the span name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "x-extproc-otel-"
HTTP_ROUTE: Final = PREFIX + "http-route"

_MAX_VALUE: Final = 256


@dataclass(frozen=True, slots=True)
class RouteOptions:
    http_route: str | None = None


DEFAULT: Final = RouteOptions()


def route_options(metadata: Iterable[tuple[str, str | bytes]] | None) -> RouteOptions:
    """Our keys from the stream's invocation metadata; anything else is ignored."""
    if not metadata:
        return DEFAULT
    http_route: str | None = None
    for key, value in metadata:
        if not key.startswith(PREFIX) or not isinstance(value, str):
            continue
        if key == HTTP_ROUTE and 0 < len(value) <= _MAX_VALUE:
            http_route = value
    if http_route is None:
        return DEFAULT
    return RouteOptions(http_route=http_route)
