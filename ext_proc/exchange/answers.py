"""Answers to Envoy: the no-op answer of each phase, and our dynamic metadata."""

from __future__ import annotations

from typing import Final

from google.protobuf import struct_pb2
from opentelemetry.trace import SpanContext

from ext_proc._gen.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb

_EMPTY: Final = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def empty_response(phase: str | None) -> pb.ProcessingResponse:
    """The no-op answer for a phase (shared immutable instances: never mutate)."""
    return _EMPTY.get(phase or "", _EMPTY["request_headers"])


# Sent with the answer to request_headers (`mode_override`) when this exchange needs
# the response phase that the lean envoy.yaml skips (Envoy: allow_mode_override).
_SEND: Final = mode_pb.ProcessingMode.SEND
RESPONSE_PHASE: Final = mode_pb.ProcessingMode(response_header_mode=_SEND,
                                                response_trailer_mode=_SEND)

# Response headers we add to rather than replace (the upstream's own timings stay).
APPENDED: Final = frozenset({"server-timing"})


def trace_metadata(namespace: str, ctx: SpanContext,
                   into: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """trace_id/span_id for Envoy's access log (``%DYNAMIC_METADATA(ns:trace_id)%``),
    written `into` the answer's Struct when given."""
    metadata = struct_pb2.Struct() if into is None else into
    entry = metadata.fields[namespace].struct_value
    entry.fields["trace_id"].string_value = format(ctx.trace_id, "032x")
    entry.fields["span_id"].string_value = format(ctx.span_id, "016x")
    return metadata
