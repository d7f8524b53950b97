"""E2E fixtures: a real Envoy, the sidecar, real upstreams and a real OTLP receiver."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import Config, Stack, add_dead_route, free_port, hcm_of, wait_until

SIDECAR_SERVICE = "extproc-otel"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    rec = OtlpReceiver()
    rec.start()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def admin_port() -> int:
    """A free port for the sidecar's admin endpoint (/metrics), one per module."""
    return free_port()


def bootstrap_on_free_ports(config: Config, upstream: int) -> tuple[Config, int, int]:
    """A bootstrap `envoy-config` printed, with its listener (on loopback) and admin moved
    to free ports and its ``app`` cluster pointed at `upstream`: (config, listener, admin)."""
    listener, admin = free_port(), free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    (ingress,) = config["static_resources"]["listeners"]
    ingress["address"]["socket_address"].update(address="127.0.0.1", port_value=listener)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "app":
            for group in cluster["load_assignment"]["endpoints"]:
                for lb in group["lb_endpoints"]:
                    lb["endpoint"]["address"]["socket_address"]["port_value"] = upstream
    return config, listener, admin


PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"


def route_with_options(prefix: str, cluster: str, options: dict[str, str]) -> dict[str, object]:
    """A route (to the upstream's /echo) whose ext_proc streams carry `options` as gRPC
    initial metadata."""
    return {
        "name": prefix.strip("/").replace("/", "_") or "root",
        "match": {"prefix": prefix},
        "route": {"cluster": cluster, "prefix_rewrite": "/echo"},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": PER_ROUTE,
            "overrides": {"grpc_initial_metadata": [
                {"key": key, "value": value} for key, value in options.items()]},
        }},
    }


def add_test_routes(config: Config) -> None:
    """The shipped config plus routes only tests need."""
    add_dead_route(config)
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, route_with_options("/legacy-echo", "users", {
        "x-extproc-otel-inject": "tracecontext,grpc-trace-bin"}))
    routes.insert(0, route_with_options("/untraced", "users", {
        "x-extproc-otel-tracing": "off"}))
    routes.insert(0, route_with_options("/team-echo", "users", {
        "x-extproc-otel-attr-team": "payments", "x-extproc-otel-http-route": "/team-echo"}))


@pytest.fixture(scope="module")
def stack(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack"), receiver.endpoint,
               mutate_config=add_test_routes) as running:
        yield running


STATUS_ERROR = 2  # OTLP Status.STATUS_CODE_ERROR


def assert_outcome(span: ReceivedSpan, status: int, error: str | None,
                   flag: str | None) -> None:
    """The span says how the request ended: status code, error or not, and Envoy's
    response flag when one is expected."""
    assert span.attributes["http.response.status_code"] == status
    assert (span.status_code == STATUS_ERROR) is (error is not None)
    assert span.attributes.get("error.type") == error
    if flag:
        assert flag in span.attributes["envoy.response_flags"]


def tag() -> str:
    return uuid.uuid4().hex


def gateway_spans(receiver: OtlpReceiver,
                  pred: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
    return [s for s in receiver.spans()
            if s.resource.get("service.name") == SIDECAR_SERVICE and pred(s)]


def wait_gateway_span(receiver: OtlpReceiver, pred: Callable[[ReceivedSpan], bool],
                      timeout: float = 10.0) -> ReceivedSpan:
    """The one gateway span matching `pred` (fails if none arrives in time)."""
    assert receiver.wait_for(lambda: bool(gateway_spans(receiver, pred)), timeout), \
        "no gateway span arrived"
    spans = gateway_spans(receiver, pred)
    return spans[0]


def with_query(tag_value: str) -> Callable[[ReceivedSpan], bool]:
    return lambda s: f"tag={tag_value}" in str(s.attributes.get("url.query", ""))


def abort_in_flight(stack: Stack, tag_value: str, ms: int = 3000) -> None:
    """A client that sends GET /slow and leaves once Envoy forwarded it upstream (so
    the ext_proc stream is open and no response has come yet)."""
    with socket.create_connection(("127.0.0.1", stack.ports.listener), timeout=5) as sock:
        sock.sendall(f"GET /slow?ms={ms}&tag={tag_value} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        wait_until(lambda: stack.envoy_stat("cluster.users.upstream_rq_active") >= 1, 10,
                   "the request to reach the upstream")
