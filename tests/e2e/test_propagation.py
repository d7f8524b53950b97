"""Issue #3 through a real Envoy: real gRPC and HTTP clients in every format."""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import Stack
from tests.conftest import http_request
from tests.e2e.conftest import gateway_spans, tag, wait_gateway_span, with_query

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
STATUS_ERROR = 2


def _traceparent_of(value: str) -> tuple[str, str, int]:
    version, trace_id, parent, flags = value.split("-")
    assert version == "00"
    return trace_id, parent, int(flags, 16)


def _grpc_trace_bin(trace_id: str, span_id: str, sampled: bool) -> bytes:
    """OpenCensus BinaryEncoding v0: 00 | 00 trace[16] | 01 span[8] | 02 options[1]."""
    return (b"\x00\x00" + bytes.fromhex(trace_id) + b"\x01" + bytes.fromhex(span_id)
            + b"\x02" + (b"\x01" if sampled else b"\x00"))


def _gateway_for_trace(receiver: OtlpReceiver, trace_id: str, name: str) -> ReceivedSpan:
    return wait_gateway_span(receiver, lambda s: s.trace_id == trace_id and s.name == name)


def test_grpc_client_with_grpc_trace_bin_joins_the_w3c_trace(
        stack: Stack, receiver: OtlpReceiver) -> None:
    trace_id = tag()  # 32 hex chars: a fresh trace per test run
    with grpc.insecure_channel(stack.grpc_target) as channel:
        user = users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(id=1), timeout=10,
            metadata=[("grpc-trace-bin", _grpc_trace_bin(trace_id, SPAN_ID, True))])
    span = _gateway_for_trace(receiver, trace_id, "demo.v1.Users/GetUser")
    assert span.parent_span_id == SPAN_ID
    got_trace, got_parent, flags = _traceparent_of(user.received_metadata["traceparent"])
    assert (got_trace, got_parent) == (trace_id, span.span_id) and flags & 1
    attrs = span.attributes
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "demo.v1.Users" and attrs["rpc.method"] == "GetUser"
    assert attrs["rpc.grpc.status_code"] == 0 and span.status_code != STATUS_ERROR
    assert attrs["http.response.status_code"] == 200


def test_per_route_override_injects_grpc_trace_bin(stack: Stack, receiver: OtlpReceiver) -> None:
    """A route to a legacy backend asks (grpc_initial_metadata) for grpc-trace-bin too;
    other routes keep W3C only. (gRPC servers hide grpc-* metadata from applications,
    so the HTTP echo upstream shows what Envoy really sent.)"""
    trace_id = tag()
    incoming = base64.b64encode(_grpc_trace_bin(trace_id, SPAN_ID, True)).decode()
    legacy = http_request(stack.base_url, "/legacy-echo",
                          headers=[("grpc-trace-bin", incoming)]).json()["headers"]
    span = _gateway_for_trace(receiver, trace_id, "GET")
    (value,) = legacy["grpc-trace-bin"]
    assert "=" not in value  # emitted unpadded
    assert base64.b64decode(value + "==") == _grpc_trace_bin(trace_id, span.span_id, True)
    assert _traceparent_of(legacy["traceparent"][0])[:2] == (trace_id, span.span_id)
    plain = http_request(stack.base_url, "/echo",
                         headers=[("grpc-trace-bin", incoming)]).json()["headers"]
    assert "grpc-trace-bin" not in plain  # transcoded to traceparent, stale copy cleared
    assert _traceparent_of(plain["traceparent"][0])[0] == trace_id


@pytest.mark.parametrize(("code", "error"), [(14, "UNAVAILABLE"), (5, None), (13, "INTERNAL")])
def test_grpc_failure_over_http_200(stack: Stack, receiver: OtlpReceiver, code: int,
                                    error: str | None) -> None:
    trace_id = tag()
    with grpc.insecure_channel(stack.grpc_target) as channel, \
            pytest.raises(grpc.RpcError) as failure:
        users_pb2_grpc.UsersStub(channel).Fail(
            users_pb2.FailRequest(code=code, message="boom"), timeout=10,
            metadata=[("traceparent", f"00-{trace_id}-{SPAN_ID}-01")])
    assert failure.value.code().value[0] == code
    span = _gateway_for_trace(receiver, trace_id, "demo.v1.Users/Fail")
    assert span.attributes["rpc.grpc.status_code"] == code
    assert span.attributes["http.response.status_code"] == 200
    assert (span.status_code == STATUS_ERROR) is (error is not None)
    assert span.attributes.get("error.type") == error


@pytest.mark.parametrize("headers", [
    [("b3", f"{TRACE_ID}-{SPAN_ID}-1")],
    [("x-b3-traceid", TRACE_ID), ("x-b3-spanid", SPAN_ID), ("x-b3-sampled", "1")],
    [("uber-trace-id", f"{TRACE_ID}:{SPAN_ID}:0:1"), ("uberctx-user", "alice")],
    [("uber-trace-id", f"{TRACE_ID}%3A{SPAN_ID}%3A0%3A1")],
], ids=["b3-single", "b3-multi", "jaeger", "jaeger-urlencoded"])
def test_http_clients_in_other_formats_get_a_w3c_upstream(
        stack: Stack, receiver: OtlpReceiver, headers: list[tuple[str, str]]) -> None:
    t = tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}", headers=headers)
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.trace_id == TRACE_ID and span.parent_span_id == SPAN_ID
    received = reply.json()["headers"]
    (traceparent,) = received["traceparent"]
    assert _traceparent_of(traceparent)[:2] == (TRACE_ID, span.span_id)
    # the stale incoming format is cleared: no contradicting contexts upstream
    for name, _ in headers:
        if not name.startswith("uberctx-"):
            assert name not in received
    if ("uberctx-user", "alice") in headers:
        assert "user=alice" in received["baggage"][0]


def test_b3_64bit_trace_id_is_left_padded(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    short = "a3ce929d0e0e4736"
    reply = http_request(stack.base_url, f"/echo?tag={t}",
                         headers=[("b3", f"{short}-{SPAN_ID}-1")])
    span = wait_gateway_span(receiver, with_query(t))
    assert span.trace_id == "0" * 16 + short
    assert _traceparent_of(reply.json()["headers"]["traceparent"][0])[0] == span.trace_id


def test_b3_multi_with_a_legacy_sampled_value_continues_the_trace(
        stack: Stack, receiver: OtlpReceiver) -> None:
    """#19 item 5: X-B3-Sampled: True (outside 0/1) keeps the ids and means sampled."""
    trace_id, t = tag(), tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}", headers=[
        ("X-B3-TraceId", trace_id), ("X-B3-SpanId", SPAN_ID), ("X-B3-Sampled", "True")])
    assert reply.status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.trace_id == trace_id and span.parent_span_id == SPAN_ID
    got_trace, got_parent, flags = _traceparent_of(reply.json()["headers"]["traceparent"][0])
    assert (got_trace, got_parent) == (trace_id, span.span_id) and flags & 1


def test_baggage_passes_through(stack: Stack, receiver: OtlpReceiver) -> None:
    t = tag()
    baggage = "userId=alice,serverNode=DF%2028;prop=1,isProduction=false"
    reply = http_request(stack.base_url, f"/echo?tag={t}", headers=[("baggage", baggage)])
    assert reply.json()["headers"]["baggage"] == [baggage]


def test_b3_deny_is_honoured(stack: Stack, receiver: OtlpReceiver) -> None:
    reply = http_request(stack.base_url, "/echo?tag=deny", headers=[("b3", "0")])
    (traceparent,) = reply.json()["headers"]["traceparent"]
    assert _traceparent_of(traceparent)[2] & 1 == 0
    assert not gateway_spans(receiver, with_query("deny"))


def test_trace_id_goes_back_to_the_client_when_asked(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    env = {"EXTPROC_PROPAGATION__RESPONSE": "traceresponse,server-timing",
           "EXTPROC_PROPAGATION__RESPONSE_HEADER": "x-trace-id"}
    try:
        with Stack(tmp_path, receiver.endpoint, sidecar_env=env) as stack:
            t = tag()
            reply = http_request(stack.base_url, f"/api/users?tag={t}")
            span = wait_gateway_span(receiver, with_query(t))
    finally:
        receiver.stop()
    assert reply.headers["x-trace-id"] == [span.trace_id]
    trace_id, span_id, _ = _traceparent_of(reply.headers["traceresponse"][0])
    assert (trace_id, span_id) == (span.trace_id, span.span_id)
    timing = ",".join(reply.headers["server-timing"])
    assert f"trace;desc=00-{span.trace_id}-{span.span_id}-" in timing
