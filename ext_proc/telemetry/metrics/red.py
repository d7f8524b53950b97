"""RED metrics (a `StreamObserver`) and the sidecar's own stream/phase metrics.

Instruments are created once. Recording happens after Envoy has its answers:
`RedMetrics.stream_finished` runs when the stream closes, `PhaseTimer.observe`
after the phase's answer is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final

from loguru import logger
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from ext_proc.config.telemetry import MetricsSettings
from ext_proc.request.seams import Bounded, ExchangeRecord
from ext_proc.telemetry import semconv as sc
from ext_proc.telemetry.metrics.tables import HistogramTable

REQUEST_DURATION: Final = "http.server.request.duration"
ACTIVE_REQUESTS: Final = "http.server.active_requests"
RESPONSE_BODY_SIZE: Final = "http.server.response.body.size"
GATEWAY_ADDED: Final = "extproc.gateway.added_duration"
PHASE_DURATION: Final = "extproc.phase.duration"
ACTIVE_STREAMS: Final = "extproc.stream.active"
REJECTED_HEADERS: Final = "extproc.propagation.rejected"
SHED_STREAMS: Final = "extproc.stream.shed"
PROTOCOL_ERRORS: Final = "extproc.grpc.protocol_errors"
PHASE: Final = "extproc.phase"
FORMAT: Final = "extproc.propagation.format"
TENANT_ID: Final = "tenant.id"
STATE_SIZE: Final = "extproc.state.size"
STATE_CAPACITY: Final = "extproc.state.capacity"
STATE: Final = "extproc.state"

# The stable HTTP semantic conventions' advice for http.server.request.duration.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
# The time the gateway adds: sub-millisecond when healthy, seconds behind a slow client.
ADDED_BUCKETS: Final = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# ext_proc phases take micro- to milliseconds.
PHASE_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.2,
)


class RedMetrics:
    """Rate, errors, duration per method/route/status, with bounded attribute values."""

    def __init__(self, meter: Meter, settings: MetricsSettings,
                 exemplar_filter: str = "trace_based") -> None:
        self._settings = settings
        # Aggregated in plain Python (tables.py): the SDK's record costs ~10 us a call.
        exemplars = exemplar_filter if settings.exemplars else "always_off"
        limit = settings.cardinality_limit
        self._duration = HistogramTable(
            REQUEST_DURATION, "s", "Duration of HTTP server requests.", DURATION_BUCKETS,
            limit=limit, exemplars=exemplars)
        # Known from Envoy's access log (envoy.access_loggers.http_grpc to the sidecar).
        self._body = HistogramTable(
            RESPONSE_BODY_SIZE, "By", "Size of HTTP server response bodies.",
            limit=limit, exemplars=exemplars)
        # The SLI "how much latency does the gateway add": duration minus the upstream
        # phase, for requests whose upstream phase Envoy logged.
        self._added = HistogramTable(
            GATEWAY_ADDED, "s",
            "Time the gateway added to HTTP server requests that reached an upstream: "
            "the request's duration minus its upstream phase (first byte sent upstream to "
            "last byte received), from Envoy's access log.", ADDED_BUCKETS,
            limit=limit, exemplars=exemplars)
        self.tables = (self._duration, self._body, self._added)
        # Counted in plain ints and observed at collection time: two SDK adds per
        # request cost ~30 us; this costs well under one.
        self._active: dict[str, int] = {}
        self._active_attrs: dict[str, dict[str, str]] = {}
        meter.create_observable_up_down_counter(
            ACTIVE_REQUESTS, [self._observe_active], unit="{request}",
            description="Number of active HTTP server requests.",
        )

    def _observe_active(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, self._active_attrs[method])
                for method, count in list(self._active.items())]

    def route(self, route: str | None) -> str:
        """The route template, or the placeholder when unknown, absent or too long."""
        if not route or len(route) > self._settings.max_route_length:
            return self._settings.route_placeholder
        return route

    @staticmethod
    def method(method: str | None) -> str:
        return method if method in sc.KNOWN_METHODS else sc.OTHER_METHOD

    def key(self, record: ExchangeRecord) -> tuple[Any, ...]:
        """The attribute values, normalised: one key per distinct attribute set."""
        status = record.status if record.status and 100 <= record.status <= 599 else None
        tenant = record.tenant if self._settings.tenant_attribute else None
        return (self.method(record.method), self.route(record.route), status,
                record.error_type or None, tenant or None)

    @staticmethod
    def attributes_of(key: tuple[Any, ...]) -> dict[str, Any]:
        method, route, status, error_type, tenant = key
        attrs: dict[str, Any] = {sc.HTTP_REQUEST_METHOD: method, sc.HTTP_ROUTE: route}
        if status is not None:
            attrs[sc.HTTP_RESPONSE_STATUS_CODE] = status
        if error_type is not None:
            attrs[sc.ERROR_TYPE] = error_type
        if tenant is not None:
            attrs[TENANT_ID] = tenant
        return attrs

    def attributes(self, record: ExchangeRecord) -> dict[str, Any]:
        return self.attributes_of(self.key(record))

    def stream_started(self, method: str | None, route: str | None) -> None:
        name = self.method(method)
        if name not in self._active_attrs:
            self._active_attrs[name] = {sc.HTTP_REQUEST_METHOD: name}
        self._active[name] = self._active.get(name, 0) + 1

    def stream_finished(self, record: ExchangeRecord) -> None:
        if record.started and record.method is not None:  # stream_started ran
            name = self.method(record.method)
            self._active[name] = self._active.get(name, 0) - 1
        key = self.key(record)

        def attributes() -> dict[str, Any]:
            return self.attributes_of(key)
        # no span (Envoy did not ask us): an invalid context, never an exemplar
        context = record.span_context
        self._duration.record(key, max(record.duration_s, 0.0), attributes, context)
        if record.response_body_size is not None:
            self._body.record(key, record.response_body_size, attributes, context)
        if record.upstream_s is not None:
            self._added.record(key, max(record.duration_s - record.upstream_s, 0.0),
                               attributes, context)

    def streams_finished(self, records: Sequence[ExchangeRecord]) -> None:
        """`stream_finished` for a batch (the un-asked requests of one access-log
        message): one `record_many` per table and attribute set, the sets taken in the
        order each first gets a value in that table, as one call each would create their
        points (which matters at the cardinality limit). A batch with an asked exchange
        in it (active count, exemplar) goes one record at a time."""
        if any(r.started or r.span_context.is_valid for r in records):
            for record in records:
                self.stream_finished(record)
            return
        durations: dict[tuple[Any, ...], list[float]] = {}
        bodies: dict[tuple[Any, ...], list[float]] = {}
        added: dict[tuple[Any, ...], list[float]] = {}
        for record in records:
            key = self.key(record)
            durations.setdefault(key, []).append(max(record.duration_s, 0.0))
            if record.response_body_size is not None:
                bodies.setdefault(key, []).append(record.response_body_size)
            if record.upstream_s is not None:
                added.setdefault(key, []).append(max(record.duration_s - record.upstream_s, 0.0))
        for table, groups in ((self._duration, durations), (self._body, bodies),
                              (self._added, added)):
            for key, values in groups.items():
                try:  # one failing set must not cost the others
                    table.record_many(key, values, partial(self.attributes_of, key))
                except Exception:
                    logger.opt(exception=True).error("metrics of a batch failed",
                                                     instrument=table.name)


class RuntimeMetrics:
    """Per-phase processing time, active streams and rejected trace-context headers."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self._phase = HistogramTable(
            PHASE_DURATION, "s",
            "Time the sidecar spent answering one ext_proc message, by phase.",
            PHASE_BUCKETS, exemplars="always_off")  # no span to point at
        self.tables = (self._phase,)

    def phase_done(self, phase: str | None, elapsed_ns: int) -> None:
        """Record one answered message (call after the answer is written)."""
        name = phase or "unknown"
        self._phase.record(name, elapsed_ns / 1e9, lambda: {PHASE: name})

    def observe_streams(self, active: Callable[[], int]) -> None:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(active())]
        self._meter.create_observable_up_down_counter(
            ACTIVE_STREAMS, [callback], unit="{stream}",
            description="ext_proc streams open right now.")

    def observe_server(self, shed: Callable[[], int],
                       protocol_errors: Callable[[], int]) -> None:
        """The h2 engine's counters: load shed, bad HTTP/2 input."""
        def shed_callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(shed())]

        def errors_callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(protocol_errors())]
        self._meter.create_observable_counter(
            SHED_STREAMS, [shed_callback], unit="{stream}",
            description="ext_proc streams refused at once (UNAVAILABLE) because too many "
                        "were waiting to be served (server.max_backlog): untraced requests.")
        self._meter.create_observable_counter(
            PROTOCOL_ERRORS, [errors_callback], unit="{error}",
            description="Connections or streams the gRPC server ended for bad HTTP/2 input "
                        "(logged at debug, at most every 10 s).")

    def observe_state(self, bounded: Iterable[Bounded]) -> None:
        """What each cache and waiting set holds, and its bound (#21: memory that
        stays flat under any load shows here as sizes at their capacities)."""
        found = tuple(bounded)

        def sizes(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(b.size(), {STATE: b.name}) for b in found]

        def capacities(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(b.capacity, {STATE: b.name}) for b in found]
        self._meter.create_observable_up_down_counter(
            STATE_SIZE, [sizes], unit="{entry}",
            description="Entries a cache or waiting set of the sidecar holds now.")
        self._meter.create_observable_up_down_counter(
            STATE_CAPACITY, [capacities], unit="{entry}",
            description="The most entries a cache or waiting set of the sidecar holds.")

    def observe_rejections(self, snapshot: Callable[[], dict[str, int]]) -> None:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {FORMAT: fmt}) for fmt, n in snapshot().items()]
        self._meter.create_observable_counter(
            REJECTED_HEADERS, [callback], unit="{header}",
            description="Incoming trace-context headers rejected as invalid, by format.")
