"""Gateway phase spans: where a request's time went, from Envoy's own clock (#19).

Envoy's access-log entry (`FinalFacts.timings`) says when the request started and,
as offsets from that start, when the first byte went upstream, when the first and
last bytes came back, and when the first and last bytes went to the client. With
``stream.phase_spans`` on, the SERVER span gets one child per phase that happened::

    SERVER  |<---------------------------------------------------------------->|
    filters |<---------->|                                            INTERNAL
    upstream             |<-------------*--------------------->|     CLIENT
                              first byte received (event)
    response                            |<-------------------------------->| INTERNAL

The upstream phase is the upstream CLIENT span: its id is allocated when the
request headers are answered (`PhaseSpans.allocate`, the only work on the hot
path) and goes upstream in ``traceparent``; the span is recorded when the entry
arrives (`PhaseSpans.record`). docs/tracing.md has the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from opentelemetry.sdk.trace import Event
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ext_proc.exchange.outcome import GRPC_CODE_NAMES, grpc_code, outcome
from ext_proc.exchange.request_info import RequestInfo
from ext_proc.request.envoy_attrs import FLAG_ERROR_TYPES
from ext_proc.telemetry import semconv as sc
from ext_proc.telemetry.lean_span import LeanTracer

if TYPE_CHECKING:
    from ext_proc.exchange.als import FinalFacts

FILTERS: Final = "filters"
UPSTREAM: Final = "upstream"
RESPONSE: Final = "response"
FIRST_BYTE_EVENT: Final = "first_byte_received"  # on the upstream span
_UNSET: Final = Status(StatusCode.UNSET)
VIA_UPSTREAM: Final = "via_upstream"  # response_code_details: the upstream's own status


def upstream_seconds(final: FinalFacts | None) -> float | None:
    """ExchangeRecord.upstream_s: the upstream phase's duration, when Envoy logged it."""
    return final.timings.upstream_s if final is not None and final.timings else None


class Connected(Protocol):
    @property
    def connected(self) -> bool: ...


class PhaseSpans:
    """Allocates the upstream phase's span id and records the phases of an exchange.

    `enabled` is ``stream.phase_spans`` (a route's ``x-extproc-otel-phase-spans``
    overrides it); `source` says whether Envoy sends its access log (no entry: no
    timings, so no phases and no id to promise upstream)."""

    def __init__(self, tracer: LeanTracer, enabled: bool, source: Connected) -> None:
        self._tracer = tracer
        self.enabled = enabled
        self._source = source

    def allocate(self, server: Span, route: bool | None) -> Span | None:
        """The upstream span to put in ``traceparent`` (not recording: only its id), or
        None when phases are off here, the span is not sampled or no entry will come."""
        if not (route if route is not None else self.enabled):
            return None
        context = server.get_span_context()
        if not (context.trace_flags.sampled and self._source.connected):
            return None
        return NonRecordingSpan(SpanContext(
            context.trace_id, self._tracer.new_span_id(), is_remote=False,
            trace_flags=context.trace_flags, trace_state=context.trace_state))

    def record(self, server: Span, upstream: Span, facts: RequestInfo | None,
               bounds: tuple[int, int], final: FinalFacts) -> None:
        """Record the phases `final` shows, within the SERVER span's `bounds`; `upstream`
        is the span `allocate` gave (its id went upstream). Envoy times only the last
        attempt of a retried request: the upstream span covers that attempt, and there
        is no filters span (where the filters ended, before the first attempt, is not
        logged)."""
        times = final.timings
        if times is None or facts is None:
            return
        name, is_grpc = facts.span_name, facts.is_grpc
        low, high = bounds
        base = times.start_ns

        def at(offset: int) -> int:
            return min(max(base + offset, low), high)

        parent = server.get_span_context()
        sent, first_out = times.first_upstream_tx, times.first_downstream_tx
        if sent is not None:
            if (final.upstream_attempts or 0) <= 1:  # else `sent` is the last attempt's
                self._span(FILTERS, parent, SpanKind.INTERNAL, low, at(sent))
            self._upstream(parent, upstream.get_span_context().span_id, name, at, high,
                           final, is_grpc)
        if first_out is not None:
            last_out = times.last_downstream_tx
            self._span(RESPONSE, parent, SpanKind.INTERNAL, at(first_out),
                       at(last_out) if last_out is not None else high,
                       None if last_out is not None else sc.ERROR_RESPONSE_INCOMPLETE)

    def _span(self, phase: str, parent: SpanContext, kind: SpanKind, start: int, end: int,
              error_type: str | None = None) -> None:
        if error_type is None:
            self._tracer.record_child(phase, parent, kind, start, end, {sc.ENVOY_PHASE: phase})
        else:
            self._tracer.record_child(phase, parent, kind, start, end,
                                      {sc.ENVOY_PHASE: phase, sc.ERROR_TYPE: error_type},
                                      Status(StatusCode.ERROR, error_type))

    def _upstream(self, parent: SpanContext, span_id: int, name: str, at: _At, high: int,
                  final: FinalFacts, is_grpc: bool) -> None:
        """The upstream CLIENT span, with the id sent upstream. It ends with the last
        byte received; without one the upstream failed (or was cut off): ERROR."""
        times = final.timings
        assert times is not None and times.first_upstream_tx is not None
        start = at(times.first_upstream_tx)
        attrs: dict[str, AttributeValue] = {sc.ENVOY_PHASE: UPSTREAM}
        host, port = split_address(final.upstream_address)
        if host:
            attrs[sc.SERVER_ADDRESS] = host
            if port is not None:
                attrs[sc.SERVER_PORT] = port
        attempts = final.upstream_attempts or 0
        if attempts > 1:
            attrs[sc.HTTP_REQUEST_RESEND_COUNT] = attempts - 1
        events = (Event(FIRST_BYTE_EVENT, {}, at(times.first_upstream_rx)),) \
            if times.first_upstream_rx is not None else ()
        if final.response_code and final.response_code_details == VIA_UPSTREAM:
            result = outcome(final.response_code, final.grpc_status, is_grpc, None)
            attrs.update(result.attributes)
            error_type = result.error_type or client_error(final.response_code,
                                                           final.grpc_status, is_grpc)
            if error_type is not None:
                attrs[sc.ERROR_TYPE] = error_type
        else:
            error_type = None
        end = times.last_upstream_rx
        if end is None:  # started, never finished: reset, timeout, or the client left
            error_type = next((FLAG_ERROR_TYPES[f] for f in final.response_flags
                               if f in FLAG_ERROR_TYPES), None) or sc.ERROR_RESPONSE_INCOMPLETE
            attrs[sc.ERROR_TYPE] = error_type
        if end is not None:
            stop = at(end)
        elif times.first_upstream_rx is None and times.first_downstream_tx is not None:
            stop = at(times.first_downstream_tx)  # Envoy's local reply to the failure
        else:
            stop = high
        self._tracer.record_child(
            name, parent, SpanKind.CLIENT, start, stop, attrs,
            Status(StatusCode.ERROR, error_type) if error_type is not None else _UNSET,
            span_id=span_id, events=events)


class _At(Protocol):
    def __call__(self, offset: int) -> int: ...


def client_error(status: int, grpc_status: str | None, is_grpc: bool) -> str | None:
    """What a CLIENT span counts as an error beyond a SERVER span's: any gRPC status but
    OK, and HTTP 4xx (the HTTP and RPC conventions)."""
    if is_grpc:
        code = grpc_code(grpc_status)
        if code:
            return GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else str(code)
        return None
    return str(status) if 400 <= status < 500 else None


def split_address(address: str | None) -> tuple[str | None, int | None]:
    """``host:port`` (``[v6]:port``) -> (host, port); (None, None) when absent."""
    if not address:
        return None, None
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or address), (int(port) if port.isdigit() else None)
