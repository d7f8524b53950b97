"""Helpers shared by the propagation tests."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, StaticSampler
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from ext_proc.config.propagation import PropagationSettings
from ext_proc.policy.propagation import GatewayPropagator, Rejections, build_propagator

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
SUITE_TRACE = "12345678901234567890123456789012"
SUITE_SPAN = "1234567890123456"
SUITE_PARENT = f"00-{SUITE_TRACE}-{SUITE_SPAN}-01"


def propagator(rejections: Rejections | None = None, **settings: Any) -> GatewayPropagator:
    return build_propagator(PropagationSettings(**settings), rejections or Rejections())


def span_context_of(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


def local_context(trace_id: int, span_id: int, sampled: bool) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(int(sampled)))


class Gateway:
    """A real SDK tracer standing in for the stream code: extract, span, inject."""

    def __init__(self) -> None:
        # Unsampled parents still give a recording span, so its parent can be asserted.
        record_only = StaticSampler(Decision.RECORD_ONLY)
        sampler = ParentBased(ALWAYS_ON, remote_parent_not_sampled=record_only)
        self._tracer = TracerProvider(sampler=sampler).get_tracer("test")

    def forward(
        self, prop: GatewayPropagator, carrier: dict[str, list[str]]
    ) -> tuple[trace.Span, dict[str, str]]:
        extracted = prop.extract(carrier)
        span = self._tracer.start_span("gw", context=extracted, kind=SpanKind.SERVER)
        out: dict[str, str] = {}
        prop.inject(trace.set_span_in_context(span, extracted), out)
        span.end()
        return span, out


def as_carrier(headers: dict[str, str]) -> dict[str, list[str]]:
    return {name.lower(): [value] for name, value in headers.items()}
