"""GatewayPropagator: precedence, stale-header removal, response headers, caching, rejections."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.context import Context
from prop_support import (
    SPAN_ID,
    SUITE_PARENT,
    SUITE_SPAN,
    SUITE_TRACE,
    TRACE_ID,
    Gateway,
    local_context,
    propagator,
    span_context_of,
)

from ext_proc.config.propagation import PropagationSettings
from ext_proc.policy.propagation import PropagatorCache, Rejections, sampling_decision
from ext_proc.policy.propagation.grpc_trace_bin import GrpcTraceBinFormat

B3_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"
GRPC_BIN = GrpcTraceBinFormat.encode_text(local_context(TRACE_ID, SPAN_ID, True))


def test_default_precedence_traceparent_first() -> None:
    prop = propagator()
    context = prop.extract({
        "traceparent": [SUITE_PARENT],
        "grpc-trace-bin": [GRPC_BIN],
        "b3": [f"{B3_TRACE}-{B3_SPAN}-1"],
    })
    assert span_context_of(context).trace_id == int(SUITE_TRACE, 16)


def test_invalid_higher_precedence_falls_through_and_is_counted() -> None:
    rejections = Rejections()
    carrier = {"traceparent": ["garbage"], "grpc-trace-bin": [GRPC_BIN]}
    context = propagator(rejections).extract(carrier)
    assert span_context_of(context).trace_id == TRACE_ID
    assert rejections.snapshot() == {"tracecontext": 1}


def test_configured_order_wins() -> None:
    prop = propagator(extract=("b3", "tracecontext"))
    context = prop.extract({"traceparent": [SUITE_PARENT], "b3": [f"{B3_TRACE}-{B3_SPAN}-1"]})
    assert span_context_of(context).trace_id == int(B3_TRACE, 16)


def test_unconfigured_formats_are_ignored() -> None:
    context = propagator(extract=("tracecontext",)).extract({"grpc-trace-bin": [GRPC_BIN]})
    assert not span_context_of(context).is_valid


def test_malformed_everything_is_an_empty_context() -> None:
    rejections = Rejections()
    context = propagator(rejections).extract({
        "traceparent": ["x"], "grpc-trace-bin": ["x"], "b3": ["x"], "x-b3-traceid": ["x"],
        "uber-trace-id": ["x"],
    })
    assert context == Context()
    assert rejections.snapshot() == {
        "tracecontext": 1, "grpc-trace-bin": 1, "b3": 1, "b3multi": 1, "jaeger": 1,
    }


def test_bare_sampling_decision_is_kept_for_the_sampler() -> None:
    """B3 README: 'b3: 0' is a deny without ids; the stream's sampler reads sampling_decision."""
    prop = propagator()
    assert sampling_decision(prop.extract({"b3": ["0"]})) is False
    assert sampling_decision(prop.extract({"x-b3-sampled": ["1"]})) is True
    assert sampling_decision(prop.extract({})) is None
    with_ids = prop.extract({"b3": ["0"], "uber-trace-id": [f"{B3_TRACE}:{B3_SPAN}:0:1"]})
    assert sampling_decision(with_ids) is None and span_context_of(with_ids).is_valid


def test_grpc_trace_bin_is_transcoded_to_traceparent_with_our_span_as_parent() -> None:
    """Issue #3 headline: a grpc-trace-bin client joins the W3C trace; the stale binary header
    is removed so the upstream never sees two contradicting contexts."""
    prop = propagator()
    span, out = Gateway().forward(prop, {"grpc-trace-bin": [GRPC_BIN]})
    own = span.get_span_context()
    assert out == {"traceparent": f"00-{TRACE_ID:032x}-{own.span_id:016x}-01"}
    assert span.parent is not None and span.parent.span_id == SPAN_ID
    assert "grpc-trace-bin" in prop.remove


def test_remove_lists_stale_formats_and_clear_but_never_written_headers() -> None:
    prop = propagator(
        extract=("tracecontext", "grpc-trace-bin", "b3multi", "baggage"),
        inject=("tracecontext", "b3multi"), clear=("X-Legacy-Trace", "traceparent"),
    )
    assert prop.remove == (
        "baggage", "grpc-trace-bin", "x-b3-flags", "x-b3-parentspanid", "x-legacy-trace",
    )


def test_removals_drop_stale_headers_we_did_not_rewrite() -> None:
    """An invalid tracestate is discarded (test suite: 'expects the tracestate to be discarded'),
    so the incoming one must not reach the upstream either; uberctx-* were merged into baggage."""
    prop = propagator()
    carrier = {
        "traceparent": [SUITE_PARENT], "tracestate": ["BAD=1"], "uberctx-k": ["v"],
        "baggage": ["a=1"], "x-b3-sampled": ["1"],
    }
    _, out = Gateway().forward(prop, carrier)
    assert set(out) == {"traceparent", "baggage"}
    assert out["baggage"] == "a=1,k=v"
    removals = prop.removals(carrier, out)
    assert set(removals) >= {"tracestate", "uberctx-k", "x-b3-sampled", "grpc-trace-bin"}
    assert not set(removals) & set(out)


def test_injecting_legacy_formats_writes_all_of_them() -> None:
    every = ("tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage")
    prop = propagator(inject=every)
    span, out = Gateway().forward(prop, {"traceparent": [SUITE_PARENT], "baggage": ["k=v%201"]})
    own = span.get_span_context().span_id
    assert out["b3"] == f"{SUITE_TRACE}-{own:016x}-1"
    assert out["x-b3-spanid"] == f"{own:016x}"
    assert out["uber-trace-id"] == f"{SUITE_TRACE}:{own:016x}:0:01"
    assert out["uberctx-k"] == "v%201"
    decoded = GrpcTraceBinFormat.decode_text(out["grpc-trace-bin"])
    assert decoded is not None
    assert (decoded.trace_id, decoded.span_id) == (int(SUITE_TRACE, 16), own)
    assert prop.remove == ("x-b3-flags", "x-b3-parentspanid")  # never written: a stale parent


def test_response_headers_are_off_by_default() -> None:
    assert propagator().response_headers(local_context(TRACE_ID, SPAN_ID, True)) == {}


def test_response_headers_when_enabled() -> None:
    """Trace Context Level 2 response header: server-timing 'trace;desc=00-<trace>-<span>-<flags>'
    (the editors' draft replaced traceresponse, which stays available)."""
    prop = propagator(response=("traceresponse", "server-timing"), response_header="X-Trace-Id")
    value = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    assert prop.response_headers(local_context(TRACE_ID, SPAN_ID, True)) == {
        "traceresponse": value,
        "server-timing": f"trace;desc={value}",
        "x-trace-id": f"{TRACE_ID:032x}",
    }
    assert prop.response_headers(local_context(0, 0, True)) == {}


def test_cache_memoises_on_settings() -> None:
    cache = PropagatorCache(Rejections())
    first = cache.get(PropagationSettings(inject=("grpc-trace-bin",)))
    assert cache.get(PropagationSettings(inject=("grpc-trace-bin",))) is first
    assert cache.get(PropagationSettings()) is not first


def test_cache_is_bounded() -> None:
    cache = PropagatorCache(Rejections())
    first = cache.get(PropagationSettings(clear=("h0",)))
    for i in range(1, PropagatorCache.MAX_ENTRIES + 1):
        cache.get(PropagationSettings(clear=(f"h{i}",)))
    assert cache.get(PropagationSettings(clear=("h0",))) is not first


def test_a_failing_extractor_is_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(GrpcTraceBinFormat, "extract", boom)
    rejections = Rejections()
    carrier = {"grpc-trace-bin": [GRPC_BIN], "b3": [f"{B3_TRACE}-{B3_SPAN}"]}
    context = propagator(rejections).extract(carrier)
    assert span_context_of(context).trace_id == int(B3_TRACE, 16)
    assert rejections.snapshot() == {"grpc-trace-bin": 1}


def test_rejection_logs_are_rate_limited_per_format(debug_records: list[Any]) -> None:
    now = [100.0]
    rejections = Rejections(interval_s=10.0, clock=lambda: now[0])
    for _ in range(5):
        rejections.reject("b3", "malformed b3", "x" * 100)
    rejections.reject("jaeger", "malformed uber-trace-id", None)
    now[0] += 10.0
    rejections.reject("b3", "malformed b3", "again")
    extras = [record["extra"] for record in debug_records]
    assert extras == [
        {"format": "b3", "reason": "malformed b3", "value": "x" * 64, "suppressed": 0},
        {"format": "jaeger", "reason": "malformed uber-trace-id", "value": None, "suppressed": 0},
        {"format": "b3", "reason": "malformed b3", "value": "again", "suppressed": 4},
    ]
    assert all(record["level"].name == "DEBUG" for record in debug_records)
    assert rejections.snapshot() == {"b3": 6, "jaeger": 1}


def test_suite_span_parent_is_recorded() -> None:
    span, _ = Gateway().forward(propagator(), {"traceparent": [SUITE_PARENT]})
    assert span.parent is not None and f"{span.parent.span_id:016x}" == SUITE_SPAN
