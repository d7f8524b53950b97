"""`LeanTracer` starts and ends spans as the SDK's tracer does: the same OTLP output,
sampling decisions, attribute rules and status rules, one `on_end` per span."""

from __future__ import annotations

import itertools
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from ext_proc.telemetry.lean_span import MAX_ATTRIBUTES, LeanTracer

REMOTE = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                     trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1")]))
SCOPE = InstrumentationScope("ext_proc", "1.2.3")


class Counting(IdGenerator):
    """Ids from a counter: two tracers fed alike produce the same ids."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._next)

    def generate_trace_id(self) -> int:
        return 0xABC0000 + next(self._next)

    def is_trace_id_random(self) -> bool:
        return True  # root spans get the W3C random-trace-id flag


class Capture(SpanProcessor):
    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def tracers(sampler: Sampler | None = None, max_length: int | None = 16,
            max_count: int | None = None) -> tuple[SdkTracer, LeanTracer, Capture]:
    from opentelemetry.sdk.trace import SpanLimits
    capture = Capture()
    limits = SpanLimits(max_attribute_length=max_length, max_span_attributes=max_count)
    provider = TracerProvider(resource=Resource({"service.name": "gw"}), sampler=sampler,
                              id_generator=Counting(), span_limits=limits)
    provider.add_span_processor(capture)
    sdk = provider.get_tracer(SCOPE.name, SCOPE.version)
    assert isinstance(sdk, SdkTracer)
    return sdk, LeanTracer(sdk, SCOPE, max_length, limits.max_span_attributes), capture


def exchange(tracer: Any, parent: SpanContext | None) -> None:
    """What a StreamSession does with a gateway span, in short."""
    context = set_span_in_context(NonRecordingSpan(parent)) if parent else None
    span = tracer.start_span("GET", context=context, kind=SpanKind.SERVER,
                             attributes={"http.request.method": "GET", "url.path": "/x" * 20},
                             start_time=1_000)
    span.set_attributes({"server.port": 8080, "tags": ["a", "b" * 40], "ok": True,
                         "ratio": 0.5})
    span.set_attribute("http.route", "/users/{id}")
    span.update_name("GET /users/{id}")
    span.set_status(Status(StatusCode.ERROR, "upstream reset"))
    span.end(end_time=5_000)


def test_the_same_otlp_output_as_the_sdk_tracer() -> None:
    for parent in (REMOTE, None):
        sdk, _, sdk_capture = tracers()
        _, lean, lean_capture = tracers()
        exchange(sdk, parent)
        exchange(lean, parent)
        assert encode_spans(lean_capture.ended) == encode_spans(sdk_capture.ended)
        (span,), (reference,) = lean_capture.ended, sdk_capture.ended
        assert span.context == reference.context  # ids, flags (sampled, random), state
        assert span.attributes is not None and span.attributes["url.path"] == "/x" * 8
        assert span.attributes["tags"] == ("a", "b" * 16)  # capped like the SDK's


def test_sampling_decisions_are_the_sdk_samplers() -> None:
    _, lean, capture = tracers(sampler=ALWAYS_OFF)
    span = lean.start_span("GET")
    assert isinstance(span, NonRecordingSpan) and not span.is_recording()
    span.end()
    assert capture.ended == []

    class RecordOnly(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return SamplingResult(Decision.RECORD_ONLY, {"sampler.attr": 1})

        def get_description(self) -> str:
            return "record-only"

    _, lean, capture = tracers(sampler=RecordOnly())
    lean.start_span("GET").end()
    (ended,) = capture.ended  # processors see it (keep-errors may keep it), unsampled
    assert not ended.context.trace_flags.sampled
    assert ended.attributes == {"sampler.attr": 1}


def odd_attributes(tracer: Any) -> None:
    span = tracer.start_span("x", start_time=1)
    span.set_attributes({"long": "abcdefgh", "none": None, "map": {"a": "bcdefg"},
                         "": "empty key", "mixed": [1, "xyzxyz"], "raw": b"\x00",
                         "nested": [["abcdefg"]]})
    for i in range(MAX_ATTRIBUTES + 1):
        span.set_attribute(f"k{i}", i)
    span.set_attribute("k5", "again")  # set again: it moves to the end
    span.end(end_time=2)
    span.set_attribute("late", 1)  # after the end: ignored
    span.end()  # ends once


def test_attribute_rules_are_the_sdks() -> None:
    """Values capped, odd values cleaned, bad keys dropped, the oldest dropped at the
    count limit, all counted; nothing after the end."""
    sdk, _, sdk_capture = tracers(max_length=4)
    _, lean, lean_capture = tracers(max_length=4)
    odd_attributes(sdk)
    odd_attributes(lean)
    assert encode_spans(lean_capture.ended) == encode_spans(sdk_capture.ended)
    (ended,) = lean_capture.ended
    attributes = dict(ended.attributes or {})
    assert len(attributes) == MAX_ATTRIBUTES and "late" not in attributes
    assert ended.dropped_attributes == sdk_capture.ended[0].dropped_attributes > 0


def test_a_configured_attribute_count_limit_is_the_sdks() -> None:
    sdk, _, sdk_capture = tracers(max_count=5)
    _, lean, lean_capture = tracers(max_count=5)
    for tracer in (sdk, lean):
        span = tracer.start_span("x", start_time=1)
        span.set_attributes({f"k{i}": i for i in range(9)})
        span.set_attribute("k6", -1)
        span.end(end_time=2)
    assert encode_spans(lean_capture.ended) == encode_spans(sdk_capture.ended)
    assert list(lean_capture.ended[0].attributes or {}) == ["k4", "k5", "k7", "k8", "k6"]


def test_status_rules_follow_the_sdk() -> None:
    _, lean, capture = tracers()
    span = lean.start_span("x")
    span.set_status(StatusCode.UNSET)
    span.set_status(StatusCode.ERROR, "bad")
    span.set_status(Status(StatusCode.OK))
    span.set_status(StatusCode.ERROR, "after OK: ignored")
    span.end()
    assert capture.ended[0].status.status_code is StatusCode.OK


def test_start_as_current_span_makes_it_current_and_ends_it() -> None:
    _, lean, capture = tracers()
    with lean.start_as_current_span("x") as span:
        assert trace_api.get_current_span() is span
        span.add_event("retry", {"attempt": 1})
    (ended,) = capture.ended
    assert ended.name == "x" and [e.name for e in ended.events] == ["retry"]
