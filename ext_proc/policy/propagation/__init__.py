"""Trace-context propagation at the gateway: every format a gateway meets, transcoded exactly.

`GatewayPropagator.extract` reads the incoming headers in the configured precedence
order (the first format holding a valid context wins) plus W3C baggage and Jaeger
``uberctx-*`` baggage; `inject` writes the configured formats for the upstream
request from the gateway span's context; `remove`/`removals` name the incoming
headers the upstream must not see (stale contexts of other formats);
`response_headers` returns the trace id to the client when enabled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from loguru import logger
from opentelemetry import trace
from opentelemetry.context import Context, create_key, get_value, set_value
from opentelemetry.trace import NonRecordingSpan, SpanContext

from ext_proc.config.propagation import PropagationSettings
from ext_proc.policy.propagation import baggage as _baggage
from ext_proc.policy.propagation._base import Extracted, TraceFormat, trace_hex
from ext_proc.policy.propagation.b3 import B3MultiFormat, B3SingleFormat
from ext_proc.policy.propagation.grpc_trace_bin import GrpcTraceBinFormat
from ext_proc.policy.propagation.jaeger import JaegerFormat
from ext_proc.policy.propagation.rejections import Rejections
from ext_proc.policy.propagation.w3c import SpecTraceState, TraceContextFormat, traceparent_value
from ext_proc.request.seams import Bounded

__all__ = [
    "FORMATS",
    "GatewayPropagator",
    "PropagatorCache",
    "Rejections",
    "SpecTraceState",
    "baggage_members",
    "build_propagator",
    "sampling_decision",
]

FORMATS: Final[Mapping[str, TraceFormat]] = MappingProxyType({
    fmt.NAME: fmt
    for fmt in (
        TraceContextFormat(), GrpcTraceBinFormat(), B3SingleFormat(), B3MultiFormat(),
        JaegerFormat(),
    )
})
BAGGAGE: Final = _baggage.NAME

_BAGGAGE_KEY: Final = create_key("extproc-baggage-members")
_DECISION_KEY: Final = create_key("extproc-sampling-decision")


def baggage_members(context: Context) -> tuple[str, ...]:
    """The baggage members (raw W3C list-member text) extracted into `context`."""
    members = get_value(_BAGGAGE_KEY, context)
    return members if isinstance(members, tuple) else ()


def sampling_decision(context: Context) -> bool | None:
    """A sampling decision that arrived without trace ids (``b3: 0``, ``X-B3-Sampled: 1``)."""
    decision = get_value(_DECISION_KEY, context)
    return decision if isinstance(decision, bool) else None


def _fields(name: str) -> frozenset[str]:
    return FORMATS[name].FIELDS if name in FORMATS else frozenset({_baggage.HEADER_KEY})


def _writes(name: str) -> frozenset[str]:
    return FORMATS[name].WRITES if name in FORMATS else frozenset({_baggage.HEADER_KEY})


class GatewayPropagator:
    """Extract, inject and response headers for one `PropagationSettings`. Never raises on input."""

    TRACERESPONSE: Final = "traceresponse"
    SERVER_TIMING: Final = "server-timing"

    def __init__(self, settings: PropagationSettings, rejections: Rejections) -> None:
        self._rejections = rejections
        self._extract = tuple(FORMATS[name] for name in settings.extract if name in FORMATS)
        self._inject = tuple(FORMATS[name] for name in settings.inject if name in FORMATS)
        self._read_baggage = BAGGAGE in settings.extract
        self._read_uberctx = JaegerFormat.NAME in settings.extract
        self._write_baggage = BAGGAGE in settings.inject
        self._write_uberctx = JaegerFormat.NAME in settings.inject
        self._baggage = _baggage.Baggage(settings.baggage_max_members, settings.baggage_max_bytes)
        self._response = settings.response
        self._response_header = settings.response_header
        # response headers to set: the exchange needs Envoy's response phase
        self.wants_response = bool(settings.response) or settings.response_header is not None

        extracted, injected = set(settings.extract), set(settings.inject)
        written = frozenset().union(*(_writes(name) for name in injected))
        stale = set(settings.clear)
        for name in extracted - injected:
            stale |= _fields(name)
        for name in injected:
            stale |= _fields(name) - _writes(name)  # e.g. X-B3-ParentSpanId: never written
        self.remove: tuple[str, ...] = tuple(sorted(stale - written))
        # Headers we may write but leave unset (an invalid incoming tracestate, a baggage
        # that lost every member): removed per request when they arrived.
        self._rewritten: tuple[str, ...] = tuple(sorted(
            frozenset().union(*(_writes(name) for name in extracted & injected))
        ))

    def extract(self, carrier: Mapping[str, list[str]]) -> Context:
        """The remote context (or a new root) plus baggage. Malformed input is counted."""
        context = Context()
        decision: bool | None = None
        for fmt in self._extract:
            result = self._extract_one(fmt, carrier)
            if isinstance(result, SpanContext):
                context = trace.set_span_in_context(NonRecordingSpan(result), context)
                decision = None
                break
            if decision is None and result is not None:
                decision = result
        if decision is not None:
            context = set_value(_DECISION_KEY, decision, context)
        members = self._extract_baggage(carrier)
        if members:
            context = set_value(_BAGGAGE_KEY, members, context)
        return context

    def inject(self, context: Context, out: dict[str, str]) -> None:
        """Write the configured formats for the gateway span in `context` into `out`."""
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            for fmt in self._inject:
                fmt.inject(span_context, out)
        members = baggage_members(context)
        if members and self._write_baggage:
            out[_baggage.HEADER_KEY] = _baggage.serialise(members)
        if members and self._write_uberctx:
            out.update(JaegerFormat.baggage_headers(members))

    def removals(self, carrier: Mapping[str, list[str]], out: Mapping[str, str]) -> tuple[str, ...]:
        """`remove` plus this request's stale headers that `inject` did not overwrite."""
        names = dict.fromkeys(self.remove)
        for name in self._rewritten:
            if name in carrier:
                names[name] = None
        if self._read_uberctx:
            for name in carrier:
                if name.startswith(JaegerFormat.BAGGAGE_PREFIX):
                    names[name] = None
        return tuple(name for name in names if name not in out)

    def response_headers(self, span_context: SpanContext) -> dict[str, str]:
        """Headers returning the trace id to the client; empty when off or invalid."""
        headers: dict[str, str] = {}
        if not span_context.is_valid:
            return headers
        if self._response:
            value = traceparent_value(span_context)
            if self.TRACERESPONSE in self._response:
                headers[self.TRACERESPONSE] = value
            if self.SERVER_TIMING in self._response:
                headers[self.SERVER_TIMING] = f"trace;desc={value}"
        if self._response_header is not None:
            headers[self._response_header] = trace_hex(span_context.trace_id)
        return headers

    def _extract_one(self, fmt: TraceFormat, carrier: Mapping[str, list[str]]) -> Extracted:
        try:
            return fmt.extract(carrier, self._rejections)
        except Exception:  # a parser bug must not fail the request: count, log, new root
            logger.opt(exception=True).warning("trace-context extractor failed", format=fmt.NAME)
            self._rejections.reject(fmt.NAME, "extractor error")
            return None

    def _extract_baggage(self, carrier: Mapping[str, list[str]]) -> tuple[str, ...]:
        members: list[str] = []
        if self._read_baggage:
            members = self._baggage.extract(carrier, self._rejections)
        if self._read_uberctx:
            keys = {_baggage.member_key(member) for member in members}
            for member in JaegerFormat.baggage_members(carrier):
                key = _baggage.member_key(member)
                if key not in keys:  # the W3C header wins over a same-named uberctx-*
                    keys.add(key)
                    members.append(member)
        return self._baggage.limit(members, self._rejections) if members else ()


def build_propagator(settings: PropagationSettings, rejections: Rejections) -> GatewayPropagator:
    return GatewayPropagator(settings, rejections)


class PropagatorCache:
    """`GatewayPropagator`s memoised on the (frozen, hashable) settings, LRU-bounded."""

    MAX_ENTRIES: Final = 256

    def __init__(self, rejections: Rejections) -> None:
        self._rejections = rejections
        self._cache: OrderedDict[PropagationSettings, GatewayPropagator] = OrderedDict()

    def bounded(self) -> tuple[Bounded, ...]:
        return (Bounded("propagators", self._cache.__len__, self.MAX_ENTRIES),)

    def get(self, settings: PropagationSettings) -> GatewayPropagator:
        propagator = self._cache.get(settings)
        if propagator is not None:
            self._cache.move_to_end(settings)
            return propagator
        propagator = build_propagator(settings, self._rejections)
        self._cache[settings] = propagator
        if len(self._cache) > self.MAX_ENTRIES:
            self._cache.popitem(last=False)
        return propagator
