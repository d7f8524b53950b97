"""OTLP span encoding for the export thread: the same message as the SDK's
``encode_spans``, built in place.

The SDK's encoder builds each attribute as a new ``AnyValue`` inside a new
``KeyValue`` and each span from keyword arguments; with upb every one of those is
a copy. Here each field is set on the message where it will live, and attribute
pairs that repeat from span to span (method, scheme, protocol, status, route...)
are encoded once and copied from a bounded cache. `tests/unit/test_otlp_encode.py`
checks the output is equal to the SDK's for every shape of span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from loguru import logger
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

_KIND: Final = {
    SpanKind.INTERNAL: Span.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SPAN_KIND_CONSUMER,
}
_STATUS: Final = {
    StatusCode.UNSET: Status.STATUS_CODE_UNSET,
    StatusCode.OK: Status.STATUS_CODE_OK,
    StatusCode.ERROR: Status.STATUS_CODE_ERROR,
}
_HAS_IS_REMOTE: Final = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE: Final = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# Values of these types repeat across spans often enough to be worth caching.
_CACHED_TYPES: Final = (str, bool, int)
_MAX_CACHED_VALUE: Final = 64  # longer strings (paths, ids) rarely repeat


def _set_value(target: AnyValue, value: Any) -> None:
    """Fill `target` like the SDK's encoder would (bool before int; None: an empty
    value, present; empty sequences and mappings: an empty array or list, present)."""
    target.SetInParent()
    if value is None:
        return
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, Sequence):
        target.array_value.SetInParent()
        values = target.array_value.values
        for item in value:
            _set_value(values.add(), item)
    elif isinstance(value, Mapping):
        target.kvlist_value.SetInParent()
        pairs = target.kvlist_value.values
        for key, item in value.items():
            pair = pairs.add()
            pair.key = str(key)
            _set_value(pair.value, item)
    else:
        raise TypeError(f"invalid type {type(value)} of value {value}")


class SpanEncoder:
    """Encodes batches of finished spans into an ``ExportTraceServiceRequest``.

    One instance per exporter: the cache is not thread-safe, and the SDK's batch
    processor calls ``export`` from one worker thread at a time."""

    MAX_CACHE: Final = 4096

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], KeyValue] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        grouped: dict[Resource, dict[InstrumentationScope | None, list[ReadableSpan]]] = {}
        for span in spans:
            grouped.setdefault(span.resource, {}).setdefault(
                span.instrumentation_scope or None, []).append(span)
        request = ExportTraceServiceRequest()
        for resource, scopes in grouped.items():
            resource_spans = request.resource_spans.add()
            resource_spans.resource.SetInParent()
            self._attributes(resource_spans.resource.attributes, resource.attributes)
            if resource.schema_url:
                resource_spans.schema_url = resource.schema_url
            for scope, members in scopes.items():
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.SetInParent()
                if scope is not None:
                    scope_spans.scope.name = scope.name
                    if scope.version:
                        scope_spans.scope.version = scope.version
                    self._attributes(scope_spans.scope.attributes, scope.attributes)
                    if scope.schema_url:
                        scope_spans.schema_url = scope.schema_url
                for span in members:
                    self._span(scope_spans.spans.add(), span)
        return request

    def _span(self, out: Span, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        assert ctx is not None
        out.trace_id = ctx.trace_id.to_bytes(16, "big")
        out.span_id = ctx.span_id.to_bytes(8, "big")
        if ctx.trace_state:
            out.trace_state = ctx.trace_state.to_header()
        parent = span.parent
        if parent is not None:
            out.parent_span_id = parent.span_id.to_bytes(8, "big")
        out.flags = _flags(parent)
        out.name = span.name
        out.kind = _KIND[span.kind]
        if span.start_time:
            out.start_time_unix_nano = span.start_time
        if span.end_time:
            out.end_time_unix_nano = span.end_time
        self._attributes(out.attributes, span.attributes)
        out.dropped_attributes_count = span.dropped_attributes
        for event in span.events:
            pb_event = out.events.add()
            pb_event.name = event.name
            pb_event.time_unix_nano = event.timestamp
            self._attributes(pb_event.attributes, event.attributes)
            pb_event.dropped_attributes_count = event.dropped_attributes
        out.dropped_events_count = span.dropped_events
        for link in span.links:
            pb_link = out.links.add()
            pb_link.trace_id = link.context.trace_id.to_bytes(16, "big")
            pb_link.span_id = link.context.span_id.to_bytes(8, "big")
            self._attributes(pb_link.attributes, link.attributes)
            pb_link.dropped_attributes_count = link.dropped_attributes
            pb_link.flags = _flags(link.context)
        out.dropped_links_count = span.dropped_links
        status = span.status
        if status is not None:
            out.status.SetInParent()
            out.status.code = _STATUS[status.status_code]
            if status.description:
                out.status.message = status.description

    def _attributes(self, target: Any, attributes: Mapping[str, Any] | None) -> None:
        if not attributes:
            return
        pairs = self._pairs
        for key, value in attributes.items():
            cacheable = isinstance(value, _CACHED_TYPES) and (
                not isinstance(value, str) or len(value) <= _MAX_CACHED_VALUE)
            if cacheable:
                cache_key = (key, type(value), value)
                cached = pairs.get(cache_key)
                if cached is not None:
                    target.append(cached)  # a copy (upb)
                    continue
            pair = target.add()
            try:
                pair.key = key
                _set_value(pair.value, value)
            except Exception:  # the SDK's encoder skips (and logs) what it cannot encode
                logger.opt(exception=True).warning("attribute not encodable", key=key)
                del target[-1]
                continue
            if cacheable:
                if len(pairs) >= self.MAX_CACHE:
                    pairs.clear()
                standalone = KeyValue()  # a reference into `target` would keep its
                standalone.CopyFrom(pair)  # whole request alive
                pairs[cache_key] = standalone


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter (its env handling, retries, TLS, headers),
    encoding with `SpanEncoder`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = SpanEncoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return self._encoder.encode(data)
