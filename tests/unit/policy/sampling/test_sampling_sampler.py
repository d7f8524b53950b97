"""GatewaySampler: ratio accuracy, parent-based behaviour, env handling, flag invariant."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.sampling import (
    RequestFacts,
    SamplingPolicy,
    build_sampling,
    sampler_from_env,
    with_directive,
)
from ext_proc.policy.sampling.directive import SamplingDirective

N = 10_000


def facts(**kw: Any) -> RequestFacts:
    base: dict[str, Any] = {
        "route": None, "path": "/", "method": "GET", "headers": {}, "tenant": None,
        "route_ratio": None,
    }
    base.update(kw)
    return RequestFacts(**base)


def settings(**kw: Any) -> SamplingSettings:
    return SamplingSettings.model_validate(kw)


def remote_parent(sampled: bool, trace_id: int = 0xABC, ctx: Context | None = None) -> Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span_ctx = SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(span_ctx), ctx)


def decide(policy: SamplingPolicy, ctx: Context | None, trace_id: int) -> Decision:
    return policy.sampler.should_sample(ctx, trace_id, "gw").decision


def within_3_sigma(count: int, n: int, p: float) -> bool:
    sigma = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 3 * sigma


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_default_ratio_accuracy(ratio: float) -> None:
    policy = build_sampling(settings(ratio=ratio), environ={})
    rng = random.Random(1234)
    sampled = sum(
        decide(policy, None, rng.getrandbits(128)) is Decision.RECORD_AND_SAMPLE for _ in range(N)
    )
    assert within_3_sigma(sampled, N, ratio), sampled


@pytest.mark.parametrize("source", ["rule", "route", "tenant"])
def test_directive_ratio_accuracy(source: str) -> None:
    policy = build_sampling(settings(
        ratio=1.0,
        rules=[{"path_prefix": "/health", "ratio": 0.05}],
        tenants={"acme": {"ratio": 0.05}},
    ), environ={})
    by_source: dict[str, dict[str, Any]] = {
        "rule": {"path": "/healthz"}, "route": {"route_ratio": 0.05}, "tenant": {"tenant": "acme"},
    }
    kw = by_source[source]
    directive = policy.directive(facts(**kw))
    assert directive.source == source
    ctx = with_directive(None, directive)
    rng = random.Random(99)
    sampled = sum(
        decide(policy, ctx, rng.getrandbits(128)) is Decision.RECORD_AND_SAMPLE for _ in range(N)
    )
    assert within_3_sigma(sampled, N, 0.05), sampled


def test_ratio_zero_and_one_are_exact() -> None:
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(1000)]
    never = build_sampling(settings(ratio=0.0), environ={})
    always = build_sampling(settings(ratio=1.0), environ={})
    assert all(decide(never, None, t) is Decision.DROP for t in ids)
    assert all(decide(always, None, t) is Decision.RECORD_AND_SAMPLE for t in ids)


def test_parent_based_follows_remote_parent_over_ratio() -> None:
    policy = build_sampling(settings(ratio=0.0, parent_based=True), environ={})
    d = policy.directive(facts())
    assert decide(policy, with_directive(remote_parent(True), d), 5) is Decision.RECORD_AND_SAMPLE
    policy = build_sampling(settings(ratio=1.0, parent_based=True), environ={})
    d = policy.directive(facts())
    assert decide(policy, with_directive(remote_parent(False), d), 5) is Decision.DROP


def test_parent_based_off_applies_ratio_to_remote_parent() -> None:
    policy = build_sampling(settings(ratio=0.0, parent_based=False), environ={})
    ctx = with_directive(remote_parent(True), policy.directive(facts()))
    assert decide(policy, ctx, 5) is Decision.DROP
    policy = build_sampling(settings(ratio=1.0, parent_based=False), environ={})
    ctx = with_directive(remote_parent(False), policy.directive(facts()))
    assert decide(policy, ctx, 5) is Decision.RECORD_AND_SAMPLE


def test_invalid_parent_uses_root_ratio() -> None:
    policy = build_sampling(settings(ratio=0.0), environ={})
    invalid = trace.set_span_in_context(NonRecordingSpan(trace.INVALID_SPAN_CONTEXT))
    assert decide(policy, with_directive(invalid, policy.directive(facts())), 5) is Decision.DROP


def test_local_parent_is_followed_regardless_of_ratio() -> None:
    policy = build_sampling(settings(ratio=0.0, parent_based=False), environ={})
    flags = TraceFlags(TraceFlags.SAMPLED)
    local = SpanContext(0xABC, 0x99, is_remote=False, trace_flags=flags)
    ctx = trace.set_span_in_context(NonRecordingSpan(local))
    assert decide(policy, ctx, 0xABC) is Decision.RECORD_AND_SAMPLE


def test_keep_errors_records_unsampled() -> None:
    policy = build_sampling(settings(ratio=0.0, keep_errors={"enabled": True}), environ={})
    ctx = with_directive(None, policy.directive(facts()))
    assert decide(policy, ctx, 5) is Decision.RECORD_ONLY


def test_parent_trace_state_is_kept() -> None:
    policy = build_sampling(settings(), environ={})
    state = trace.TraceState([("vendor", "x")])
    span_ctx = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1), trace_state=state)
    ctx = trace.set_span_in_context(NonRecordingSpan(span_ctx))
    result = policy.sampler.should_sample(ctx, 1, "gw")
    assert result.trace_state is not None and result.trace_state.get("vendor") == "x"


@pytest.mark.parametrize(
    ("env", "follow", "ratio"),
    [
        ({}, True, 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, False, 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, False, 0.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.3"}, False, 0.3),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, True, 0.0),
        ({"OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.2"},
         True, 0.2),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "abc"}, False, 1.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, False, 1.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"}, False, 1.0),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, True, 1.0),
    ],
)
def test_sampler_from_env(env: dict[str, str], follow: bool, ratio: float) -> None:
    parsed = sampler_from_env(env)
    assert (parsed.follow_parent, parsed.ratio) == (follow, ratio)


def test_env_read_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.125")
    policy = build_sampling(settings())
    described = policy.describe()
    assert (described["ratio"], described["parent_based"]) == (0.125, False)
    assert described["ratio_source"] == "env:traceidratio"
    # always_off without parent following: a sampled remote parent is not followed
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    policy = build_sampling(settings())
    ctx = with_directive(remote_parent(True), policy.directive(facts()))
    assert decide(policy, ctx, 5) is Decision.DROP


def test_env_ignored_when_rules_or_explicit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    with_rules = build_sampling(settings(rules=[{"path_prefix": "/x", "ratio": 0.5}]))
    assert (with_rules.describe()["ratio"], with_rules.describe()["parent_based"]) == (1.0, True)
    explicit = build_sampling(settings(ratio=0.7))
    assert explicit.describe()["ratio"] == 0.7
    assert explicit.describe()["parent_based"] is False  # still from env: always_off


def test_no_directive_in_context_uses_default() -> None:
    policy = build_sampling(settings(ratio=0.0), environ={})
    assert decide(policy, None, 5) is Decision.DROP
    assert "ExtProcGatewaySampler" in policy.sampler.get_description()


def test_upstream_flag_equals_decision_with_real_provider() -> None:
    """The sampled flag injected upstream equals the decision, for every request."""
    exporter = InMemorySpanExporter()
    policy = build_sampling(settings(
        ratio=0.5, rules=[{"method": "POST", "ratio": 0.1}], tenant_budget={"traces_per_second": 5},
    ), environ={})
    provider = TracerProvider(sampler=policy.sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    propagator = TraceContextTextMapPropagator()
    rng = random.Random(3)
    flags_by_span: dict[int, bool] = {}
    for i in range(2000):
        parent: Context | None = None
        if i % 3 == 1:
            parent = remote_parent(rng.random() < 0.5, trace_id=rng.getrandbits(128) or 1)
        request = facts(method=rng.choice(["GET", "POST"]), tenant=rng.choice([None, "a", "b"]))
        ctx = with_directive(parent, policy.directive(request))
        span = tracer.start_span("gw", context=ctx, kind=trace.SpanKind.SERVER)
        carrier: dict[str, str] = {}
        propagator.inject(carrier, context=trace.set_span_in_context(span))
        flags = int(carrier["traceparent"].rsplit("-", 1)[1], 16)  # SDK may set the random bit
        flags_by_span[span.get_span_context().span_id] = bool(flags & 0x01)
        span.end()
    exported = {s.context.span_id for s in exporter.get_finished_spans() if s.context}
    assert {sid for sid, flag in flags_by_span.items() if flag} == exported
    assert 0 < len(exported) < 2000
    provider.shutdown()


def test_a_directive_bound_again_keeps_every_other_field() -> None:
    """`bound_to` (the prefilter's root decision) is `dataclasses.replace(bound=...)`:
    every field given a value of its own, so that one it forgot would show."""
    gate = object()
    directive = SamplingDirective(ratio=0.25, source="rule", rule="r1", tenant="acme",
                                  bound=123, follow_parent=False, record_unsampled=True,
                                  gate=gate)  # type: ignore[arg-type]
    again = directive.bound_to(456)
    assert again == dataclasses.replace(directive, bound=456)
    assert again.bound == 456 and again.gate is gate
    assert [f.name for f in dataclasses.fields(SamplingDirective)] == [
        "ratio", "source", "rule", "tenant", "bound", "follow_parent", "record_unsampled",
        "gate"]  # a new field must be added to bound_to too
