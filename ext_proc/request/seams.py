"""The interfaces the stream depends on, so features plug in without touching it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from opentelemetry.context import Context
from opentelemetry.trace import SpanContext

from ext_proc.config.propagation import PropagationSettings
from ext_proc.request.headers import Carrier


class Propagator(Protocol):
    """What the stream needs from `ext_proc.policy.propagation.GatewayPropagator`."""

    def extract(self, carrier: Carrier) -> Context: ...
    def removals(self, carrier: Carrier, out: dict[str, str]) -> tuple[str, ...]: ...
    def inject(self, context: Context, out: dict[str, str]) -> None: ...
    def response_headers(self, span_context: SpanContext) -> dict[str, str]: ...

    @property
    def wants_response(self) -> bool:
        """Whether `response_headers` can return anything (needs the response phase)."""
        ...


class PropagatorSource(Protocol):
    """Propagators for per-route settings (`ext_proc.policy.propagation.PropagatorCache`)."""

    def get(self, settings: PropagationSettings) -> Propagator: ...


@dataclass(slots=True)  # not frozen: a frozen one costs ~1 µs more to build, per request
class ExchangeRecord:
    """One finished exchange, as observers (metrics, ...) see it (read it, never change it)."""

    method: str | None
    route: str | None
    status: int | None  # None: the stream ended before any response
    error_type: str | None
    duration_s: float
    span_context: SpanContext
    grpc_status: str | None = None
    tenant: str | None = None
    started: bool = True  # False: no request_headers were seen (stream_started not called)
    path: str | None = None  # url.path, never the query
    request_id: str | None = None
    response_body_size: int | None = None  # bytes sent downstream (from Envoy's access log)
    route_name: str | None = None  # Envoy's route name (from its access log), when known
    # the upstream phase (first byte sent upstream to last byte received), from Envoy's
    # access log, whether or not phase spans are on; None: no upstream call completed
    upstream_s: float | None = None


class StreamObserver(Protocol):
    """Told about every exchange, after Envoy has its answers (never on the hot path).

    An observer may also have ``streams_finished(records)``: the requests Envoy did not
    ask about arrive a batch at a time (one access-log message), and such an observer
    gets the batch at once instead of one `stream_finished` call per record."""

    def stream_started(self, method: str | None, route: str | None) -> None: ...
    def stream_finished(self, record: ExchangeRecord) -> None: ...


class Bounded(NamedTuple):
    """A structure the sidecar keeps between messages (a cache, or a set of requests
    waiting for something): what it holds now, and the most it ever holds. Observed as
    ``extproc.state.size`` and ``extproc.state.capacity`` (attribute ``extproc.state``)."""

    name: str
    size: Callable[[], int]
    capacity: int
