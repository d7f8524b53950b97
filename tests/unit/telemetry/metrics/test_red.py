"""RED metrics: semantic-convention names, bounded attributes, exemplars, cardinality cap."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, TraceFlags

from ext_proc.config.telemetry import MetricsSettings
from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry.metrics.pipeline import Metrics, build_metrics
from ext_proc.telemetry.metrics.red import (
    ACTIVE_REQUESTS,
    ADDED_BUCKETS,
    DURATION_BUCKETS,
    GATEWAY_ADDED,
    REQUEST_DURATION,
    RESPONSE_BODY_SIZE,
)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
SAMPLED = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
UNSAMPLED = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(0))


def built(**settings: Any) -> tuple[Metrics, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return build_metrics(MetricsSettings(**settings), readers=(reader,)), reader


def metric(reader: InMemoryMetricReader, name: str) -> Metric:
    data = reader.get_metrics_data()
    assert data is not None
    found = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
             if m.name == name]
    assert len(found) == 1, name
    return found[0]


def record(method: str | None = "GET", route: str | None = "/api/users",
           status: int | None = 200, error: str | None = None, duration: float = 0.02,
           ctx: SpanContext = SAMPLED, tenant: str | None = None) -> ExchangeRecord:
    return ExchangeRecord(method, route, status, error, duration, ctx, tenant=tenant)


def test_duration_histogram_has_convention_name_unit_and_buckets() -> None:
    metrics, reader = built()
    assert metrics.red is not None
    metrics.red.stream_finished(record(duration=0.02))
    m = metric(reader, REQUEST_DURATION)
    assert m.unit == "s"
    point = m.data.data_points[0]
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == DURATION_BUCKETS
    assert point.count == 1 and point.sum == pytest.approx(0.02)
    assert dict(point.attributes or {}) == {
        "http.request.method": "GET", "http.route": "/api/users",
        "http.response.status_code": 200}


def test_response_body_size_when_envoys_access_log_reported_it() -> None:
    metrics, reader = built()
    assert metrics.red is not None
    metrics.red.stream_finished(record())  # no access-log entry: no size
    full = ExchangeRecord("GET", "/api/users", 200, None, 0.01, SAMPLED, response_body_size=1234)
    metrics.red.stream_finished(full)
    m = metric(reader, RESPONSE_BODY_SIZE)
    assert m.unit == "By"
    (point,) = m.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert point.count == 1 and point.sum == 1234


def test_gateway_added_duration_is_duration_minus_the_upstream_phase() -> None:
    metrics, reader = built()
    assert metrics.red is not None
    metrics.red.stream_finished(record(duration=0.5))  # no upstream phase logged: none
    reached = ExchangeRecord("GET", "/api/users", 200, None, 0.120, SAMPLED, upstream_s=0.100)
    metrics.red.stream_finished(reached)
    # another clock than the duration's: never negative
    metrics.red.stream_finished(ExchangeRecord("GET", "/api/users", 200, None, 0.099,
                                               UNSAMPLED, upstream_s=0.100))
    m = metric(reader, GATEWAY_ADDED)
    assert m.unit == "s"
    (point,) = m.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == ADDED_BUCKETS
    assert point.count == 2 and point.sum == pytest.approx(0.020)
    assert point.min == 0.0 and point.max == pytest.approx(0.020)
    assert dict(point.attributes or {}) == {
        "http.request.method": "GET", "http.route": "/api/users",
        "http.response.status_code": 200}
    (exemplar,) = point.exemplars  # only the sampled one
    assert (exemplar.trace_id, exemplar.span_id) == (TRACE_ID, SPAN_ID)
    assert exemplar.value == pytest.approx(0.020)


@pytest.mark.parametrize(("route", "expected"), [
    (None, "_OTHER"), ("", "_OTHER"), ("/x" * 100, "_OTHER"), ("/api/{id}", "/api/{id}"),
])
def test_unknown_absent_or_oversized_routes_collapse_into_the_placeholder(
        route: str | None, expected: str) -> None:
    metrics, _ = built()
    assert metrics.red is not None
    assert metrics.red.attributes(record(route=route))["http.route"] == expected


def test_placeholder_and_route_length_are_configurable() -> None:
    metrics, _ = built(route_placeholder="unmatched", max_route_length=4)
    assert metrics.red is not None
    assert metrics.red.attributes(record(route="/abcd"))["http.route"] == "unmatched"
    assert metrics.red.attributes(record(route="/abc"))["http.route"] == "/abc"


def test_error_type_status_and_method_are_bounded() -> None:
    metrics, _ = built()
    assert metrics.red is not None
    attrs = metrics.red.attributes(record(method="BREW", status=0, error="client_aborted"))
    assert attrs == {"http.request.method": "_OTHER", "http.route": "/api/users",
                     "error.type": "client_aborted"}
    assert "http.response.status_code" not in metrics.red.attributes(record(status=999))
    assert metrics.red.attributes(record(status=503, error="503"))["error.type"] == "503"


def test_tenant_attribute_only_when_enabled() -> None:
    off, _ = built()
    on, _ = built(tenant_attribute=True)
    assert off.red is not None and on.red is not None
    assert "tenant.id" not in off.red.attributes(record(tenant="acme"))
    assert on.red.attributes(record(tenant="acme"))["tenant.id"] == "acme"
    assert "tenant.id" not in on.red.attributes(record(tenant=None))


def test_active_requests_balance_and_skip_streams_never_started() -> None:
    metrics, reader = built()
    red = metrics.red
    assert red is not None
    red.stream_started("GET", "/api/users")
    red.stream_started("GET", "/api/users")
    red.stream_finished(record())
    red.stream_finished(record(method=None, route=None, status=403))  # denied before us
    point = metric(reader, ACTIVE_REQUESTS).data.data_points[0]
    assert point.value == 1
    assert dict(point.attributes or {}) == {"http.request.method": "GET"}


def test_exemplar_carries_the_sampled_span_ids() -> None:
    metrics, reader = built()
    assert metrics.red is not None
    metrics.red.stream_finished(record(ctx=SAMPLED))
    exemplars = metric(reader, REQUEST_DURATION).data.data_points[0].exemplars
    assert [(e.trace_id, e.span_id) for e in exemplars] == [(TRACE_ID, SPAN_ID)]


@pytest.mark.parametrize(("ctx", "enabled"), [
    (UNSAMPLED, True), (INVALID_SPAN_CONTEXT, True), (SAMPLED, False),
])
def test_no_exemplar_when_unsampled_invalid_or_disabled(ctx: SpanContext, enabled: bool) -> None:
    metrics, reader = built(exemplars=enabled)
    assert metrics.red is not None
    metrics.red.stream_finished(record(ctx=ctx))
    assert not metric(reader, REQUEST_DURATION).data.data_points[0].exemplars


def test_cardinality_cap_folds_new_attribute_sets_into_one_overflow_point() -> None:
    metrics, reader = built(cardinality_limit=3)
    assert metrics.red is not None
    for i in range(10):
        metrics.red.stream_finished(record(route=f"/r{i}"))
    points = metric(reader, REQUEST_DURATION).data.data_points
    assert len(points) <= 4
    overflow = [p for p in points if (p.attributes or {}).get("otel.metric.overflow") is True]
    assert len(overflow) == 1
    assert sum(p.count for p in points if isinstance(p, HistogramDataPoint)) == 10


def test_disabled_red_metrics_build_no_observer() -> None:
    metrics, _ = built(enabled=False)
    assert metrics.red is None


def test_runtime_metrics_phase_time_streams_and_rejections() -> None:
    metrics, reader = built()
    runtime = metrics.runtime
    assert runtime is not None
    runtime.phase_done("request_headers", 40_000)
    runtime.phase_done(None, 1_000)
    runtime.observe_streams(lambda: 7)
    runtime.observe_rejections(lambda: {"tracecontext": 3, "b3": 1})
    data = reader.get_metrics_data()
    assert data is not None
    by_name = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics}
    phases = {dict(p.attributes or {})["extproc.phase"]: p
              for p in by_name["extproc.phase.duration"].data.data_points}
    assert set(phases) == {"request_headers", "unknown"}
    assert phases["request_headers"].sum == pytest.approx(40e-6)
    assert by_name["extproc.stream.active"].data.data_points[0].value == 7
    rejected = {dict(p.attributes or {})["extproc.propagation.format"]: p.value
                for p in by_name["extproc.propagation.rejected"].data.data_points}
    assert rejected == {"tracecontext": 3, "b3": 1}
