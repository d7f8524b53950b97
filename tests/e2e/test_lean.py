"""The shipped envoy/envoy.yaml is lean: Envoy skips the response phase; the sidecar
learns every ending from Envoy's gRPC access log and still makes exactly one correct
span (tests/e2e/test_endings.py runs every ending behind both configs)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import ENVOY_YAML, Stack, wait_until
from tests.conftest import http_request
from tests.e2e.conftest import (
    STATUS_ERROR,
    abort_in_flight,
    add_test_routes,
    assert_outcome,
    gateway_spans,
    tag,
    wait_gateway_span,
    with_query,
)

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OtlpReceiver]]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        with Stack(tmp_path_factory.mktemp("lean"), receiver.endpoint,
                   envoy_source=ENVOY_YAML, mutate_config=add_test_routes) as stack:
            yield stack, receiver
    finally:
        receiver.stop()


def test_the_first_request_is_joined_too(lean: tuple[Stack, OtlpReceiver]) -> None:
    """Envoy opens its access-log stream with its first entry: the sidecar's very first
    exchange must still wait for it (module fixture: this runs on a fresh sidecar)."""
    stack, receiver = lean
    assert not gateway_spans(receiver, lambda s: True)
    t = tag()
    assert http_request(stack.base_url, f"/echo?tag={t}").status == 200
    span = wait_gateway_span(receiver, with_query(t))
    assert span.attributes["http.response.status_code"] == 200
    assert span.status_code != STATUS_ERROR


@pytest.mark.parametrize(("path", "status", "error", "flag"), [
    ("/api/users", 200, None, None),
    ("/no-such-route", 404, None, "NR"),
    ("/down", 503, "upstream_connection_failure", "UF"),
    ("/status/500", 500, "500", None),
])
def test_status_and_errors_from_the_access_log(lean: tuple[Stack, OtlpReceiver], path: str,
                                               status: int, error: str | None,
                                               flag: str | None) -> None:
    stack, receiver = lean
    t = tag()
    reply = http_request(stack.base_url, f"{path}?tag={t}")
    assert reply.status == status
    span = wait_gateway_span(receiver, with_query(t))
    assert_outcome(span, status, error, flag)
    assert span.attributes["http.response.body.size"] == len(reply.body)
    assert len(gateway_spans(receiver, with_query(t))) == 1


def test_the_span_ends_when_the_response_does(lean: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = lean
    t = tag()
    reply = http_request(stack.base_url, f"/slow?ms=300&tag={t}")
    span = wait_gateway_span(receiver, with_query(t))
    assert reply.status == 200
    assert span.duration_ms >= 300  # not the instant the ext_proc stream closed
    wait_until(lambda: any(a.get("trace_id") == span.trace_id for a in stack.access_lines()),
               10, "Envoy's access log line")
    line = next(a for a in stack.access_lines() if a.get("trace_id") == span.trace_id)
    assert abs(span.duration_ms - float(line["duration_ms"])) <= 2.0  # Envoy's own %DURATION%


def test_traceparent_still_goes_upstream(lean: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = lean
    t = tag()
    reply = http_request(stack.base_url, f"/echo?tag={t}")
    span = wait_gateway_span(receiver, with_query(t))
    (traceparent,) = reply.json()["headers"]["traceparent"]
    assert traceparent.split("-")[1:3] == [span.trace_id, span.span_id]


@pytest.mark.parametrize(("code", "error"), [(14, "UNAVAILABLE"), (5, None)])
def test_grpc_status_from_the_access_log(lean: tuple[Stack, OtlpReceiver], code: int,
                                         error: str | None) -> None:
    stack, receiver = lean
    trace_id = tag()
    with grpc.insecure_channel(stack.grpc_target) as channel, pytest.raises(grpc.RpcError):
        users_pb2_grpc.UsersStub(channel).Fail(
            users_pb2.FailRequest(code=code, message="x"), timeout=10,
            metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    span = wait_gateway_span(receiver, lambda s: s.trace_id == trace_id)
    assert span.attributes["rpc.grpc.status_code"] == code
    assert span.attributes.get("error.type") == error


def test_client_abort(lean: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = lean
    t = tag()
    abort_in_flight(stack, t)
    span = wait_gateway_span(receiver, with_query(t))
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "client_aborted"
    assert "DC" in span.attributes["envoy.response_flags"]
    assert "http.response.status_code" not in span.attributes
