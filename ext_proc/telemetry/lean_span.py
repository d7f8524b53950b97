"""Gateway spans without the SDK's per-span machinery.

The SDK's `Span` guards every attribute with a lock and cleans it through
``BoundedAttributes``, allocates bounded lists for events and links, and copies
itself into a `ReadableSpan` when it ends: ~19 µs per gateway span, as much as the
rest of a span's life. `LeanTracer` starts spans exactly as the SDK's tracer does
(the provider's sampler, id generator, resource and span processors; the same
span context and trace flags) but records into a plain object that becomes one SDK
`ReadableSpan` at ``end``, handed to the same processors, so batching, keep-errors
sampling and every exporter work unchanged. Attribute values are checked and
capped (``OTEL_[SPAN_]ATTRIBUTE_VALUE_LENGTH_LIMIT`` and ``_COUNT_LIMIT``) as the
SDK would. Sessions run on the event loop, one at a time, so no lock is needed.
Not done, unlike the SDK's tracer: ``on_start``/``_on_ending`` calls into the span
processors (ours do nothing there) and the SDK's own ``otel.sdk.span.*`` metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util.types import Attributes, AttributeValue

_SCALARS: Final = frozenset({str, bool, int, float})
MAX_ATTRIBUTES: Final = 128  # the SDK's default OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT
_UNSET: Final = Status(StatusCode.UNSET)


class LeanTracer(trace_api.Tracer):
    """Starts `LeanSpan`s with what `tracer` (an SDK tracer) would use."""

    def __init__(self, tracer: SdkTracer, scope: InstrumentationScope,
                 max_attribute_length: int | None,
                 max_attributes: int | None = MAX_ATTRIBUTES) -> None:
        self._sampler = tracer.sampler
        self._ids = tracer.id_generator
        self._resource = tracer.resource
        self._processor: SpanProcessor = tracer.span_processor
        self._scope = scope
        self._max_length = max_attribute_length
        self._max_count = max_attributes if max_attributes is not None else 1 << 62

    def start_span(self, name: str, context: Context | None = None,
                   kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None,
                   links: Sequence[Link] | None = (), start_time: int | None = None,
                   record_exception: bool = True,
                   set_status_on_exception: bool = True) -> trace_api.Span:
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self._ids.generate_trace_id()
            random_id = self._ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        result = self._sampler.should_sample(context, trace_id, name, kind, attributes,
                                             links or ())
        flags = TraceFlags.SAMPLED if result.decision.is_sampled() else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False,
                                   trace_flags=TraceFlags(flags),
                                   trace_state=result.trace_state)
        if not result.decision.is_recording():
            return NonRecordingSpan(span_context)
        span = LeanSpan(self, name, span_context, parent, kind,
                        start_time if start_time is not None else time.time_ns(),
                        tuple(links or ()))
        if result.attributes:
            span.set_attributes(result.attributes)
        return span

    @contextmanager  # the API declares its own context-manager type
    def start_as_current_span(  # type: ignore[override]
            self, name: str, context: Context | None = None,
                              kind: SpanKind = SpanKind.INTERNAL,
                              attributes: Attributes = None,
                              links: Sequence[Link] | None = (),
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True,
                              end_on_exit: bool = True) -> Iterator[trace_api.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace_api.use_span(span, end_on_exit=end_on_exit,
                                record_exception=record_exception,
                                set_status_on_exception=set_status_on_exception) as current:
            yield current

    def finished(self, span: ReadableSpan) -> None:
        self._processor.on_end(span)

    def new_span_id(self) -> int:
        """A span id from the provider's id generator, for a span started later."""
        return self._ids.generate_span_id()

    def record_child(self, name: str, parent: SpanContext, kind: SpanKind, start_time: int,
                     end_time: int, attributes: dict[str, AttributeValue],
                     status: Status = _UNSET, span_id: int | None = None,
                     events: tuple[Event, ...] = ()) -> None:
        """A finished child of the local span `parent`, handed to the processors at
        once: for spans whose every fact is known (phase spans), without a `LeanSpan`.
        `attributes` are taken as they are (few, short: the caller's own); `span_id`:
        one allocated earlier (`new_span_id`), else a new one."""
        context = SpanContext(parent.trace_id, span_id or self._ids.generate_span_id(),
                              is_remote=False, trace_flags=parent.trace_flags,
                              trace_state=parent.trace_state)
        self._processor.on_end(_Finished(
            0, name=name, context=context, parent=parent, resource=self._resource,
            attributes=attributes, events=events, links=(), kind=kind, status=status,
            start_time=start_time, end_time=max(start_time, end_time),
            instrumentation_scope=self._scope))


class LeanSpan(trace_api.Span):
    """A recording span; `end` hands it to the span processors as a `ReadableSpan`."""

    __slots__ = ("_attributes", "_context", "_dropped", "_end_time", "_events", "_kind",
                 "_links", "_name", "_parent", "_start_time", "_status", "_tracer")

    def __init__(self, tracer: LeanTracer, name: str, context: SpanContext,
                 parent: SpanContext | None, kind: SpanKind, start_time: int,
                 links: tuple[Link, ...]) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._start_time = start_time
        self._end_time: int | None = None
        self._attributes: dict[str, AttributeValue] = {}
        self._dropped = 0
        self._events: list[Event] = []
        self._links = links
        self._status = Status(StatusCode.UNSET)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._end_time is not None:
            return
        own, limit = self._attributes, self._tracer._max_length
        for key, value in attributes.items():
            kind = type(value)
            # the common case inline: a new key, a short string or a number, room left
            if (kind in _SCALARS and type(key) is str and key and key not in own
                    and len(own) < self._tracer._max_count
                    and (kind is not str or limit is None or len(value) <= limit)):  # type: ignore[arg-type]
                own[key] = value
            else:
                self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is not None:
            return
        if not key or type(key) is not str:  # as the SDK: dropped, counted
            self._dropped += 1
            return
        kind = type(value)
        if kind is str:
            limit = self._tracer._max_length
            if limit is not None and len(value) > limit:  # type: ignore[arg-type]
                value = value[:limit]  # type: ignore[index]
        elif kind not in _SCALARS:  # sequences, mappings, bytes, None, others: rare
            value = BoundedAttributes(None, {key: value}, True,
                                      self._tracer._max_length).get(key)  # the SDK's rules
        attributes = self._attributes
        if key in attributes:
            del attributes[key]  # set again: it moves to the end, as in the SDK
        elif len(attributes) >= self._tracer._max_count:
            del attributes[next(iter(attributes))]  # the oldest goes, as in the SDK
            self._dropped += 1
        attributes[key] = value

    def add_event(self, name: str, attributes: Attributes = None,
                  timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, dict(attributes or {}), timestamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # as the SDK: OK is final, UNSET is ignored
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        self.add_event("exception", {"exception.type": type(exception).__name__,
                                     "exception.message": str(exception),
                                     "exception.escaped": escaped, **(attributes or {})},
                       timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return  # ends once
        self._end_time = end_time if end_time is not None else time.time_ns()
        tracer = self._tracer
        tracer.finished(_Finished(
            self._dropped, name=self._name, context=self._context, parent=self._parent,
            resource=tracer._resource, attributes=self._attributes, events=self._events,
            links=self._links, kind=self._kind, status=self._status,
            start_time=self._start_time, end_time=self._end_time,
            instrumentation_scope=tracer._scope))


class _Finished(ReadableSpan):
    """A `ReadableSpan` that reports the attributes the span dropped (the SDK's own
    count them in its ``BoundedAttributes``)."""

    def __init__(self, dropped: int, **fields: Any) -> None:
        super().__init__(**fields)
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped
