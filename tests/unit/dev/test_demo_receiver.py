"""OtlpReceiver: round trips through the real OTLP/gRPC exporters."""

from __future__ import annotations

import threading

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from ext_proc.dev.demo.receiver import OtlpReceiver, any_value

TIMEOUT = 5.0
RESOURCE = Resource.create({"service.name": "rx-test", "deployment.environment.name": "ci"})


def _tracer_provider(rx: OtlpReceiver, timeout: float = TIMEOUT) -> TracerProvider:
    provider = TracerProvider(resource=RESOURCE)
    exporter = OTLPSpanExporter(endpoint=rx.endpoint, insecure=True, timeout=timeout)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_start_returns_bound_port_and_endpoint(receiver: OtlpReceiver) -> None:
    assert receiver.endpoint.startswith("http://127.0.0.1:")
    assert int(receiver.endpoint.rsplit(":", 1)[1]) > 0
    with pytest.raises(RuntimeError):
        receiver.start()


def test_spans_round_trip(receiver: OtlpReceiver) -> None:
    provider = _tracer_provider(receiver)
    tracer = provider.get_tracer("scope.under.test")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        with tracer.start_as_current_span(
            "child", kind=SpanKind.CLIENT,
            attributes={"s": "v", "i": 7, "f": 1.5, "b": True, "l": ["a", "b"]},
        ) as child:
            child.add_event("evt", {"k": 1})
            child.set_status(Status(StatusCode.ERROR, "bad"))
    provider.shutdown()

    assert receiver.wait_for(lambda: len(receiver.spans()) == 2, TIMEOUT)
    by_name = {s.name: s for s in receiver.spans()}
    p, c = by_name["parent"], by_name["child"]
    pctx, cctx = parent.get_span_context(), child.get_span_context()
    assert p.trace_id == c.trace_id == format(pctx.trace_id, "032x")
    assert p.span_id == format(pctx.span_id, "016x")
    assert c.span_id == format(cctx.span_id, "016x")
    assert c.parent_span_id == p.span_id and p.parent_span_id == ""
    assert (p.kind, c.kind) == (2, 3)
    assert c.attributes == {"s": "v", "i": 7, "f": 1.5, "b": True, "l": ["a", "b"]}
    assert (c.status_code, c.status_message) == (2, "bad")
    assert c.events == (("evt", {"k": 1}),)
    assert c.resource["service.name"] == "rx-test"
    assert c.resource["deployment.environment.name"] == "ci"
    assert c.scope == "scope.under.test"
    assert 0 < c.start_ns <= c.end_ns
    assert receiver.export_counts["traces"] == 2


def test_metrics_round_trip_with_exemplars(receiver: OtlpReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=receiver.endpoint, insecure=True, timeout=TIMEOUT),
        export_interval_millis=3_600_000,
    )
    meters = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = meters.get_meter("m")
    counter = meter.create_counter("requests", unit="{request}")
    histogram = meter.create_histogram("latency", unit="ms")
    gauge = meter.create_gauge("inflight")
    tracer_provider = TracerProvider()
    with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
        counter.add(3, {"route": "/a"})
        histogram.record(12.5, {"route": "/a"})
    gauge.set(4)
    meters.shutdown()  # one final collection and export (exemplars are reset per collection)

    assert receiver.wait_for(lambda: len(receiver.metrics()) == 3, TIMEOUT)
    by_name = {m.name: m for m in receiver.metrics()}
    trace_id = format(span.get_span_context().trace_id, "032x")
    requests = by_name["requests"]
    assert (requests.type, requests.unit, requests.is_monotonic) == ("sum", "{request}", True)
    assert requests.resource["service.name"] == "rx-test"
    (point,) = requests.data_points
    assert point.value == 3 and point.attributes == {"route": "/a"}
    assert point.exemplars and point.exemplars[0].trace_id == trace_id
    latency = by_name["latency"]
    (hist,) = latency.data_points
    assert latency.type == "histogram"
    assert (hist.count, hist.sum) == (1, 12.5)
    assert len(hist.bucket_counts) == len(hist.explicit_bounds) + 1 and sum(hist.bucket_counts) == 1
    assert hist.exemplars[0].span_id == format(span.get_span_context().span_id, "016x")
    assert by_name["inflight"].type == "gauge"
    assert by_name["inflight"].data_points[0].value == 4


def test_logs_round_trip(receiver: OtlpReceiver) -> None:
    provider = LoggerProvider(resource=RESOURCE)
    provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=receiver.endpoint, insecure=True)))
    tracer_provider = TracerProvider()
    with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
        provider.get_logger("app").emit(
            body="hello", severity_text="WARN", attributes={"k": "v"},
            context=set_span_in_context(span))
    provider.shutdown()

    assert receiver.wait_for(lambda: len(receiver.log_records()) == 1, TIMEOUT)
    (log,) = receiver.log_records()
    ctx = span.get_span_context()
    assert (log.body, log.severity_text, log.attributes) == ("hello", "WARN", {"k": "v"})
    assert log.trace_id == format(ctx.trace_id, "032x")
    assert log.span_id == format(ctx.span_id, "016x")
    assert log.resource["service.name"] == "rx-test" and log.scope == "app"


def test_wait_for_is_woken_by_an_export(receiver: OtlpReceiver) -> None:
    """The exporter only starts once wait_for is blocked: the notify must wake it."""
    waiting = threading.Event()

    def arrived() -> bool:
        waiting.set()
        return any(s.name == "late" for s in receiver.spans())

    def export_later() -> None:
        waiting.wait(TIMEOUT)
        provider = _tracer_provider(receiver)
        provider.get_tracer("t").start_span("late").end()
        provider.shutdown()

    thread = threading.Thread(target=export_later)
    thread.start()
    try:
        assert receiver.wait_for(arrived, TIMEOUT)
    finally:
        thread.join(TIMEOUT)


def test_wait_for_times_out_when_nothing_arrives(receiver: OtlpReceiver) -> None:
    assert receiver.wait_for(lambda: bool(receiver.spans()), 0.05) is False


def test_unavailable_switch(receiver: OtlpReceiver) -> None:
    receiver.set_unavailable(True)
    with grpc.insecure_channel(receiver.endpoint.removeprefix("http://")) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Export(trace_service_pb2.ExportTraceServiceRequest(), timeout=TIMEOUT)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE

    # The real exporter retries UNAVAILABLE; a short deadline makes it give up at once.
    exporter = OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=0.5)
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("lost")
    span.end()
    assert exporter.export([span]) is SpanExportResult.FAILURE  # type: ignore[list-item]
    assert receiver.spans() == []
    assert receiver.export_counts["rejected"] >= 2
    assert receiver.export_counts["traces"] == 0

    receiver.set_unavailable(False)
    assert exporter.export([span]) is SpanExportResult.SUCCESS  # type: ignore[list-item]
    assert [s.name for s in receiver.spans()] == ["lost"]
    exporter.shutdown()


def test_clear_forgets_everything(receiver: OtlpReceiver) -> None:
    provider = _tracer_provider(receiver)
    provider.get_tracer("t").start_span("x").end()
    provider.shutdown()
    assert receiver.wait_for(lambda: len(receiver.spans()) == 1, TIMEOUT)
    receiver.clear()
    assert receiver.spans() == [] and receiver.export_counts["traces"] == 0


def test_any_value_decodes_nested_values() -> None:
    value = common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(values=[
        common_pb2.KeyValue(key="b", value=common_pb2.AnyValue(bytes_value=b"\x01")),
        common_pb2.KeyValue(key="a", value=common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
            values=[common_pb2.AnyValue(int_value=1), common_pb2.AnyValue(double_value=2.5)]))),
    ]))
    assert any_value(value) == {"b": b"\x01", "a": [1, 2.5]}
    assert any_value(common_pb2.AnyValue()) is None
