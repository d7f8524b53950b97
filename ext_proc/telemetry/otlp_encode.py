"""OTLP span encoding for the export thread: the bytes of the SDK's
``encode_spans`` request, written directly in the protobuf wire format.

The SDK's encoder builds every attribute as a new ``AnyValue`` inside a new
``KeyValue`` and every span from keyword arguments, then serializes the whole
tree. Here a span's common fields and its scalar attributes are written as bytes,
and attribute pairs that repeat from span to span (method, scheme, protocol,
status, route...) are encoded once and reused from a bounded cache. The rare parts
(events, links, array/map/bytes/None values, status messages) still go through
the generated messages. `tests/unit/telemetry/test_otlp_encode.py` checks that the bytes
parse to a message equal to the SDK's for every shape of span. Measured on 512
gateway spans (15 attributes each), CPU per span: 7 µs, against 18 for the
message-building encoder this replaced and 13 before resources were hashed once.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from loguru import logger
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import (
    ResourceSpans,
    ScopeSpans,
    Span,
    SpanFlags,
    Status,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from ext_proc.request.seams import Bounded

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
_CACHED_TYPES: Final = frozenset({str, bool, int})
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


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


_INT64: Final = range(-(1 << 63), 1 << 63)
# Tags (field number << 3 | wire type) of the fields written here.
_ATTRIBUTE: Final = b"\x4a"  # Span.attributes = 9
_SPAN: Final = b"\x12"  # ScopeSpans.spans = 2
_SCOPE_SPANS: Final = b"\x12"  # ResourceSpans.scope_spans = 2
_RESOURCE_SPANS: Final = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_FLAGS: Final = b"\x85\x01"  # Span.flags = 16, fixed32


_KIND_FIELD: Final = {kind: b"\x30" + _varint(value) for kind, value in _KIND.items()}
_STATUS_CODE: Final = {code: b"\x18" + _varint(value) if value else b""  # Status.code = 3
                       for code, value in _STATUS.items()}


def _value(value: Any) -> bytes:
    """The encoded ``AnyValue`` of one attribute value (as the SDK encodes it)."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if value not in _INT64:
            raise ValueError(f"{value} does not fit an int64")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if kind is float:
        return b"\x21" + struct.pack("<d", value)
    message = AnyValue()  # bytes, sequences, mappings, None, subclasses: rare
    _set_value(message, value)
    return message.SerializeToString()


def _attributes_of(span: ReadableSpan) -> Mapping[str, Any]:
    """The span's attributes. An SDK span keeps them in a dict inside its
    ``BoundedAttributes``: iterating that dict is ~3x faster than the public
    read-only view, which goes through ``collections.abc`` per item. Any other
    shape takes the public view."""
    raw = getattr(getattr(span, "_attributes", None), "_dict", None)
    return raw if type(raw) is dict else span.attributes or {}


class SpanEncoder:
    """Encodes batches of finished spans into a serialized ``ExportTraceServiceRequest``.

    One instance per exporter: the caches are not thread-safe, and the SDK's batch
    processor calls ``export`` from one worker thread at a time."""

    MAX_CACHE: Final = 4096

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        self._keys: dict[str, bytes] = {}

    def bounded(self) -> tuple[Bounded, ...]:
        """Encoded attribute keys and (key, value) pairs (read from another thread: a
        size, not a snapshot)."""
        return (Bounded("export.attribute_keys", self._keys.__len__, self.MAX_CACHE),
                Bounded("export.attributes", self._pairs.__len__, self.MAX_CACHE))

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Grouped by equal resources, as the SDK does, but hashing each distinct
        # resource object once: a Resource's hash is a JSON dump of its attributes.
        same: dict[int, Resource] = {}  # id -> the first equal resource of the batch
        grouped: dict[int, dict[InstrumentationScope | None, list[bytes]]] = {}
        for span in spans:
            resource = span.resource
            first = same.get(id(resource))
            if first is None:
                first = same[id(resource)] = next(
                    (seen for seen in same.values() if seen == resource), resource)
            grouped.setdefault(id(first), {}).setdefault(
                span.instrumentation_scope or None, []).append(self._span(span))
        out = []
        for first_id, scopes in grouped.items():
            resource = same[first_id]
            resource_spans = ResourceSpans()
            resource_spans.resource.SetInParent()
            self._messages(resource_spans.resource.attributes, resource.attributes)
            if resource.schema_url:
                resource_spans.schema_url = resource.schema_url
            body = [resource_spans.SerializeToString()]
            for scope, members in scopes.items():
                body.append(_field(_SCOPE_SPANS, self._scope(scope) + b"".join(members)))
            out.append(_field(_RESOURCE_SPANS, b"".join(body)))
        return b"".join(out)

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        scope_spans = ScopeSpans()
        scope_spans.scope.SetInParent()
        if scope is not None:
            scope_spans.scope.name = scope.name
            if scope.version:
                scope_spans.scope.version = scope.version
            self._messages(scope_spans.scope.attributes, scope.attributes)
            if scope.schema_url:
                scope_spans.schema_url = scope.schema_url
        return scope_spans.SerializeToString()

    def _span(self, span: ReadableSpan) -> bytes:
        ctx = span.get_span_context()
        assert ctx is not None
        parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"),
                 b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
        if ctx.trace_state:
            parts.append(_field(b"\x1a", ctx.trace_state.to_header().encode()))
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(_field(b"\x2a", span.name.encode()))
        parts.append(_KIND_FIELD[span.kind])
        if span.start_time:
            parts += (b"\x39", span.start_time.to_bytes(8, "little"))
        if span.end_time:
            parts += (b"\x41", span.end_time.to_bytes(8, "little"))
        attributes = _attributes_of(span)
        if attributes:
            self._attributes(parts, attributes)
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        if span.events or span.links or span.dropped_events or span.dropped_links:
            parts.append(self._rare(span))
        status = span.status
        if status is not None:
            parts.append(_field(b"\x7a", _STATUS_CODE[status.status_code] + (
                _field(b"\x12", status.description.encode()) if status.description else b"")))
        parts += (_FLAGS, _flags(parent).to_bytes(4, "little"))
        return _field(_SPAN, b"".join(parts))

    def _attributes(self, parts: list[bytes], attributes: Mapping[str, Any]) -> None:
        pairs, keys = self._pairs, self._keys
        for key, value in attributes.items():
            kind = type(value)
            cache_key = (key, kind, value) if kind in _CACHED_TYPES and (
                kind is not str or len(value) <= _MAX_CACHED_VALUE) else None
            if cache_key is not None:
                cached = pairs.get(cache_key)
                if cached is not None:
                    parts.append(cached)
                    continue
            encoded_key = keys.get(key)
            try:
                if encoded_key is None:
                    encoded_key = _field(b"\x0a", key.encode())
                    if len(keys) < self.MAX_CACHE:
                        keys[key] = encoded_key
                pair = _field(_ATTRIBUTE, encoded_key + _field(b"\x12", _value(value)))
            except Exception:  # the SDK's encoder skips (and logs) what it cannot encode
                logger.opt(exception=True).warning("attribute not encodable", key=key)
                continue
            parts.append(pair)
            if cache_key is not None:
                if len(pairs) >= self.MAX_CACHE:
                    pairs.clear()
                pairs[cache_key] = pair

    def _rare(self, span: ReadableSpan) -> bytes:
        """Events, links and their drop counts, as generated messages (fields 11-14)."""
        out = Span()
        for event in span.events:
            pb_event = out.events.add()
            pb_event.name = event.name
            pb_event.time_unix_nano = event.timestamp
            self._messages(pb_event.attributes, event.attributes)
            pb_event.dropped_attributes_count = event.dropped_attributes
        out.dropped_events_count = span.dropped_events
        for link in span.links:
            pb_link = out.links.add()
            pb_link.trace_id = link.context.trace_id.to_bytes(16, "big")
            pb_link.span_id = link.context.span_id.to_bytes(8, "big")
            self._messages(pb_link.attributes, link.attributes)
            pb_link.dropped_attributes_count = link.dropped_attributes
            pb_link.flags = _flags(link.context)
        out.dropped_links_count = span.dropped_links
        return out.SerializeToString()

    @staticmethod
    def _messages(target: Any, attributes: Mapping[str, Any] | None) -> None:
        """Attributes as ``KeyValue`` messages (resource, scope, events, links)."""
        for key, value in (attributes or {}).items():
            pair = target.add()
            try:
                pair.key = key
                _set_value(pair.value, value)
            except Exception:  # skipped, as the SDK's encoder does
                logger.opt(exception=True).warning("attribute not encodable", key=key)
                del target[-1]


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE
