"""Tail-keep failed or slow spans that lost the head decision.

With keep-errors on, the sampler records unsampled spans (RECORD_ONLY): their
sampled flag stays 0, so the traceparent sent upstream carries the head decision
and upstream services do not sample. At span end this processor forwards to the
wrapped exporting processor every head-sampled span, plus unsampled spans that
ended with an ERROR status, an HTTP status >= ``status_code_min`` or a duration
over the threshold. The SDK's Simple/BatchSpanProcessor ignore spans whose
context is not sampled, so a kept span is forwarded as a copy whose trace flags
have the sampled bit set and which carries ``KEPT_ATTRIBUTE`` = reason.

Trade-off: a kept trace holds the gateway span (and its local children) only,
never upstream spans; every request pays the cost of recording its span.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanContext, StatusCode, TraceFlags

from ext_proc.config.sampling import KeepErrorsSettings
from ext_proc.policy.sampling.budget import Clock, TokenBucket

KEPT_ATTRIBUTE: Final = "extproc.sampling.kept"
STATUS_CODE_ATTRIBUTE: Final = "http.response.status_code"
_NS_PER_MS: Final = 1_000_000


def keep_reason(span: ReadableSpan, status_code_min: int, latency_ns: int | None) -> str | None:
    """Why an unsampled span should be exported anyway, or None."""
    if span.status.status_code is StatusCode.ERROR:
        return "error"
    code = (span.attributes or {}).get(STATUS_CODE_ATTRIBUTE)
    if isinstance(code, int) and not isinstance(code, bool) and code >= status_code_min:
        return "status"
    if latency_ns is not None and span.start_time is not None and span.end_time is not None:
        if span.end_time - span.start_time >= latency_ns:
            return "latency"
    return None


def as_sampled(span: ReadableSpan, reason: str) -> ReadableSpan:
    """A copy of `span` with the sampled flag set and the keep reason attached."""
    ctx = span.context
    if ctx is None:
        return span
    flags = TraceFlags(ctx.trace_flags | TraceFlags.SAMPLED)
    context = SpanContext(ctx.trace_id, ctx.span_id, ctx.is_remote, flags, ctx.trace_state)
    attributes = dict(span.attributes or {})
    attributes[KEPT_ATTRIBUTE] = reason
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class KeepErrorsProcessor(SpanProcessor):
    """Wraps the exporting processor (e.g. a BatchSpanProcessor) and decides at span end."""

    def __init__(
        self,
        exporter_processor: SpanProcessor,
        latency_threshold_ms: float | None = None,
        status_code_min: int = 500,
        max_kept: TokenBucket | None = None,
    ) -> None:
        self._inner = exporter_processor
        self._status_code_min = status_code_min
        self._latency_ns = (
            int(latency_threshold_ms * _NS_PER_MS) if latency_threshold_ms is not None else None
        )
        self._max_kept = max_kept

    @classmethod
    def from_settings(
        cls, exporter_processor: SpanProcessor, settings: KeepErrorsSettings, clock: Clock,
    ) -> KeepErrorsProcessor:
        cap = settings.max_per_second
        return cls(
            exporter_processor,
            latency_threshold_ms=settings.latency_threshold_ms,
            status_code_min=settings.status_code_min,
            max_kept=TokenBucket.from_budget(cap, clock) if cap is not None else None,
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Span) -> None:
        self._inner._on_ending(span)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None:
            return
        if ctx.trace_flags.sampled:
            self._inner.on_end(span)
            return
        reason = keep_reason(span, self._status_code_min, self._latency_ns)
        if reason is None:
            return
        if self._max_kept is not None and not self._max_kept.acquire():
            return
        self._inner.on_end(as_sampled(span, reason))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
