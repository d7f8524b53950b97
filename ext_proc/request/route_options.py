"""Per-route settings that Envoy sends with each ext_proc stream.

Operators tune the sidecar per route from Envoy's own config: each
``ExtProcPerRoute.overrides.grpc_initial_metadata`` entry arrives as gRPC
metadata on that route's streams. Keys we read start with ``x-extproc-otel-``:

===============================  ==============================================
``x-extproc-otel-http-route``    route template for ``http.route`` and the span name
``x-extproc-otel-tracing``       ``off`` (or ``false``/``0``): no span for this route
``x-extproc-otel-attr-<name>``   static span attribute ``<name>`` (e.g. ``team``)
``x-extproc-otel-extract``       comma list of formats to read (as ``propagation.extract``)
``x-extproc-otel-inject``        comma list of formats to write (as ``propagation.inject``)
``x-extproc-otel-clear``         comma list of extra headers to remove upstream
``x-extproc-otel-sample-ratio``  head-sampling ratio for this route, 0..1
``x-extproc-otel-upstream-span`` ``on``/``off``: a CLIENT span around the upstream call
``x-extproc-otel-phase-spans``   ``on``/``off``: the filters/upstream/response phase spans
``x-extproc-otel-prefilter``     set by ``envoy-config`` on the filter's grpc_service (not
                                 per route): the digest of the prefilter Envoy runs
``x-extproc-otel-<key>``         any other key: route metadata, e.g. ``tenant`` for
                                 ``tenants.route_metadata_key: tenant``
===============================  ==============================================

A bad value is ignored (logged at debug, rate-limited by the cache: each
distinct metadata set is parsed once).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from loguru import logger
from pydantic import ValidationError

from ext_proc.config.propagation import PropagationSettings
from ext_proc.request.seams import Bounded

PREFIX: Final = "x-extproc-otel-"
HTTP_ROUTE: Final = PREFIX + "http-route"
TRACING: Final = PREFIX + "tracing"
ATTR_PREFIX: Final = PREFIX + "attr-"
EXTRACT: Final = PREFIX + "extract"
INJECT: Final = PREFIX + "inject"
CLEAR: Final = PREFIX + "clear"
SAMPLE_RATIO: Final = PREFIX + "sample-ratio"
UPSTREAM_SPAN: Final = PREFIX + "upstream-span"
PHASE_SPANS: Final = PREFIX + "phase-spans"
PREFILTER: Final = PREFIX + "prefilter"  # on the grpc_service, from envoy-config

_MAX_VALUE: Final = 256
_MAX_ATTRIBUTES: Final = 16
_OFF: Final = frozenset({"off", "false", "0", "no"})
_PROPAGATION_KEYS: Final = {EXTRACT: "extract", INJECT: "inject", CLEAR: "clear"}


@dataclass(frozen=True, slots=True)
class RouteOptions:
    http_route: str | None = None
    tracing: bool = True
    attributes: tuple[tuple[str, str], ...] = ()
    propagation: PropagationSettings | None = None  # None: the sidecar's own settings
    sample_ratio: float | None = None
    upstream_span: bool | None = None  # None: the sidecar's stream.upstream_span
    items: tuple[tuple[str, str], ...] = ()  # every x-extproc-otel-* entry, as sent
    prefilter_digest: str | None = None  # the plan Envoy runs; None: it asks about all
    phase_spans: bool | None = None  # None: the sidecar's stream.phase_spans

    @property
    def metadata_map(self) -> dict[str, str]:
        """Our entries without the prefix (``x-extproc-otel-tenant`` -> ``tenant``), for
        settings that name a route-metadata key (tenants.route_metadata_key)."""
        return {key[len(PREFIX):]: value for key, value in self.items}


DEFAULT: Final = RouteOptions()

Metadata = Iterable[tuple[str, str | bytes]] | None


def _ours(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    if not metadata:
        return ()
    return tuple((k, v) for k, v in metadata
                 if k.startswith(PREFIX) and isinstance(v, str) and len(v) <= _MAX_VALUE)


def _ratio(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def parse_route_options(
    items: tuple[tuple[str, str], ...], base: PropagationSettings | None = None
) -> RouteOptions:
    """Our keys -> `RouteOptions`; `base` is what propagation overrides start from."""
    http_route: str | None = None
    tracing = True
    attributes: list[tuple[str, str]] = []
    overrides: dict[str, str] = {}
    ratio: float | None = None
    upstream: bool | None = None
    prefilter: str | None = None
    phases: bool | None = None
    for key, value in items:
        if key == HTTP_ROUTE and value:
            http_route = value
        elif key == TRACING:
            tracing = value.strip().lower() not in _OFF
        elif key.startswith(ATTR_PREFIX) and len(key) > len(ATTR_PREFIX):
            if len(attributes) < _MAX_ATTRIBUTES:
                attributes.append((key[len(ATTR_PREFIX):], value))
        elif key in _PROPAGATION_KEYS:
            overrides[_PROPAGATION_KEYS[key]] = value
        elif key == PREFILTER:
            prefilter = value
        elif key == UPSTREAM_SPAN:
            upstream = value.strip().lower() not in _OFF
        elif key == PHASE_SPANS:
            phases = value.strip().lower() not in _OFF
        elif key == SAMPLE_RATIO:
            ratio = _ratio(value)
            if ratio is None:
                logger.debug("route option ignored", key=key, reason="not a ratio in 0..1")
    propagation = None
    if overrides:
        base = base or PropagationSettings()
        try:
            propagation = base.model_validate({**base.model_dump(), **overrides})
        except ValidationError as exc:
            logger.debug("route propagation override ignored", reason=str(exc.errors()[0]["msg"]))
    return RouteOptions(http_route, tracing, tuple(attributes), propagation, ratio, upstream,
                        items, prefilter, phases)


class RouteOptionsCache:
    """Parses each distinct set of our metadata once (routes have few, fixed sets)."""

    MAX_ENTRIES: Final = 1024

    def __init__(self, base: PropagationSettings) -> None:
        self._base = base
        self._cache: OrderedDict[tuple[tuple[str, str], ...], RouteOptions] = OrderedDict()
        self._known: dict[tuple[Any, ...], RouteOptions] = {}  # whole metadata -> options

    def bounded(self) -> tuple[Bounded, ...]:
        return (Bounded("route_options", self._cache.__len__, self.MAX_ENTRIES),
                Bounded("route_options.metadata", self._known.__len__, self.MAX_ENTRIES))

    def get(self, metadata: Metadata) -> RouteOptions:
        # A route's streams all carry the same metadata: known metadata skips the filter.
        try:
            known = self._known.get(metadata) if isinstance(metadata, tuple) else None
        except TypeError:  # an unhashable value: filter it as always
            known, metadata = None, None if not metadata else list(metadata)
        if known is not None:
            return known
        items = _ours(metadata)
        options = DEFAULT if not items else self._cache.get(items)
        if options is None:
            options = self._cache[items] = parse_route_options(items, self._base)
            if len(self._cache) > self.MAX_ENTRIES:
                self._cache.popitem(last=False)
        if isinstance(metadata, tuple):
            if len(self._known) >= self.MAX_ENTRIES:
                self._known.clear()
            self._known[metadata] = options
        return options


def route_options(metadata: Metadata) -> RouteOptions:
    """Uncached parse with default propagation settings (tests, tools)."""
    items = _ours(metadata)
    return parse_route_options(items) if items else DEFAULT
