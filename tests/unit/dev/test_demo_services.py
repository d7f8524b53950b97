"""The demo upstreams as real subprocesses on free loopback ports, exporting to a real receiver."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo import _exporter, build_tracer_provider, parse_listen
from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan

TIMEOUT = 10.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _traceparent(trace_id: str, span_id: str = "00f067aa0ba902b7") -> str:
    return f"00-{trace_id}-{span_id}-01"


class Service:
    """A demo service subprocess; its stdout JSON lines are collected as they come."""

    def __init__(self, module: str, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        assert self.wait_line(lambda d: d.get("msg") == "listening"), "service did not start"
        self.port = next(d["port"] for d in self.lines if d.get("msg") == "listening")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, match: Callable[[dict[str, Any]], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: any(match(d) for d in self.lines) or self.proc.poll() is not None,
                TIMEOUT,
            ) and any(match(d) for d in self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def _env(rx: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "20", **extra}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    rx = OtlpReceiver()
    rx.start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def users(receiver: OtlpReceiver) -> Iterator[Service]:
    service = Service("ext_proc.dev.demo.users_service", _env(receiver))
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def users_grpc(receiver: OtlpReceiver) -> Iterator[Service]:
    service = Service("ext_proc.dev.demo.grpc_service", _env(receiver))
    yield service
    assert service.stop() == 0


def _get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _trace(rx: OtlpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    def spans() -> list[ReceivedSpan]:
        return [s for s in rx.spans() if s.trace_id == trace_id]

    assert rx.wait_for(lambda: len(spans()) >= count, TIMEOUT), rx.spans()
    return spans()


def test_users_continue_the_trace_with_a_db_child_span(
    users: Service, receiver: OtlpReceiver
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    status, body = _get(users.port, "/api/users/1",
                        {"traceparent": _traceparent(trace_id), "tracestate": "k=v"})
    assert status == 200 and body == {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com"}

    spans = _trace(receiver, trace_id, 2)
    server = next(s for s in spans if s.kind == 2)
    db = next(s for s in spans if s.kind == 3)
    assert server.parent_span_id == "00f067aa0ba902b7"
    assert server.name == "GET /api/users/{id}"
    assert server.resource["service.name"] == "users"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/api/users/1"
    assert db.parent_span_id == server.span_id
    assert db.attributes["db.system.name"] == "sqlite"
    assert db.attributes["db.operation.name"] == "SELECT"
    assert db.attributes["db.collection.name"] == "users"
    assert "?" in db.attributes["db.query.text"] and "1" not in db.attributes["db.query.text"]
    assert server.start_ns <= db.start_ns <= db.end_ns <= server.end_ns

    def ours(d: dict[str, Any]) -> bool:
        return d.get("trace_id") == trace_id

    assert users.wait_line(lambda d: ours(d) and d["msg"] == "request")
    access = next(d for d in users.lines if ours(d) and d["msg"] == "request")
    query = next(d for d in users.lines if ours(d) and d["msg"] == "db query")
    assert (access["span_id"], access["status"], access["method"]) == (server.span_id, 200, "GET")
    assert access["service"] == "users"
    assert query["span_id"] == db.span_id


def test_users_list_and_unknown_id(users: Service, receiver: OtlpReceiver) -> None:
    status, body = _get(users.port, "/api/users")
    assert status == 200 and [u["id"] for u in body["users"]] == [1, 2, 3]
    status, body = _get(users.port, "/api/users/999", {"traceparent": _traceparent(TRACE_ID)})
    assert status == 404 and body["error"] == "user not found"
    server = next(s for s in _trace(receiver, TRACE_ID, 2) if s.kind == 2)
    assert server.attributes["http.response.status_code"] == 404
    assert server.status_code == 0  # 4xx is not a server error


def test_echo_returns_every_header_received(users: Service) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", users.port, timeout=TIMEOUT)
    conn.putrequest("GET", "/echo/some/path?x=1&y=2")
    conn.putheader("X-Dup", "one")
    conn.putheader("X-Dup", "two")
    conn.putheader("traceparent", _traceparent("11111111111111111111111111111111"))
    conn.endheaders()
    body = json.loads(conn.getresponse().read())
    # Same connection again: HTTP/1.1 keep-alive with Content-Length framing.
    conn.request("GET", "/echo")
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["path"] == "/echo"
    conn.close()
    assert (body["method"], body["path"], body["query"]) == ("GET", "/echo/some/path", "x=1&y=2")
    assert body["headers"]["x-dup"] == ["one", "two"]
    assert body["headers"]["traceparent"] == [_traceparent("11111111111111111111111111111111")]


def test_status_slow_and_health(users: Service, receiver: OtlpReceiver) -> None:
    trace_id = "22222222222222222222222222222222"
    status, _ = _get(users.port, "/status/503", {"traceparent": _traceparent(trace_id)})
    assert status == 503
    (span,) = _trace(receiver, trace_id, 1)
    assert span.status_code == 2 and span.attributes["error.type"] == "503"
    assert _get(users.port, "/healthz") == (200, {"status": "ok"})
    assert _get(users.port, "/nope")[0] == 404

    slow_trace = "33333333333333333333333333333333"
    assert _get(users.port, "/slow?ms=30", {"traceparent": _traceparent(slow_trace)})[0] == 200
    (slow,) = _trace(receiver, slow_trace, 1)
    assert slow.end_ns - slow.start_ns >= 30_000_000


def test_users_flushes_spans_on_sigterm(receiver: OtlpReceiver) -> None:
    """With a one-minute batch delay only the shutdown flush can deliver the span."""
    service = Service("ext_proc.dev.demo.users_service",
                      _env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000", OTEL_SERVICE_NAME="svc-x"))
    trace_id = "44444444444444444444444444444444"
    assert _get(service.port, "/healthz", {"traceparent": _traceparent(trace_id)})[0] == 200
    assert service.stop() == 0
    (span,) = _trace(receiver, trace_id, 1)
    assert span.resource["service.name"] == "svc-x"
    assert all(line.startswith("{") for line in service.raw)  # nothing but JSON on stdout


def test_grpc_get_user_echoes_metadata_and_continues_trace(
    users_grpc: Service, receiver: OtlpReceiver
) -> None:
    trace_id = "55555555555555555555555555555555"
    with grpc.insecure_channel(f"127.0.0.1:{users_grpc.port}") as channel:
        user = users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(id=2), timeout=TIMEOUT,
            metadata=[("traceparent", _traceparent(trace_id)), ("x-a", "1"), ("x-a", "2"),
                      ("x-raw-bin", b"\x00\x01\x02\x03\x04")])
    assert (user.id, user.name) == (2, "Alan Turing")
    md = user.received_metadata
    assert md["traceparent"] == _traceparent(trace_id)
    assert md["x-a"] == "1,2"
    assert md["x-raw-bin"] == base64.b64encode(b"\x00\x01\x02\x03\x04").decode().rstrip("=")

    (span,) = _trace(receiver, trace_id, 1)
    assert span.name == "demo.v1.Users/GetUser" and span.kind == 2
    assert span.parent_span_id == "00f067aa0ba902b7"
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == "demo.v1.Users"
    assert span.attributes["rpc.method"] == "GetUser"
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert users_grpc.wait_line(lambda d: d.get("trace_id") == trace_id)
    line = next(d for d in users_grpc.lines if d.get("trace_id") == trace_id)
    assert (line["span_id"], line["status"]) == (span.span_id, 0)


@pytest.mark.parametrize(
    ("trace_id", "method", "request_", "code", "error"),
    [
        ("a1" * 16, "Fail", users_pb2.FailRequest(code=14, message="down"),
         grpc.StatusCode.UNAVAILABLE, True),
        ("a2" * 16, "Fail", users_pb2.FailRequest(code=0), grpc.StatusCode.INVALID_ARGUMENT, False),
        ("a3" * 16, "GetUser", users_pb2.GetUserRequest(id=404), grpc.StatusCode.NOT_FOUND, False),
    ],
)
def test_grpc_failures(
    users_grpc: Service, receiver: OtlpReceiver, trace_id: str, method: str, request_: Any,
    code: grpc.StatusCode, error: bool,
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{users_grpc.port}") as channel:
        call = getattr(users_pb2_grpc.UsersStub(channel), method)
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=TIMEOUT, metadata=[("traceparent", _traceparent(trace_id))])
    assert err.value.code() is code
    (span,) = _trace(receiver, trace_id, 1)
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert (span.status_code == 2) is error


def test_grpc_service_stops_cleanly_on_sigterm(receiver: OtlpReceiver) -> None:
    service = Service("ext_proc.dev.demo.grpc_service",
                      _env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000"))
    trace_id = "66666666666666666666666666666666"
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(id=3), timeout=TIMEOUT,
            metadata=[("traceparent", _traceparent(trace_id))])
    assert service.stop() == 0
    (span,) = _trace(receiver, trace_id, 1)
    assert span.resource["service.name"] == "users-grpc"


def test_exporter_selection_from_env() -> None:
    assert _exporter({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert isinstance(_exporter({}), OTLPSpanExporter)
    http_exporter = _exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert isinstance(http_exporter, HttpSpanExporter)
    http_exporter.shutdown()


def test_default_service_name_yields_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    off = {"OTEL_TRACES_EXPORTER": "none"}
    assert build_tracer_provider("users", off).resource.attributes["service.name"] == "users"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    assert build_tracer_provider("users", off).resource.attributes["service.name"] == "custom"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)),
     ("localhost", None), (":80", None), ("h:99999", None)],
)
def test_parse_listen(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(text) == expected
