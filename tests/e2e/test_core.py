"""Issue #2: one request, one span, behind a real Envoy 1.40."""

from __future__ import annotations

import statistics

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import Stack, wait_until
from tests.conftest import http_request
from tests.e2e.conftest import (
    SERVER_KIND,
    STATUS_ERROR,
    abort_in_flight,
    assert_outcome,
    gateway_spans,
    tag,
    wait_gateway_span,
    with_query,
)

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def assert_traceparent(values: list[str], span: ReceivedSpan) -> None:
    """Exactly one traceparent naming the gateway span, sampled (the SDK may add the
    W3C level-2 random-trace-id flag 0x02 to a trace it starts)."""
    assert len(values) == 1
    version, trace_id, parent_id, flags = values[0].split("-")
    assert (version, trace_id, parent_id) == ("00", span.trace_id, span.span_id)
    assert flags in {"01", "03"}


def test_one_span_per_request(stack: Stack, receiver: OtlpReceiver) -> None:
    tags = [tag() for _ in range(5)]
    for t in tags:
        assert http_request(stack.base_url, f"/api/users?tag={t}").status == 200
    for t in tags:
        span = wait_gateway_span(receiver, with_query(t))
        assert span.kind == SERVER_KIND
        assert span.name == "GET /api/users"
        assert span.attributes["http.route"] == "/api/users"
    # all batches are in once the users service's spans for the last tag arrived
    last = wait_gateway_span(receiver, with_query(tags[-1]))
    assert receiver.wait_for(lambda: any(
        s.trace_id == last.trace_id and s.resource.get("service.name") == "users"
        for s in receiver.spans()), 10)
    for t in tags:
        assert len(gateway_spans(receiver, with_query(t))) == 1, t


def test_incoming_traceparent_makes_gateway_span_a_child(
        stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}", headers=[
        ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
        ("tracestate", "vendor=abc"), ("tracestate", "other=1")])
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.trace_id == TRACE_ID
    assert span.parent_span_id == PARENT_ID
    received = reply.json()["headers"]
    assert received["traceparent"] == [f"00-{TRACE_ID}-{span.span_id}-01"]
    assert received["tracestate"] == ["vendor=abc,other=1"]


def test_upstream_service_continues_the_trace(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    assert http_request(stack.base_url, f"/api/users/1?tag={t}").status == 200
    gateway = wait_gateway_span(receiver, with_query(t))
    assert gateway.name == "GET /api/users/{id}"

    def service_span() -> list:
        return [s for s in receiver.spans() if s.trace_id == gateway.trace_id
                and s.resource.get("service.name") == "users" and s.kind == SERVER_KIND]
    assert receiver.wait_for(lambda: bool(service_span()), 10)
    assert service_span()[0].parent_span_id == gateway.span_id


@pytest.mark.parametrize("traceparent", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper-case hex
    "garbage",
])
def test_invalid_traceparent_starts_a_new_trace(
        stack: Stack, receiver: OtlpReceiver, traceparent: str) -> None:
    t = tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}",
                         headers=[("traceparent", traceparent)])
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.parent_span_id == ""
    assert span.trace_id not in traceparent.lower()
    assert_traceparent(reply.json()["headers"]["traceparent"], span)


def test_two_traceparent_headers_are_invalid(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}", headers=[
        ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
        ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.trace_id != TRACE_ID and span.parent_span_id == ""
    assert_traceparent(reply.json()["headers"]["traceparent"], span)


@pytest.mark.parametrize(("path", "status", "error", "flag"), [
    ("/api/users", 200, None, None),
    ("/no-such-route", 404, None, "NR"),
    ("/down", 503, "upstream_connection_failure", "UF"),
    ("/status/500", 500, "500", None),
])
def test_status_code_and_span_status(stack: Stack, receiver: OtlpReceiver, path: str,
                                     status: int, error: str | None, flag: str | None) -> None:
    t = tag()
    assert http_request(stack.base_url, f"{path}?tag={t}").status == status
    span = wait_gateway_span(receiver, with_query(t))
    assert_outcome(span, status, error, flag)
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["url.path"] == path
    assert span.attributes["url.scheme"] == "http"
    assert span.attributes["server.address"] == "127.0.0.1"
    assert span.attributes["client.address"] == "127.0.0.1"
    assert span.attributes["network.protocol.version"] == "1.1"


def test_client_abort_gives_an_error_span(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    abort_in_flight(stack, t, ms=5000)
    span = wait_gateway_span(receiver, with_query(t))
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "client_aborted"
    assert "http.response.status_code" not in span.attributes
    assert span.duration_ms < 4000  # ended at the abort, not when /slow would have answered


def test_access_log_line_carries_the_span_ids(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    reply = http_request(stack.base_url, f"/api/users?tag={t}",
                         headers=[("user-agent", "e2e-test")])
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.attributes["user_agent.original"] == "e2e-test"
    def access() -> list[dict[str, object]]:
        return [line for line in stack.sidecar_lines()
                if line.get("msg") == "access" and line.get("trace_id") == span.trace_id]
    wait_until(lambda: bool(access()), 5, "the sidecar's access line")
    lines = access()
    assert len(lines) == 1
    line = lines[0]
    assert line["span_id"] == span.span_id
    assert int(line["trace_flags"], 16) & 1  # sampled
    assert line["method"] == "GET" and line["status"] == 200
    assert line["path"] == "/api/users"
    assert line["request_id"] == span.attributes["envoy.request_id"]
    # and Envoy's own access log joins the trace through our dynamic metadata
    wait_until(lambda: any(a.get("trace_id") == span.trace_id for a in stack.access_lines()),
               10, "Envoy access log line")
    envoy_line = next(a for a in stack.access_lines() if a.get("trace_id") == span.trace_id)
    assert envoy_line["span_id"] == span.span_id
    assert envoy_line["request_id"] == line["request_id"]


def test_span_duration_matches_envoys_duration(stack: Stack, receiver: OtlpReceiver) -> None:
    tags = [tag() for _ in range(40)]
    for i, t in enumerate(tags):
        path = f"/slow?ms={5 * (i % 4)}&tag={t}" if i % 2 else f"/api/users?tag={t}"
        assert http_request(stack.base_url, path).status == 200
    spans = {t: wait_gateway_span(receiver, with_query(t)) for t in tags}
    by_request_id = {s.attributes["envoy.request_id"]: s for s in spans.values()}
    wait_until(lambda: len([a for a in stack.access_lines()
                            if a.get("request_id") in by_request_id]) == len(tags),
               10, "Envoy access log lines")
    diffs = []
    for line in stack.access_lines():
        span = by_request_id.get(line.get("request_id"))
        if span is not None:
            diffs.append(abs(span.duration_ms - float(line["duration_ms"])))
    diffs.sort()
    p50 = statistics.median(diffs)
    p99 = diffs[min(len(diffs) - 1, int(len(diffs) * 0.99))]
    print(f"span vs Envoy %DURATION%: n={len(diffs)} p50={p50:.2f} ms p99={p99:.2f} ms")
    assert len(diffs) == len(tags)
    assert p99 <= 20.0
