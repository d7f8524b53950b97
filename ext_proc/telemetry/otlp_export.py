"""`FastOTLPSpanExporter`: the SDK's OTLP/gRPC span exporter, sending the request
bytes `ext_proc.telemetry.otlp_encode.SpanEncoder` writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan

from ext_proc.request.seams import Bounded
from ext_proc.telemetry.otlp_encode import SpanEncoder


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter (its env handling, retries, TLS, headers,
    reconnection), sending the bytes `SpanEncoder` writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._encoder = SpanEncoder()
        super().__init__(*args, **kwargs)

    def _initialize_channel_and_stub(self) -> None:
        # Called by the SDK at start and again to reconnect. The stub it builds
        # serializes messages; the request here is already serialized.
        super()._initialize_channel_and_stub()
        self._client = _SerializedTraceStub(self._channel)  # type: ignore[assignment]

    def bounded(self) -> tuple[Bounded, ...]:
        return self._encoder.bounded()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return self._encoder.encode(data)


class _SerializedTraceStub:
    """``TraceService`` with a request that is already serialized."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
