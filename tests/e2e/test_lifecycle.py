"""Issue #2: graceful shutdown, and the standard OTEL_* variables, on a real stack."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan, decode_spans
from ext_proc.dev.devstack import Stack, wait_until
from ext_proc.dev.procs import grpc_health
from tests.conftest import Reply, http_request
from tests.e2e.conftest import tag, wait_gateway_span, with_query

pytestmark = pytest.mark.e2e


def _health_of(port: int) -> str:
    return grpc_health(f"127.0.0.1:{port}", timeout=0.5)


def test_sigterm_finishes_in_flight_requests_and_flushes_spans(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    stack = Stack(tmp_path, receiver.endpoint,
                  sidecar_env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})  # only a flush exports
    try:
        stack.start()
        t = tag()
        replies: list[Reply] = []
        client = threading.Thread(target=lambda: replies.append(
            http_request(stack.base_url, f"/slow?ms=1500&tag={t}")))
        client.start()
        wait_until(lambda: stack.envoy_stat("cluster.users.upstream_rq_active") >= 1, 10,
                   "the request to be in flight")
        assert _health_of(stack.ports.sidecar) == "SERVING"
        signalled = time.monotonic()
        assert stack.sidecar.popen is not None
        stack.sidecar.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: _health_of(stack.ports.sidecar) != "SERVING", 5, "health to flip")
        client.join(10)
        assert replies and replies[0].status == 200
        code = stack.sidecar.popen.wait(10)
        elapsed = time.monotonic() - signalled
        assert code == 0
        assert elapsed < 5.0 + 2.0  # the grace period, plus the flush
        span = wait_gateway_span(receiver, with_query(t), timeout=5)
        assert span.attributes["http.response.status_code"] == 200
        messages = [line.get("msg") for line in stack.sidecar_lines()]
        assert "started" in messages and "stopping" in messages and messages[-1] == "stopped"
    finally:
        stack.stop()
        receiver.stop()


class _HttpOtlp(ThreadingHTTPServer):
    """A real OTLP/HTTP (protobuf) trace receiver that keeps the request headers."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HttpOtlpHandler)
        self.spans: list[ReceivedSpan] = []
        self.headers_seen: list[dict[str, str]] = []
        self.cond = threading.Condition()


class _HttpOtlpHandler(BaseHTTPRequestHandler):
    server: _HttpOtlp

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.server.cond:
            self.server.spans.extend(decode_spans(request))
            self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
            self.server.cond.notify_all()
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def http_otlp() -> Iterator[_HttpOtlp]:
    server = _HttpOtlp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_standard_otel_variables_are_honoured(tmp_path: Path, http_otlp: _HttpOtlp) -> None:
    port = http_otlp.server_address[1]
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant-token=abc123",
        "OTEL_SERVICE_NAME": "edge-gateway",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,team=platform",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with Stack(tmp_path, None, sidecar_env=env) as stack:
        t = tag()
        assert http_request(stack.base_url, f"/echo?tag={t}").status == 200
        with http_otlp.cond:
            assert http_otlp.cond.wait_for(lambda: any(
                f"tag={t}" in str(s.attributes.get("url.query")) for s in http_otlp.spans), 10)
        span = next(s for s in http_otlp.spans if f"tag={t}" in str(s.attributes["url.query"]))
    assert span.resource["service.name"] == "edge-gateway"
    assert span.resource["deployment.environment.name"] == "test"
    assert span.resource["team"] == "platform"
    assert all(h.get("x-tenant-token") == "abc123" for h in http_otlp.headers_seen)


def test_otel_traces_sampler_always_off_still_propagates(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        with Stack(tmp_path, receiver.endpoint,
                   sidecar_env={"OTEL_TRACES_SAMPLER": "always_off"}) as stack:
            reply = http_request(stack.base_url, "/echo?tag=off")
            assert reply.status == 200
            (traceparent,) = reply.json()["headers"]["traceparent"]
            assert int(traceparent.split("-")[3], 16) & 1 == 0  # not sampled, still sent
            # the users service follows the decision: nothing at all is exported
            assert http_request(stack.base_url, "/api/users").status == 200
            def traced() -> bool:  # anything but the upstreams' own readiness probes
                return any(s.attributes.get("url.path") != "/healthz" for s in receiver.spans())
            assert not receiver.wait_for(traced, 1.0)
    finally:
        receiver.stop()
