"""`SpanEncoder` writes bytes that parse to the very message the SDK's OTLP encoder
builds, and `FastOTLPSpanExporter` sends them to a real OTLP/gRPC receiver."""

from __future__ import annotations

import threading

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.telemetry.otlp_encode import SpanEncoder
from ext_proc.telemetry.otlp_export import FastOTLPSpanExporter


def encoded(encoder: SpanEncoder, spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encoder.encode(spans))

REMOTE = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                     trace_flags=TraceFlags(1),
                     trace_state=TraceState([("vendor", "v1"), ("rojo", "00f067aa")]))


def finished(resource: Resource | None = None) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "gw"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("extproc-otel", "1.2.3", schema_url="https://x/1.26.0",
                                 attributes={"scope.attr": "s"})
    other = provider.get_tracer("other")
    parent = set_span_in_context(NonRecordingSpan(REMOTE))
    for i in range(3):  # repeated pairs: the cache serves the 2nd and 3rd
        span = tracer.start_span(f"GET /users/{i}", context=parent, kind=SpanKind.SERVER,
                                 attributes={"http.request.method": "GET", "n": i,
                                             "ok": i % 2 == 0, "ratio": 0.5 * i,
                                             "url.path": "/" + "p" * 100,
                                             "tags": ["a", "b"], "codes": [1, 2],
                                             "raw": b"\x00\x01"},
                                 links=[Link(REMOTE, {"link.attr": i})])
        span.add_event("retry", {"attempt": i})
        span.set_status(Status(StatusCode.ERROR, "upstream reset") if i == 1 else
                        Status(StatusCode.OK) if i == 2 else Status(StatusCode.UNSET))
        span.end()
    with tracer.start_as_current_span("local-parent", kind=SpanKind.INTERNAL):
        tracer.start_span("child", kind=SpanKind.CLIENT).end()
    other.start_span("bare", kind=SpanKind.PRODUCER).end()
    provider.get_tracer("").start_span("no scope", kind=SpanKind.CONSUMER).end()
    return list(exporter.get_finished_spans())


def test_equal_to_the_sdk_encoder_for_every_span_shape() -> None:
    spans = finished()
    assert encoded(SpanEncoder(), spans) == encode_spans(spans)


def test_equal_across_batches_while_the_cache_fills_and_resets() -> None:
    encoder = SpanEncoder()
    encoder.MAX_CACHE = 5  # type: ignore[misc]  # reset often
    for _ in range(4):
        spans = finished()
        assert encoded(encoder, spans) == encode_spans(spans)


def test_spans_of_several_resources_are_grouped_like_the_sdk() -> None:
    spans = finished(Resource({"service.name": "a"})) + \
        finished(Resource({"service.name": "b"}, schema_url="https://x/r")) + \
        finished(Resource({"service.name": "a"}))  # equal to the first, another object
    request = encoded(SpanEncoder(), spans)
    assert request == encode_spans(spans)
    assert len(request.resource_spans) == 2


def test_empty_and_null_values_are_present_like_the_sdk() -> None:
    span = finished()[0]
    odd = ReadableSpan(name="odd", context=span.context, resource=span.resource,
                       attributes={"none": None, "empty": [], "no_pairs": {},  # type: ignore[dict-item]
                                   "nested": [[], None, {"k": []}]},
                       events=[], links=[], instrumentation_scope=InstrumentationScope("x"))
    assert encoded(SpanEncoder(), [odd]) == encode_spans([odd])
    encoded_span = encoded(SpanEncoder(), [odd]).resource_spans[0].scope_spans[0].spans[0]
    values = {kv.key: kv.value for kv in encoded_span.attributes}
    assert values["empty"].HasField("array_value") and values["no_pairs"].HasField("kvlist_value")
    assert values["none"].WhichOneof("value") is None


def test_an_attribute_it_cannot_encode_is_skipped_like_the_sdk() -> None:
    span = finished()[0]
    odd = ReadableSpan(name="odd", context=span.context, resource=span.resource,
                       attributes={"fine": 1, "odd": object()},  # type: ignore[dict-item]
                       instrumentation_scope=InstrumentationScope("x"))
    encoded_span = encoded(SpanEncoder(), [odd]).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in encoded_span.attributes] == ["fine"]


def test_scalar_edge_values_are_encoded_like_the_sdk() -> None:
    span = finished()[0]
    odd = ReadableSpan(
        name="", context=span.context, resource=span.resource,  # an empty name
        attributes={"neg": -1, "min": -(1 << 63), "max": (1 << 63) - 1, "zero": 0,
                    "false": False, "nan": float("nan"), "inf": float("-inf"),
                    "long": "x" * 300, "unicode": "d\u00e9j\u00e0 \u2713", "empty": ""},
        instrumentation_scope=InstrumentationScope("x"))
    ours, sdk = encoded(SpanEncoder(), [odd]), encode_spans([odd])
    # NaN != NaN, so compare the bytes of both messages, each serialized by upb
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)


def test_an_int_beyond_int64_is_skipped_like_the_sdk() -> None:
    span = finished()[0]
    odd = ReadableSpan(name="odd", context=span.context, resource=span.resource,
                       attributes={"fine": 1, "huge": 1 << 64},
                       instrumentation_scope=InstrumentationScope("x"))
    encoded_span = encoded(SpanEncoder(), [odd]).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in encoded_span.attributes] == ["fine"]


def test_the_exporter_sends_them_to_a_real_receiver(receiver: OtlpReceiver) -> None:
    exporter = FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=5)
    try:
        spans = finished()
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        got = {(s.name, s.span_id) for s in receiver.spans()}
        assert got == {(s.name, format(s.context.span_id, "016x")) for s in spans}
        server = next(s for s in receiver.spans() if s.name == "GET /users/1")
        assert server.attributes["n"] == 1 and server.attributes["tags"] == ["a", "b"]
    finally:
        exporter.shutdown()


def test_the_exporter_keeps_sending_bytes_after_reconnecting(receiver: OtlpReceiver) -> None:
    """UNAVAILABLE makes the SDK build a new channel and stub; ours must replace it."""
    receiver.set_unavailable(True)
    exporter = FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=10)
    reopen = threading.Thread(target=lambda: (
        receiver.wait_for(lambda: receiver.export_counts["rejected"] >= 1, 10),
        receiver.set_unavailable(False)))
    reopen.start()
    try:
        assert exporter.export(finished()) is SpanExportResult.SUCCESS
        assert receiver.export_counts["rejected"] >= 1 and len(receiver.spans()) == 7
    finally:
        reopen.join(10)
        exporter.shutdown()


def test_the_exporter_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporter = FastOTLPSpanExporter()
    try:
        spans = finished()
        request = ExportTraceServiceRequest.FromString(exporter._translate_data(spans))
        assert request == encode_spans(spans)
    finally:
        exporter.shutdown()
