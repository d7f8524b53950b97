"""Phase spans (#19, item 1) on a real Envoy: filters, upstream and response, timed by
Envoy's own clock from its gRPC access log, behind the lean and the full config.

An upstream that holds its response headers and then its body for fixed times, and
Envoy's fault filter (after ext_proc) holding the request, give each phase a known
duration; the failures (no route, connect failure, client abort, a retry) must give
the phases that happened and no others.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import (
    ENVOY_YAML,
    FULL_YAML,
    Config,
    Stack,
    add_dead_route,
    hcm_of,
    static_cluster,
)
from tests.conftest import http_request
from tests.e2e.conftest import (
    SERVER_KIND,
    SIDECAR_SERVICE,
    STATUS_ERROR,
    gateway_spans,
    route_with_options,
    tag,
    wait_gateway_span,
    with_query,
)

pytestmark = pytest.mark.e2e

INTERNAL_KIND, CLIENT_KIND = 1, 3
FAULT_MS, HEAD_MS, BODY_MS = 150, 100, 200  # injected: request, response headers, body
TOLERANCE_MS = 30  # a loaded 2-core box; ordering and containment are asserted exactly
MODES = {"lean": ENVOY_YAML, "full": FULL_YAML}


class Paced(ThreadingHTTPServer):
    """An upstream that records the traceparent it got, by the request's tag, and:
    /paced holds its response headers head_ms, then its body body_ms; /flaky answers a
    tag's first attempt 503 and its second 200; /hold sends its headers and then waits
    for the client to leave."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.traceparents: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    server: Paced
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.server.lock:
            seen = self.server.traceparents.setdefault(query.get("tag", ""), [])
            seen.append(self.headers.get("traceparent", ""))
            attempt = len(seen)
        if url.path.endswith("/flaky") and attempt == 1:
            self._send(503, b"try again")
            return
        self.server.stop.wait(int(query.get("head_ms", 0)) / 1000)  # the injected delay
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        if url.path.endswith("/hold"):
            with contextlib.suppress(OSError):  # until the client (so Envoy) leaves
                self.connection.settimeout(10)
                self.connection.recv(1)
            return
        self.server.stop.wait(int(query.get("body_ms", 0)) / 1000)
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _delay_filter() -> Config:
    """Envoy's fault filter, placed after ext_proc: it holds requests that ask for it."""
    return {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "delay": {"fixed_delay": f"{FAULT_MS / 1000}s", "percentage": {"numerator": 100}},
        "headers": [{"name": "x-phase-delay", "present_match": True}]}}


@pytest.fixture(scope="module", params=list(MODES))
def phased(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Stack, OtlpReceiver, Paced]]:
    receiver = OtlpReceiver()
    receiver.start()
    upstream = Paced()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()

    def mutate(config: Config) -> None:
        add_dead_route(config)
        hcm = hcm_of(config)
        filters = hcm["http_filters"]
        filters.insert(len(filters) - 1, _delay_filter())  # just before the router
        config["static_resources"]["clusters"].append(
            static_cluster("paced", upstream.server_address[1]))
        off = route_with_options("/phases-off", "paced", {"x-extproc-otel-phase-spans": "off"})
        off["route"] = {"cluster": "paced"}
        hcm["route_config"]["virtual_hosts"][0]["routes"][:0] = [
            off,
            {"name": "flaky", "match": {"prefix": "/flaky"}, "route": {
                "cluster": "paced", "retry_policy": {"retry_on": "5xx", "num_retries": 1}}},
            {"name": "paced", "match": {"prefix": "/paced"}, "route": {"cluster": "paced"}},
            {"name": "hold", "match": {"prefix": "/hold"}, "route": {"cluster": "paced"}},
        ]

    stack = Stack(tmp_path_factory.mktemp(f"phases-{request.param}"), receiver.endpoint,
                  mutate_config=mutate, envoy_source=MODES[request.param],
                  sidecar_env={"EXTPROC_STREAM__PHASE_SPANS": "true"})
    try:
        stack.start()
        _until_joined(stack, receiver)
        yield stack, receiver, upstream
    finally:
        upstream.stop.set()
        stack.stop()
        receiver.stop()
        upstream.shutdown()
        upstream.server_close()


def _until_joined(stack: Stack, receiver: OtlpReceiver) -> None:
    """Phases need Envoy's access-log stream, which Envoy opens with its first entry:
    send requests until one gets its phases."""
    for _ in range(50):
        t = tag()
        http_request(stack.base_url, f"/paced?tag={t}")
        probe = wait_gateway_span(receiver, with_query(t))
        if receiver.wait_for(lambda: bool(_children(receiver, probe)), 2):  # noqa: B023
            return
    raise AssertionError("no request got its phase spans")


def _children(receiver: OtlpReceiver, server: ReceivedSpan) -> dict[str, ReceivedSpan]:
    spans = gateway_spans(receiver, lambda s: s.trace_id == server.trace_id
                          and s.parent_span_id == server.span_id)
    return {str(s.attributes.get("envoy.phase")): s for s in spans}


def _phases(receiver: OtlpReceiver, server: ReceivedSpan, expected: set[str]
            ) -> dict[str, ReceivedSpan]:
    """The phase spans of `server`, once the expected ones came (they are exported with
    it, so none comes later): exactly `expected`."""
    receiver.wait_for(lambda: set(_children(receiver, server)) >= expected, 10)
    phases = _children(receiver, server)
    assert set(phases) == expected, (sorted(phases), expected)
    for span in phases.values():  # all within the SERVER span
        assert server.start_ns <= span.start_ns <= span.end_ns <= server.end_ns
    return phases


def _traced(stack: Stack, receiver: OtlpReceiver, path: str,
            headers: list[tuple[str, str]] | None = None) -> tuple[str, ReceivedSpan]:
    t = tag()
    sep = "&" if "?" in path else "?"
    http_request(stack.base_url, f"{path}{sep}tag={t}", headers=headers)
    return t, wait_gateway_span(receiver, lambda s: with_query(t)(s) and s.kind == SERVER_KIND)


def _near(got_ms: float, want_ms: float) -> bool:
    return abs(got_ms - want_ms) <= TOLERANCE_MS


def test_each_phase_lasts_what_was_injected(phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, upstream = phased
    t, server = _traced(stack, receiver, f"/paced?head_ms={HEAD_MS}&body_ms={BODY_MS}",
                        headers=[("x-phase-delay", "1")])
    phases = _phases(receiver, server, {"filters", "upstream", "response"})
    filters, client, response = phases["filters"], phases["upstream"], phases["response"]
    assert (filters.kind, client.kind, response.kind) == (INTERNAL_KIND, CLIENT_KIND,
                                                          INTERNAL_KIND)
    durations = {name: span.duration_ms for name, span in phases.items()}
    assert _near(durations["filters"], FAULT_MS), durations
    assert _near(durations["upstream"], HEAD_MS + BODY_MS), durations
    assert _near(durations["response"], BODY_MS), durations
    # ordered: the filters end where the upstream call starts; the response starts once
    # the upstream's first byte came, and ends after its last
    assert filters.start_ns == server.start_ns
    assert filters.end_ns == client.start_ns
    assert client.start_ns <= response.start_ns and client.end_ns <= response.end_ns
    (first_byte,) = [name for name, _ in client.events]
    assert first_byte == "first_byte_received"
    # the upstream's parent is the CLIENT span
    (traceparent,) = upstream.traceparents[t]
    assert traceparent.split("-")[1:3] == [client.trace_id, client.span_id]
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == upstream.server_address[1]
    assert client.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in client.attributes
    assert client.status_code != STATUS_ERROR
    assert {s.attributes["envoy.phase"] for s in phases.values()} == set(phases)


def test_the_time_the_gateway_added_is_the_duration_without_the_upstream_phase(
        phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    """extproc.gateway.added_duration (#19, item 2): the fault filter's hold is what the
    gateway added; the upstream's own time is not. Its exemplar names the request's span."""
    stack, receiver, _ = phased
    _, server = _traced(stack, receiver, f"/paced?head_ms={HEAD_MS}&body_ms={BODY_MS}",
                        headers=[("x-phase-delay", "1")])

    def exemplar() -> float | None:
        for m in receiver.metrics():
            if m.name != "extproc.gateway.added_duration" \
                    or m.resource.get("service.name") != SIDECAR_SERVICE:
                continue
            for point in m.data_points:
                for ex in point.exemplars:
                    if (ex.trace_id, ex.span_id) == (server.trace_id, server.span_id):
                        assert point.attributes["http.response.status_code"] == 200
                        return ex.value if isinstance(ex.value, float) else None
        return None
    assert receiver.wait_for(lambda: exemplar() is not None, 15)
    value = exemplar()
    assert value is not None
    added_ms = value * 1000
    assert _near(added_ms, FAULT_MS), added_ms


def test_a_route_with_phases_off_sends_the_server_span_upstream(
        phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, upstream = phased
    t, server = _traced(stack, receiver, "/phases-off")
    before = tag()  # a request after it is exported: its phases would have come by then
    _traced(stack, receiver, f"/paced?x={before}")
    assert not _children(receiver, server)
    (traceparent,) = upstream.traceparents[t]
    assert traceparent.split("-")[2] == server.span_id


def test_no_route_has_only_the_local_reply(phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, _ = phased
    _, server = _traced(stack, receiver, "/no/such/route")
    assert server.attributes["http.response.status_code"] == 404
    _phases(receiver, server, {"response"})


def test_a_connect_failure_has_no_upstream_phase(
        phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, _ = phased
    _, server = _traced(stack, receiver, "/down")
    assert server.attributes["http.response.status_code"] == 503
    assert "UF" in server.attributes["envoy.response_flags"]
    _phases(receiver, server, {"response"})


def test_a_retried_request_has_one_upstream_phase_with_its_resend(
        phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    """Envoy's access log times the last attempt only: the upstream span covers it, and
    the filters span, whose end (the first attempt's first byte) is not logged, is left
    out rather than stretched over the first attempt and the retry's back-off."""
    stack, receiver, upstream = phased
    t, server = _traced(stack, receiver, "/flaky")
    assert server.attributes["http.response.status_code"] == 200
    phases = _phases(receiver, server, {"upstream", "response"})
    client = phases["upstream"]
    assert client.attributes["http.request.resend_count"] == 1
    assert client.status_code != STATUS_ERROR
    first, second = upstream.traceparents[t]  # both attempts carry the CLIENT span's id
    assert first == second and first.split("-")[2] == client.span_id
    assert server.start_ns < client.start_ns <= phases["response"].start_ns


def test_a_client_leaving_mid_response_cuts_the_upstream_and_response_phases(
        phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, upstream = phased
    t = tag()
    with socket.create_connection(("127.0.0.1", stack.ports.listener), timeout=5) as sock:
        sock.sendall(f"GET /hold?tag={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(12).startswith(b"HTTP/1.1 200")  # the headers came; now leave
    server = wait_gateway_span(receiver, lambda s: with_query(t)(s) and s.kind == SERVER_KIND)
    assert server.attributes["error.type"] == "response_incomplete"
    phases = _phases(receiver, server, {"filters", "upstream", "response"})
    for name in ("upstream", "response"):
        assert phases[name].status_code == STATUS_ERROR, name
        assert phases[name].attributes["error.type"], name
    (traceparent,) = upstream.traceparents[t]
    assert traceparent.split("-")[2] == phases["upstream"].span_id


def test_a_grpc_call(phased: tuple[Stack, OtlpReceiver, Paced]) -> None:
    stack, receiver, _ = phased
    trace_id = uuid.uuid4().hex
    with grpc.insecure_channel(stack.grpc_target) as channel:
        users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(id=1), timeout=10,
            metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    server = wait_gateway_span(receiver, lambda s: s.trace_id == trace_id
                               and s.kind == SERVER_KIND)
    phases = _phases(receiver, server, {"filters", "upstream", "response"})
    client = phases["upstream"]
    assert client.attributes["rpc.grpc.status_code"] == 0
    assert client.status_code != STATUS_ERROR
    # the gRPC service's own span is the CLIENT span's child
    assert receiver.wait_for(lambda: any(
        s.trace_id == trace_id and s.parent_span_id == client.span_id
        for s in receiver.spans() if s.resource.get("service.name") == "grpc-demo"), 10)
