"""Keep-errors: unsampled gateway spans are recorded, exported only when failed or slow."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ext_proc.config.sampling import KeepErrorsSettings, SamplingSettings
from ext_proc.policy.sampling import (
    KEPT_ATTRIBUTE,
    KeepErrorsProcessor,
    RequestFacts,
    SamplingPolicy,
    TokenBucket,
    build_sampling,
    with_directive,
)

FACTS = RequestFacts("r", "/", "GET", {}, None, None)
MS = 1_000_000


@dataclass
class Rig:
    tracer: trace.Tracer
    policy: SamplingPolicy
    exporter: InMemorySpanExporter
    provider: TracerProvider

    def flush(self) -> None:
        assert self.provider.force_flush()


def rig(inner_cls: type[SpanProcessor], ratio: float, cap: TokenBucket | None = None) -> Rig:
    policy = build_sampling(SamplingSettings.model_validate(
        {"ratio": ratio, "keep_errors": {"enabled": True, "latency_threshold_ms": 250}},
    ), environ={})
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=policy.sampler)
    inner = inner_cls(exporter)  # type: ignore[call-arg]
    provider.add_span_processor(KeepErrorsProcessor(inner, 250, 500, max_kept=cap))
    tracer = provider.get_tracer("test")
    return Rig(tracer, policy, exporter, provider)


@pytest.fixture(params=[SimpleSpanProcessor, BatchSpanProcessor], ids=["simple", "batch"])
def unsampled_rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = rig(request.param, ratio=0.0)
    yield r
    r.provider.shutdown()


def test_ok_fast_unsampled_span_is_not_exported(unsampled_rig: Rig) -> None:
    span = unsampled_rig.tracer.start_span("gw", start_time=1_000 * MS)
    assert span.is_recording() and not span.get_span_context().trace_flags.sampled
    span.set_attribute("http.response.status_code", 200)
    span.end(end_time=1_010 * MS)
    unsampled_rig.flush()
    assert unsampled_rig.exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.set_status(Status(StatusCode.ERROR, "boom")), "error"),
        (lambda s: s.set_attribute("http.response.status_code", 503), "status"),
        (lambda s: s.set_attribute("http.response.status_code", 500), "status"),
        (lambda s: None, "latency"),
    ],
)
def test_failed_or_slow_unsampled_span_is_exported(
    unsampled_rig: Rig, mutate: object, reason: str,
) -> None:
    ctx = with_directive(None, unsampled_rig.policy.directive(FACTS))
    span = unsampled_rig.tracer.start_span("gw", context=ctx, start_time=1_000 * MS)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    assert int(carrier["traceparent"][-2:], 16) & 1 == 0  # upstream keeps the head decision
    mutate(span)  # type: ignore[operator]
    end = 1_300 * MS if reason == "latency" else 1_010 * MS
    span.end(end_time=end)
    unsampled_rig.flush()
    (exported,) = unsampled_rig.exporter.get_finished_spans()
    assert exported.attributes is not None and exported.attributes[KEPT_ATTRIBUTE] == reason
    assert exported.context is not None
    assert exported.context.span_id == span.get_span_context().span_id
    assert exported.context.trace_flags.sampled
    assert exported.end_time == end


def test_status_below_threshold_not_kept(unsampled_rig: Rig) -> None:
    span = unsampled_rig.tracer.start_span("gw", start_time=1_000 * MS)
    span.set_attribute("http.response.status_code", 499)
    span.end(end_time=1_249 * MS)
    unsampled_rig.flush()
    assert unsampled_rig.exporter.get_finished_spans() == ()


@pytest.mark.parametrize("inner_cls", [SimpleSpanProcessor, BatchSpanProcessor])
def test_head_sampled_spans_exported_unchanged(inner_cls: type[SpanProcessor]) -> None:
    r = rig(inner_cls, ratio=1.0)
    span = r.tracer.start_span("gw")
    span.set_attribute("http.response.status_code", 200)
    span.end()
    r.flush()
    (exported,) = r.exporter.get_finished_spans()
    assert exported.context is not None
    assert exported.context.span_id == span.get_span_context().span_id
    assert exported.attributes is not None and KEPT_ATTRIBUTE not in exported.attributes
    r.provider.shutdown()


def test_kept_spans_are_capped() -> None:
    class Frozen:
        def __call__(self) -> float:
            return 0.0

    r = rig(SimpleSpanProcessor, ratio=0.0, cap=TokenBucket(1, 3, Frozen()))
    for _ in range(10):
        span = r.tracer.start_span("gw")
        span.set_status(Status(StatusCode.ERROR))
        span.end()
    assert len(r.exporter.get_finished_spans()) == 3
    r.provider.shutdown()


def test_from_settings_builds_cap_and_threshold() -> None:
    exporter = InMemorySpanExporter()
    settings = KeepErrorsSettings.model_validate(
        {"enabled": True, "latency_threshold_ms": 5, "max_per_second": {"traces_per_second": 1}},
    )
    processor = KeepErrorsProcessor.from_settings(
        SimpleSpanProcessor(exporter), settings, lambda: 0.0,
    )
    policy = build_sampling(SamplingSettings.model_validate(
        {"ratio": 0.0, "keep_errors": settings.model_dump()}), environ={})
    provider = TracerProvider(sampler=policy.sampler)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for _ in range(3):
        tracer.start_span("gw", start_time=0).end(end_time=6 * MS)
    (kept,) = exporter.get_finished_spans()
    assert kept.attributes is not None and kept.attributes[KEPT_ATTRIBUTE] == "latency"
    provider.shutdown()


def test_without_keep_errors_unsampled_spans_are_dropped() -> None:
    policy = build_sampling(SamplingSettings.model_validate({"ratio": 0.0}), environ={})
    provider = TracerProvider(sampler=policy.sampler)
    ctx = with_directive(None, policy.directive(FACTS))
    span = provider.get_tracer("t").start_span("gw", context=ctx)
    assert not span.is_recording()
