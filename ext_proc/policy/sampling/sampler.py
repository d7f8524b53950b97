"""The OTel `Sampler` that applies a request's `SamplingDirective`.

Order: a valid local parent is always followed (child spans, no budget); a valid
remote parent's sampled flag is followed when the directive says so; otherwise
the low 64 trace-id bits are compared with the ratio's bound (so the decision is
consistent with the SDK's TraceIdRatioBased). A positive decision for a new
trace then takes a token from the tenant and global budgets. A negative decision
is RECORD_ONLY when keep-errors is on, DROP otherwise. The SDK derives the span's
sampled flag (what goes upstream) from this one decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from ext_proc.policy.sampling.directive import SamplingDirective, directive_from
from ext_proc.policy.sampling.rules import TRACE_ID_LIMIT


class GatewaySampler(Sampler):
    """Reads the directive from the parent context; `fallback` supplies one when absent."""

    def __init__(self, fallback: Callable[[], SamplingDirective]) -> None:
        self._fallback = fallback

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        directive = directive_from(parent_context) or self._fallback()
        parent = get_current_span(parent_context).get_span_context()
        parent_state = parent.trace_state if parent.is_valid else None
        if parent.is_valid and not parent.is_remote:
            sampled = parent.trace_flags.sampled
            return self._result(sampled, directive, attributes, parent_state)
        if parent.is_valid and directive.follow_parent:
            sampled = parent.trace_flags.sampled
        else:
            sampled = (trace_id & TRACE_ID_LIMIT) < directive.bound
        if sampled and directive.gate is not None:
            sampled = directive.gate.acquire()
        return self._result(sampled, directive, attributes, parent_state)

    @staticmethod
    def _result(
        sampled: bool,
        directive: SamplingDirective,
        attributes: Attributes,
        trace_state: TraceState | None,
    ) -> SamplingResult:
        if sampled:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        if directive.record_unsampled:
            return SamplingResult(Decision.RECORD_ONLY, attributes, trace_state)
        return SamplingResult(Decision.DROP, None, trace_state)

    def get_description(self) -> str:
        default = self._fallback()
        return (
            f"ExtProcGatewaySampler{{ratio:{default.ratio},"
            f"parentBased:{default.follow_parent}}}"
        )
