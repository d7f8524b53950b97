"""Requests Envoy did not ask about: told apart by our metadata namespace, counted once."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import pytest
from loguru import logger
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, TraceFlags, use_span

from ext_proc._gen.envoy.config.core.v3 import base_pb2
from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from ext_proc.config import LogSettings, PropagationSettings
from ext_proc.config.sampling import TenantSettings
from ext_proc.config.telemetry import MetricsSettings
from ext_proc.exchange.als import AccessLogService, FinalFacts, final_facts
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.outcome import exchange_outcome
from ext_proc.exchange.session import StreamDeps, StreamSession
from ext_proc.exchange.unasked import CachedPaths, RouteTemplates, UnaskedRequests, error_type
from ext_proc.policy.propagation import PropagatorCache, Rejections
from ext_proc.policy.tenants import TenantResolver
from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry import logs
from ext_proc.telemetry.access_lines import AccessLog
from ext_proc.telemetry.metrics.pipeline import build_metrics
from ext_proc.telemetry.metrics.red import (
    ACTIVE_REQUESTS,
    GATEWAY_ADDED,
    REQUEST_DURATION,
    RESPONSE_BODY_SIZE,
)
from tests.unit.telemetry.metrics.test_red import built, metric

NS = "extproc_otel"


def entry(request_id: str = "r1", *, asked: bool = False, status: int | None = 200,
          method: int = base_pb2.GET, path: str = "/a?token=x", final: bool = True,
          **extra: Any) -> log_pb.HTTPAccessLogEntry:
    e = log_pb.HTTPAccessLogEntry()
    e.request.request_id = request_id
    e.request.request_method = method
    e.request.path = path
    if asked:  # what Envoy logs after our answer set dynamic metadata
        e.common_properties.metadata.filter_metadata[NS].fields["trace_id"].string_value = "ab"
    if not final:
        e.common_properties.intermediate_log_entry = True
    e.common_properties.time_to_last_downstream_tx_byte.FromNanoseconds(
        extra.pop("duration_ns", 12_500_000))
    if status is not None:
        e.response.response_code.value = status
        e.response.response_body_bytes = 42
    for key, value in extra.items():
        if key == "flags":
            for flag in value:
                setattr(e.common_properties.response_flags, flag, True)
        elif key == "grpc_status":
            e.response.response_trailers["grpc-status"] = value
        elif key == "headers":
            e.request.request_headers.update(value)
        elif key == "original_path":
            e.request.original_path = value
        elif key == "upstream_ns":  # (first byte sent upstream, last byte received)
            e.common_properties.time_to_first_upstream_tx_byte.FromNanoseconds(value[0])
            e.common_properties.time_to_last_upstream_rx_byte.FromNanoseconds(value[1])
    return e


def message(*entries: log_pb.HTTPAccessLogEntry) -> pb.StreamAccessLogsMessage:
    msg = pb.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend(entries)
    return msg


class Collect:
    def __init__(self) -> None:
        self.records: list[ExchangeRecord] = []

    def stream_started(self, method: str | None, route: str | None) -> None:
        raise AssertionError("an un-asked request never started a stream")

    def stream_finished(self, record: ExchangeRecord) -> None:
        self.records.append(record)


def test_an_entry_without_our_namespace_is_unasked_unless_an_exchange_waits() -> None:
    facts: list[FinalFacts] = []
    batches: list[list[log_pb.HTTPAccessLogEntry]] = []
    service = AccessLogService(facts.append, on_unasked=batches.append, namespace=NS,
                               awaited=lambda rid: rid == "parked")
    service.handle(message(
        entry("asked", asked=True), entry("u1"), entry("parked"), entry("u2"),
        entry("partial", final=False), entry("", status=None)))
    assert [f.request_id for f in facts] == ["asked", "parked"]  # joined as before
    assert len(batches) == 1  # one call per ALS message
    assert [e.request.request_id for e in batches[0]] == ["u1", "u2", ""]
    assert (service.entries, service.unasked, service.ignored) == (2, 3, 1)


def test_without_an_unasked_handler_nothing_changes() -> None:
    facts: list[FinalFacts] = []
    service = AccessLogService(facts.append)
    service.handle(message(entry("u1"), entry("asked", asked=True)))
    assert [f.request_id for f in facts] == ["u1", "asked"]
    assert service.unasked == 0


async def test_an_exchange_whose_answer_envoy_dropped_is_joined_not_counted_again() -> None:
    """message_timeout: Envoy went on without our answer (no metadata), the exchange is
    parked; its entry finishes it and is not counted as un-asked too."""
    counted = Collect()
    join = AccessLogJoin(10.0, 10.0, unasked=UnaskedRequests([counted]).handle, namespace=NS)
    join.service.connected = True
    finished: list[FinalFacts | None] = []
    join.defer("late", finished.append, responded=True)
    join.defer("lean", finished.append, responded=False)
    join.service.handle(message(entry("late"), entry("other"), entry("lean")))
    assert [f.request_id if f else None for f in finished] == ["late", "lean"]
    assert [r.request_id for r in counted.records] == ["other"]
    assert join.pending() == 0


async def test_an_entry_before_its_open_exchange_closes_is_joined_not_counted() -> None:
    """Overload or message_timeout: the entry (no metadata: Envoy dropped our answer)
    arrives while the exchange is still open; it is kept for the exchange, which finishes
    with it once it closes, and is never counted as un-asked."""
    counted = Collect()
    join = AccessLogJoin(10.0, 10.0, unasked=UnaskedRequests([counted]).handle, namespace=NS)
    join.service.connected = True
    join.opened("busy")
    join.opened("lean")
    join.service.handle(message(entry("busy"), entry("lean"), entry("other")))
    assert [r.request_id for r in counted.records] == ["other"]
    finished: list[FinalFacts | None] = []
    join.defer("busy", finished.append, responded=True)
    join.defer("lean", finished.append, responded=False)
    assert [f.request_id if f else None for f in finished] == ["busy", "lean"]
    assert join.pending() == 0 and not join.awaited("busy")


def test_open_exchanges_remembered_are_bounded() -> None:
    join = AccessLogJoin(10.0, 10.0)
    for i in range(AccessLogJoin.MAX_OPEN + 5):
        join.opened(f"r{i}")
    assert not join.awaited("r0") and join.awaited(f"r{AccessLogJoin.MAX_OPEN + 4}")
    join.opened(None)
    join.opened("")
    assert not join.awaited("")


def test_record_of_an_unasked_entry() -> None:
    tenants = TenantResolver(TenantSettings(header="x-tenant"))
    unasked = UnaskedRequests([], path=lambda raw: raw.partition("?")[0] + "#redacted",
                              tenant=lambda h: tenants.resolve(h, {}))
    record = unasked.record(entry("r9", method=base_pb2.POST, status=201,
                                  original_path="/orig?sig=1", path="/rewritten?sig=1",
                                  headers={"x-tenant": "acme"}, duration_ns=12_500_000))
    assert (record.method, record.route, record.status, record.error_type) \
        == ("POST", None, 201, None)
    assert record.duration_s == pytest.approx(0.0125)
    assert record.path == "/orig#redacted"  # as the client sent it, through the redactor
    assert (record.request_id, record.tenant, record.response_body_size) == ("r9", "acme", 42)
    assert record.span_context is INVALID_SPAN_CONTEXT and record.started is False


def test_record_of_an_unasked_entry_has_its_upstream_phase() -> None:
    unasked = UnaskedRequests([])
    reached = unasked.record(entry("r1", upstream_ns=(1_200_000, 1_001_700_000)))
    assert reached.upstream_s == pytest.approx(1.0005)
    assert unasked.record(entry("r2")).upstream_s is None  # no upstream call logged
    sent_only = entry("r3")  # sent upstream, never answered (a reset or timeout)
    sent_only.common_properties.time_to_first_upstream_tx_byte.FromNanoseconds(1_000)
    assert unasked.record(sent_only).upstream_s is None


def test_record_without_redactor_tenant_or_response() -> None:
    record = UnaskedRequests([]).record(entry("r1", status=None, path="/p?token=secret",
                                              method=base_pb2.METHOD_UNSPECIFIED))
    assert record.path == "/p"  # never the query
    assert (record.method, record.status, record.error_type, record.tenant) \
        == ("_OTHER", None, "client_aborted", None)


@pytest.mark.parametrize(("status", "grpc", "flags"), [
    (200, None, ()), (404, None, ()), (503, None, ()), (503, None, ("UF",)),
    (504, None, ("UT",)), (200, None, ("UPE",)), (200, "14", ()), (200, "5", ()),
    (502, "13", ("UR",)), (None, None, ()), (None, None, ("DC",)),
])
def test_error_type_agrees_with_the_exchange_outcome(
        status: int | None, grpc: str | None, flags: tuple[str, ...]) -> None:
    final = FinalFacts("r", status, flags, None, None, grpc_status=grpc)
    expected = exchange_outcome(status, grpc, grpc is not None, None, {}, final, False)
    assert error_type(status, grpc, flags) == expected.error_type


def test_unasked_entries_are_counted_once_each_with_no_exemplar() -> None:
    metrics, reader = built(tenant_attribute=True)
    assert metrics.red is not None
    lines = Collect()
    unasked = UnaskedRequests([metrics.red, lines])
    service = AccessLogService(lambda f: None, on_unasked=unasked.handle, namespace=NS)
    # even inside a sampled span (the SDK falls back to the current context)
    span = TracerProvider().get_tracer("t").start_span("ambient")
    with use_span(span, end_on_exit=True):
        service.handle(message(*(entry(f"r{i}") for i in range(3)),
                               entry("asked", asked=True), entry("e", status=503)))
    points = {(p.attributes or {}).get("http.response.status_code"): p
              for p in metric(reader, REQUEST_DURATION).data.data_points}
    assert points[200].count == 3 and points[503].count == 1  # not the asked one
    assert dict(points[503].attributes or {})["error.type"] == "503"
    assert dict(points[200].attributes or {})["http.route"] == "_OTHER"
    assert not any(p.exemplars for p in points.values())
    assert unasked.counted == 4 and len(lines.records) == 4


def test_a_failing_observer_costs_neither_the_batch_nor_the_others() -> None:
    class Broken(Collect):
        def stream_finished(self, record: ExchangeRecord) -> None:
            raise RuntimeError("boom")
    good = Collect()
    UnaskedRequests([Broken(), good]).handle([entry("a"), entry("b")])
    assert [r.request_id for r in good.records] == ["a", "b"]


def test_the_access_line_of_an_unasked_request_has_null_trace_ids() -> None:
    record = UnaskedRequests([]).record(entry("r1"))
    line = json.loads(AccessLog.line(record))
    assert (line["trace_id"], line["span_id"], line["trace_flags"]) == (None, None, None)
    assert (line["method"], line["path"], line["status"], line["request_id"]) \
        == ("GET", "/a", 200, "r1")
    fields = AccessLog.fields(record)
    assert fields["trace_id"] is None and fields["duration_ms"] == 12.5


async def test_a_span_started_on_response_headers_sets_our_metadata() -> None:
    """Full config, a filter denied before ext_proc: the stream opens with the response.
    The session counts it; its entry must carry our namespace or it is counted again."""
    deps = StreamDeps(tracer=TracerProvider().get_tracer("t"),
                      propagator=PropagatorCache(Rejections()).get(PropagationSettings()),
                      attributes_namespace="envoy.filters.http.ext_proc",
                      metadata_namespace=NS)
    req = ext_pb.ProcessingRequest()
    req.response_headers.headers.headers.add(key=":status", raw_value=b"403")
    answer = StreamSession(deps).handle(req)
    assert answer.WhichOneof("response") == "response_headers"
    ids = answer.dynamic_metadata.fields[NS].struct_value.fields
    assert len(ids["trace_id"].string_value) == 32 and len(ids["span_id"].string_value) == 16


def test_an_unasked_request_gets_the_route_template_its_asked_ones_taught() -> None:
    routes = RouteTemplates()
    unasked = UnaskedRequests([], routes=routes)
    named = entry("u1")
    named.common_properties.route_name = "users_by_id"
    assert unasked.record(named).route is None  # nothing learnt yet: _OTHER
    routes.stream_finished(ExchangeRecord(
        method="GET", route="/api/users/{id}", status=200, error_type=None, duration_s=0.01,
        span_context=INVALID_SPAN_CONTEXT, route_name="users_by_id"))
    record = unasked.record(named)
    assert record.route == "/api/users/{id}" and record.route_name == "users_by_id"
    other = entry("u2")
    other.common_properties.route_name = "health"
    assert unasked.record(other).route is None


def test_route_templates_are_bounded() -> None:
    routes = RouteTemplates()
    for i in range(RouteTemplates.MAX_ROUTES + 10):
        routes.stream_finished(ExchangeRecord(
            method="GET", route=f"/r{i}", status=200, error_type=None, duration_s=0.0,
            span_context=INVALID_SPAN_CONTEXT, route_name=f"route{i}"))
    assert routes.get("route0") == "/r0"
    assert routes.get(f"route{RouteTemplates.MAX_ROUTES}") is None
    routes.stream_finished(ExchangeRecord(
        method="GET", route="/moved", status=200, error_type=None, duration_s=0.0,
        span_context=INVALID_SPAN_CONTEXT, route_name="route0"))
    assert routes.get("route0") == "/moved"  # a known route may change its template


def test_final_facts_name_envoys_route() -> None:
    named = entry("r9")
    named.common_properties.route_name = "users_by_id"
    facts = final_facts(named)
    assert facts is not None and facts.route_name == "users_by_id"


def test_cached_paths_redact_as_the_redactor_does_and_never_key_on_the_query() -> None:
    from ext_proc.config import RedactionSettings
    from ext_proc.policy.redaction import Redactor

    redactor = Redactor(RedactionSettings())
    calls: list[str] = []

    def redact(raw: str) -> str:
        calls.append(raw)
        return redactor.path_and_query(raw)[0]
    cached = CachedPaths(redact, size=2)
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
    for raw in ("/a;jsessionid=s3cret?token=t1", "/a;jsessionid=s3cret?token=t2",
                f"/t/{jwt}#frag?x=1", "http://u:p@h/x?q=1", "/b", "/c"):
        assert cached(raw) == redactor.path_and_query(raw)[0]
    assert all("?" not in call and "token" not in call for call in calls)
    assert calls.count("/a;jsessionid=s3cret") == 1  # the second one was remembered
    long = "/" + "x" * 2000 + "?token=t"
    assert cached(long) == redactor.path_and_query(long)[0]


async def test_an_entry_read_before_its_exchange_opened_still_ends_it() -> None:
    """Overload: the entry (no metadata: Envoy dropped our late answer) is read before
    the exchange's first message; it is counted as un-asked, and the exchange, once it
    closes, finds it at once instead of waiting response_wait_s for it."""
    counted = Collect()
    join = AccessLogJoin(10.0, 300.0, unasked=UnaskedRequests([counted]).handle, namespace=NS)
    join.service.connected = True
    join.service.handle(message(entry("early", status=204)))
    assert [r.request_id for r in counted.records] == ["early"]
    finished: list[FinalFacts | None] = []
    join.defer("early", finished.append, responded=False)
    assert [f.response_code if f else None for f in finished] == [204]
    assert join.pending() == 0


def _mixed_batch() -> list[log_pb.HTTPAccessLogEntry]:
    """Un-asked entries of several attribute sets, with and without a response body or
    an upstream phase, in an interleaved order."""
    found = []
    for i in range(60):
        found.append(entry(f"m{i}", status=(200, 503, None, 404)[i % 4],
                           method=(base_pb2.GET, base_pb2.POST)[i % 3 == 0],
                           duration_ns=1_000_000 * (i % 7) + 17 * i,
                           **({"upstream_ns": (10_000, 10_000 + 90_000 * i)} if i % 5 else {})))
    return found


def _points(reader: Any, name: str) -> list[tuple[Any, ...]]:
    """Each point's attributes and values (a histogram's, or a sum's value)."""
    return sorted((sorted((p.attributes or {}).items()), *(
        (p.count, p.sum, p.min, p.max, tuple(p.bucket_counts), len(p.exemplars))
        if hasattr(p, "bucket_counts") else (p.value,)))
        for p in metric(reader, name).data.data_points)


def _red_pair(limit: int = 2000, exemplars: str = "trace_based") -> tuple[Any, ...]:
    settings = {"cardinality_limit": limit, "tenant_attribute": True}
    env = {"OTEL_METRICS_EXEMPLAR_FILTER": exemplars}
    one_reader, many_reader = InMemoryMetricReader(), InMemoryMetricReader()
    one = build_metrics(MetricsSettings(**settings), readers=(one_reader,), env=env)
    many = build_metrics(MetricsSettings(**settings), readers=(many_reader,), env=env)
    assert one.red is not None and many.red is not None
    return one.red, one_reader, many.red, many_reader


def _same_points(one_reader: Any, many_reader: Any) -> None:
    for name in (REQUEST_DURATION, RESPONSE_BODY_SIZE, GATEWAY_ADDED, ACTIVE_REQUESTS):
        want = _points(one_reader, name)
        assert _points(many_reader, name) == want, name
        assert want, name


def test_a_batch_counts_what_one_call_per_request_counts() -> None:
    """RED metrics: `streams_finished` for a batch gives exactly the points that
    `stream_finished` for each record gives."""
    one, one_reader, many, many_reader = _red_pair()
    records = [UnaskedRequests([]).record(e) for e in _mixed_batch()]
    one.stream_started("GET", "/a")  # an asked exchange elsewhere: active stays 1
    many.stream_started("GET", "/a")
    for record in records:
        one.stream_finished(record)
    many.streams_finished(records)
    _same_points(one_reader, many_reader)
    assert len(_points(one_reader, REQUEST_DURATION)) >= 6  # several attribute sets


def test_a_batch_with_an_asked_exchange_in_it_counts_it_as_asked() -> None:
    one, one_reader, many, many_reader = _red_pair(exemplars="always_on")
    records = [UnaskedRequests([]).record(e) for e in _mixed_batch()[:10]]
    sampled = SpanContext(7, 8, is_remote=False, trace_flags=TraceFlags(1))
    asked = ExchangeRecord(method="GET", route="/a", status=200, error_type=None,
                           duration_s=0.003, span_context=sampled)
    for red in (one, many):
        red.stream_started("GET", "/a")
        red.stream_started("GET", "/a")
    for record in (*records[:5], asked, *records[5:]):
        one.stream_finished(record)
    many.streams_finished([*records[:5], asked, *records[5:]])
    _same_points(one_reader, many_reader)
    (active,) = metric(many_reader, ACTIVE_REQUESTS).data.data_points
    assert active.value == 1  # the asked one finished: its start is undone


def test_at_the_cardinality_limit_a_batch_overflows_the_sets_one_call_each_would() -> None:
    """The first sets to get a value in a table get its points: in the added-time table
    that is not the batch's first set when its first request had no upstream phase."""
    one, one_reader, many, many_reader = _red_pair(limit=2, exemplars="always_on")
    upstream = {"upstream_ns": (1_000, 9_000)}
    records = [UnaskedRequests([]).record(e) for e in (
        entry("x1", method=base_pb2.GET),  # set X, no upstream phase
        entry("y1", method=base_pb2.PUT, **upstream),  # set Y
        entry("z1", method=base_pb2.POST, **upstream),  # set Z
        entry("x2", method=base_pb2.GET, **upstream))]  # set X again, with one
    one.stream_started("GET", "/a")  # an asked exchange in flight, on both
    many.stream_started("GET", "/a")
    for record in records:
        one.stream_finished(record)
    many.streams_finished(records)
    _same_points(one_reader, many_reader)
    methods = [dict(p[0]).get("http.request.method") for p in _points(one_reader, GATEWAY_ADDED)]
    assert sorted(m for m in methods if m) == ["POST", "PUT"]  # X overflowed there


@pytest.mark.parametrize("direct", [True, False], ids=["direct-sink", "through-loguru"])
def test_a_batch_of_access_lines_is_the_lines_one_at_a_time(direct: bool) -> None:
    out = io.StringIO()
    logs.configure_logging(LogSettings(format="json", level="INFO"), out)
    try:
        if not direct:
            logs.sink_added()  # as with a second sink: lines go through loguru
        sink = logs.direct_sink()
        assert (sink is not None) == direct
        records = [UnaskedRequests([]).record(e) for e in _mixed_batch()]
        for record in records:
            AccessLog().stream_finished(record)
        AccessLog().streams_finished(records)
        logger.complete()
        if sink is not None:
            sink.stop()  # flush its batch
    finally:
        logger.remove()
        logs.sink_added()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        assert line.pop("ts")
    assert len(lines) == 2 * len(records)
    assert lines[:len(records)] == lines[len(records):]
    assert [line["request_id"] for line in lines[:3]] == ["m0", "m1", "m2"]


def test_a_record_that_cannot_be_written_costs_only_its_own_line() -> None:
    out = io.StringIO()
    logs.configure_logging(LogSettings(format="json", level="INFO"), out)
    try:
        sink = logs.direct_sink()
        assert sink is not None
        good = [UnaskedRequests([]).record(e) for e in _mixed_batch()[:3]]
        broken = dataclasses.replace(good[0], duration_s=None, request_id="broken")
        AccessLog().streams_finished([good[0], broken, *good[1:]])
        sink.stop()
    finally:
        logger.remove()
        logs.sink_added()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines if line["msg"] == "access"] \
        == ["m0", "m1", "m2"]
    assert [line["request_id"] for line in lines if line["level"] == "ERROR"] == ["broken"]
