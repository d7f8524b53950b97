"""Trace budgets: token buckets bound sampled traces per tenant and globally (fake clock)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.sampling import RequestFacts, SamplingPolicy, TokenBucket, build_sampling
from ext_proc.policy.sampling import with_directive as put


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def facts(tenant: str | None = None) -> RequestFacts:
    return RequestFacts(None, "/", "GET", {}, tenant, None)


def make(clock: FakeClock, **kw: Any) -> SamplingPolicy:
    return build_sampling(SamplingSettings.model_validate({"ratio": 1.0, **kw}),
                          clock=clock, environ={})


def sampled(policy: SamplingPolicy, tenant: str | None, trace_id: int = 7) -> bool:
    ctx = put(None, policy.directive(facts(tenant)))
    return policy.sampler.should_sample(ctx, trace_id, "gw").decision is Decision.RECORD_AND_SAMPLE


def test_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, capacity=20, clock=clock)
    assert sum(bucket.acquire() for _ in range(1000)) == 20
    clock.advance(0.5)
    assert sum(bucket.acquire() for _ in range(1000)) == 5
    clock.advance(100)  # refill is capped at capacity
    assert sum(bucket.acquire() for _ in range(1000)) == 20


def test_bucket_bound_under_sustained_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=50, capacity=50, clock=clock)
    granted = 0
    for _ in range(10_000):  # 10,000 requests over 10 s
        clock.advance(0.001)
        granted += bucket.acquire()
    assert 50 * 10 <= granted <= 50 + 50 * 10


def test_noisy_tenant_is_capped_others_unaffected() -> None:
    clock = FakeClock()
    policy = make(clock, tenants={"acme": {"budget": {"traces_per_second": 50, "burst": 50}}})
    acme = 0
    other = 0
    for _ in range(2000):  # 2000 requests per tenant over 2 s
        clock.advance(0.001)
        acme += sampled(policy, "acme")
        other += sampled(policy, "beta")
    assert 50 * 2 <= acme <= 50 + 50 * 2
    assert other == 2000  # no default tenant budget


def test_default_tenant_budget_is_per_tenant() -> None:
    clock = FakeClock()
    policy = make(clock, tenant_budget={"traces_per_second": 1, "burst": 3})
    assert sum(sampled(policy, "a") for _ in range(10)) == 3
    assert sum(sampled(policy, "b") for _ in range(10)) == 3
    assert sum(sampled(policy, None) for _ in range(10)) == 10  # no tenant: no tenant budget


def test_global_budget_bounds_total_and_refunds_tenant() -> None:
    clock = FakeClock()
    policy = make(
        clock,
        tenant_budget={"traces_per_second": 1, "burst": 5},
        global_budget={"traces_per_second": 1, "burst": 4},
    )
    total = sum(sampled(policy, t) for t in ["a", "b", None] * 10)
    assert total == 4
    clock.advance(10)  # global refills to 4; tenant "a" keeps its refunded tokens
    assert sum(sampled(policy, "a") for _ in range(10)) == 4


def test_unlisted_tenants_beyond_cap_share_overflow_bucket() -> None:
    clock = FakeClock()
    policy = make(clock, tenant_budget={"traces_per_second": 1, "burst": 2}, max_tenants=2)
    assert sum(sampled(policy, t) for t in ["t1", "t1", "t1", "t2", "t2", "t2"]) == 4
    spill = sum(sampled(policy, f"x{i}") for i in range(50))  # all share one bucket of 2
    assert spill == 2


def test_unsampled_decisions_and_child_spans_take_no_tokens() -> None:
    clock = FakeClock()
    policy = make(clock, ratio=0.0, global_budget={"traces_per_second": 1, "burst": 1})
    for _ in range(10):
        assert not sampled(policy, None)
    local = SpanContext(7, 8, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    ctx = put(trace.set_span_in_context(NonRecordingSpan(local)), policy.directive(facts()))
    for _ in range(10):
        assert policy.sampler.should_sample(ctx, 7, "child").decision.is_sampled()
    policy.reload(SamplingSettings.model_validate(
        {"ratio": 1.0, "global_budget": {"traces_per_second": 1, "burst": 1}}))
    assert [sampled(policy, None) for _ in range(3)] == [True, False, False]


def test_budget_applies_to_sampled_remote_parent() -> None:
    clock = FakeClock()
    policy = make(clock, global_budget={"traces_per_second": 1, "burst": 2})
    remote = SpanContext(7, 8, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    decisions = [
        policy.sampler.should_sample(put(parent, policy.directive(facts())), 7, "gw").decision
        for _ in range(4)
    ]
    assert [d.is_sampled() for d in decisions] == [True, True, False, False]
