"""Span pipeline self-telemetry: drops, exports and failures are counted, never silent."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from ext_proc.dev.devstack import wait_until
from ext_proc.telemetry.metrics.spans import (
    DEFAULT_QUEUE_SIZE,
    EXPORT_DURATION,
    EXPORT_DURATION_BUCKETS,
    EXPORTED,
    PROCESSED,
    QUEUE_CAPACITY,
    QUEUE_SIZE,
    BoundedSpanProcessor,
    SpanPipelineStats,
)
from ext_proc.telemetry.provider import build_telemetry

FAST = {"OTEL_BSP_SCHEDULE_DELAY": "10"}


class BlockingExporter(SpanExporter):
    """Holds the first export until released, so the queue fills up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


class FailingExporter(SpanExporter):
    def __init__(self, raises: bool) -> None:
        self.raises = raises

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.raises:
            raise ConnectionError("collector down")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return None


def tracer_with(processor: BoundedSpanProcessor, sampler: object = None) -> TracerProvider:
    provider = TracerProvider(sampler=sampler)  # type: ignore[arg-type]
    provider.add_span_processor(processor)
    return provider


def observed(stats: SpanPipelineStats) -> dict[str, dict[tuple[tuple[str, object], ...], float]]:
    reader = InMemoryMetricReader()
    stats.observe(MeterProvider(metric_readers=[reader]).get_meter("t"))
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, dict[tuple[tuple[str, object], ...], float]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = {tuple(sorted((p.attributes or {}).items())):
                               getattr(p, "value", getattr(p, "count", 0))
                               for p in m.data.data_points}
    return out


def test_full_queue_drops_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    exporter = BlockingExporter()
    stats = SpanPipelineStats()
    env = {**FAST, "OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"}
    provider = tracer_with(BoundedSpanProcessor(exporter, stats, env))
    tracer = provider.get_tracer("t")
    tracer.start_span("first").end()
    assert exporter.entered.wait(5)  # the worker is stuck exporting span 1
    for i in range(10):
        tracer.start_span(f"s{i}").end()
    assert stats.capacity == 4
    assert stats.dropped["queue_full"] == 6
    assert stats.in_flight == 4
    assert any(r.getMessage() == "spans dropped" for r in caplog.records)
    values = observed(stats)
    assert values[PROCESSED][(("error.type", "queue_full"),)] == 6
    assert values[QUEUE_SIZE][()] == 4
    assert values[QUEUE_CAPACITY][()] == 4
    exporter.release.set()
    provider.shutdown()
    assert len(exporter.spans) == 5  # the first and the four that fitted: none lost silently
    assert stats.exported == 5 and stats.in_flight == 0
    assert observed(stats)[EXPORTED][()] == 5


def test_spans_after_shutdown_are_counted_as_dropped() -> None:
    stats = SpanPipelineStats()
    provider = tracer_with(BoundedSpanProcessor(InMemorySpanExporter(), stats, FAST))
    span = provider.get_tracer("t").start_span("late")
    provider.shutdown()
    span.end()
    assert stats.dropped["already_shutdown"] == 1


@pytest.mark.parametrize("raises", [False, True])
def test_failed_exports_are_counted_with_their_duration(raises: bool) -> None:
    stats = SpanPipelineStats()
    reader = InMemoryMetricReader()
    stats.observe(MeterProvider(metric_readers=[reader]).get_meter("t"))
    provider = tracer_with(BoundedSpanProcessor(FailingExporter(raises), stats, FAST))
    for i in range(3):
        provider.get_tracer("t").start_span(f"s{i}").end()
    provider.force_flush()
    wait_until(lambda: stats.failed == 3, 5, "failed exports to be counted")
    assert stats.exported == 0
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    durations = names[EXPORT_DURATION].data.data_points
    assert all((p.attributes or {}).get("error.type") == "export_failed" for p in durations)
    assert sum(p.count for p in durations) >= 1
    exported = {tuple((p.attributes or {}).items()): p.value
                for p in names[EXPORTED].data.data_points}
    assert exported[(("error.type", "export_failed"),)] == 3
    provider.shutdown()


def test_unsampled_spans_never_enter_the_queue() -> None:
    stats = SpanPipelineStats()
    exporter = InMemorySpanExporter()
    provider = tracer_with(BoundedSpanProcessor(exporter, stats, FAST), ALWAYS_OFF)
    provider.get_tracer("t").start_span("x").end()
    provider.shutdown()
    assert stats.in_flight == 0 and stats.handed == 0 and exporter.get_finished_spans() == ()


@pytest.mark.parametrize(("value", "expected"), [
    ("100", 100), ("junk", DEFAULT_QUEUE_SIZE), ("-1", DEFAULT_QUEUE_SIZE)])
def test_queue_capacity_from_env(value: str, expected: int) -> None:
    stats = SpanPipelineStats()
    BoundedSpanProcessor(InMemorySpanExporter(), stats, {"OTEL_BSP_MAX_QUEUE_SIZE": value}) \
        .shutdown()
    assert stats.capacity == expected


def test_build_telemetry_counts_through_the_bounded_processor() -> None:
    stats = SpanPipelineStats()
    exporter = InMemorySpanExporter()
    telemetry = build_telemetry(exporter=exporter, from_env=False, span_stats=stats)
    telemetry.tracer.start_span("x").end()
    telemetry.shutdown()
    assert stats.exported == 1 and len(exporter.get_finished_spans()) == 1


def test_export_duration_buckets_are_sized_for_seconds() -> None:
    """The histogram's unit is s: its bounds must resolve a 1 ms export (the SDK default
    bounds 0, 5, 10 ... 10000 put every export below 5 s in one bucket, issue #16)."""
    stats = SpanPipelineStats()
    reader = InMemoryMetricReader()
    stats.observe(MeterProvider(metric_readers=[reader]).get_meter("t"))
    provider = tracer_with(BoundedSpanProcessor(InMemorySpanExporter(), stats, FAST))
    provider.get_tracer("t").start_span("x").end()
    provider.force_flush()
    wait_until(lambda: stats.exported == 1, 5, "the export to be counted")
    data = reader.get_metrics_data()
    assert data is not None
    metric = next(m for rm in data.resource_metrics for sm in rm.scope_metrics
                  for m in sm.metrics if m.name == EXPORT_DURATION)
    assert metric.unit == "s"
    (point,) = metric.data.data_points
    assert tuple(point.explicit_bounds) == EXPORT_DURATION_BUCKETS
    assert point.explicit_bounds[0] <= 0.001 and point.explicit_bounds[-1] >= 30
    assert point.bucket_counts[0] + point.bucket_counts[1] + point.bucket_counts[2] == 1
    provider.shutdown()
