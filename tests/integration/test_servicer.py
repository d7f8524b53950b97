"""The sidecar in-process, driven over real gRPC with the messages Envoy sends.

These cover stream shapes that are awkward to provoke through Envoy: malformed
input, duplicate phases, concurrency and log correlation. The e2e suite covers
the same code behind a real Envoy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from loguru import logger
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from ext_proc.app import Sidecar, build_sidecar
from ext_proc.config import load_settings
from ext_proc.policy.redaction import REDACTED
from ext_proc.telemetry.logs import install_correlation, json_line
from ext_proc.telemetry.provider import Telemetry

pytestmark = pytest.mark.usefixtures("in_process_sidecar")

NS = "envoy.filters.http.ext_proc"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class Running:
    sidecar: Sidecar
    exporter: InMemorySpanExporter
    stub: pb_grpc.ExternalProcessorStub

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[Running]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider, provider.get_tracer("test"))
    # no Envoy here, so no access log to join: spans end when their stream does
    overrides["stream"] = {"join_access_log": False, **overrides.get("stream", {})}
    settings = load_settings(server={"listen": "127.0.0.1:0", "grace_s": 1}, **overrides)
    sidecar = build_sidecar(settings, telemetry)
    port = await sidecar.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(sidecar, exporter, pb_grpc.ExternalProcessorStub(channel))
    finally:
        await channel.close()
        await sidecar.stop()


def headers(*pairs: tuple[str, bytes | str]) -> pb.HttpHeaders:
    msg = pb.HttpHeaders()
    for key, value in pairs:
        h = msg.headers.headers.add()
        h.key = key
        h.raw_value = value.encode() if isinstance(value, str) else value
    return msg


def request_headers(path: str = "/x", *extra: tuple[str, bytes | str],
                    time: str | None = "2026-11-26T17:06:31.945620+00:00") -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(request_headers=headers(
        (":method", "GET"), (":path", path), (":scheme", "http"),
        (":authority", "example.com:8080"), *extra))
    if time is not None:
        req.attributes[NS].fields["request.time"].string_value = time
    req.attributes[NS].fields["source.address"].string_value = "10.1.2.3:5555"
    req.attributes[NS].fields["request.protocol"].string_value = "HTTP/1.1"
    return req


def response_headers(status: str = "200", end_of_stream: bool = False,
                     *extra: tuple[str, str]) -> pb.ProcessingRequest:
    msg = headers((":status", status), *extra)
    msg.end_of_stream = end_of_stream
    return pb.ProcessingRequest(response_headers=msg)


async def exchange(stub: pb_grpc.ExternalProcessorStub,
                   messages: Iterable[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    """Send each message after the previous answer, as Envoy does; then close."""
    call = stub.Process()
    answers = []
    for message in messages:
        await call.write(message)
        answers.append(await call.read())
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return answers


def set_headers(response: pb.ProcessingResponse) -> dict[str, bytes]:
    common = getattr(response, response.WhichOneof("response")).response
    return {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}


async def test_request_and_response_make_one_span() -> None:
    async with running_server() as srv:
        answers = await exchange(srv.stub, [
            request_headers("/api/users?id=1", ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
                            ("user-agent", "curl/8")),
            response_headers("200"),
        ])
        assert answers[0].WhichOneof("response") == "request_headers"
        assert answers[1].WhichOneof("response") == "response_headers"
        (span,) = srv.spans()
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == PARENT_ID
        assert span.start_time == 1795712791945620000  # Envoy's request.time, exactly
        attrs = span.attributes
        assert attrs["url.path"] == "/api/users" and attrs["url.query"] == "id=1"
        assert attrs["server.address"] == "example.com" and attrs["server.port"] == 8080
        assert attrs["client.address"] == "10.1.2.3" and attrs["client.port"] == 5555
        assert attrs["user_agent.original"] == "curl/8"
        assert attrs["network.protocol.version"] == "1.1"
        assert attrs["http.response.status_code"] == 200
        option = answers[0].request_headers.response.header_mutation.set_headers[0]
        assert option.header.key == "traceparent" and option.header.value == ""
        assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD
        span_hex = format(span.context.span_id, "016x")
        assert option.header.raw_value == f"00-{TRACE_ID}-{span_hex}-01".encode()
        meta = answers[0].dynamic_metadata.fields["extproc_otel"].struct_value.fields
        assert meta["trace_id"].string_value == TRACE_ID
        assert meta["span_id"].string_value == span_hex
        assert not srv.sidecar.processor.active


async def test_stream_that_opens_with_response_headers_gets_a_span() -> None:
    async with running_server() as srv:
        await exchange(srv.stub, [response_headers("403", True)])
        (span,) = srv.spans()
        assert span.name == "HTTP"
        assert span.attributes["http.response.status_code"] == 403


async def test_stream_cancelled_before_the_response_is_an_error() -> None:
    async with running_server() as srv:
        call = srv.stub.Process()
        await call.write(request_headers())
        await call.read()
        call.cancel()
        await released(srv)
        (span,) = srv.spans()
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["error.type"] == "client_aborted"


async def test_cancel_after_response_headers_ends_the_span_normally() -> None:
    """An Envoy without the graceful-close flag resets every stream at its end."""
    async with running_server(stream={"graceful_close": False}) as srv:
        call = srv.stub.Process()
        for message in (request_headers(), response_headers("200")):
            await call.write(message)
            await call.read()
        call.cancel()  # Envoy's default (non-graceful) close
        await released(srv)
        (span,) = srv.spans()
        assert span.status.status_code == StatusCode.UNSET


async def test_malformed_input_never_breaks_the_stream() -> None:
    async with running_server() as srv:
        answers = await exchange(srv.stub, [
            request_headers("/\xff", (":method", "G\x00T"), ("traceparent", b"\xff\xfe"),
                            ("user-agent", b"\xc3\x28"), time="not a time"),
            request_headers("/again"),  # a second request_headers: answered, ignored
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x")),
            response_headers("abc"),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
            pb.ProcessingRequest(),  # no phase at all
        ])
        assert len(answers) == 6
        (span,) = srv.spans()
        assert span.attributes["url.path"] == "/\xff"
        assert span.parent is None  # the garbage traceparent started a new trace


async def test_observability_mode_gets_no_answers_but_a_span() -> None:
    async with running_server() as srv:
        call = srv.stub.Process()
        for message in (request_headers(), response_headers("200")):
            message.observability_mode = True
            await call.write(message)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert len(srv.spans()) == 1


async def test_log_lines_carry_their_own_streams_ids() -> None:
    lines: list[dict[str, Any]] = []
    install_correlation()
    sink = logger.add(lambda m: lines.append(json.loads(json_line(m.record))), level="DEBUG")
    try:
        async with running_server() as srv:
            async def one(i: int) -> None:
                await exchange(srv.stub, [request_headers(f"/r{i}"), request_headers(f"/r{i}"),
                                          response_headers("200")])
            await asyncio.gather(*(one(i) for i in range(20)))
            spans = {s.attributes["url.path"]: s for s in srv.spans()}
    finally:
        logger.remove(sink)
    assert len(spans) == 20
    dupes = [line for line in lines if line["msg"] == "duplicate request_headers ignored"]
    access = [line for line in lines if line["msg"] == "access"]
    assert len(dupes) == 20 and len(access) == 20
    ids = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
           for s in spans.values()}
    assert {(d["trace_id"], d["span_id"]) for d in dupes} == ids
    assert {(a["trace_id"], a["span_id"]) for a in access} == ids
    for line in access:
        span = spans[line["path"]]
        assert line["trace_id"] == format(span.context.trace_id, "032x")


async def test_secrets_in_the_path_reach_neither_the_span_nor_the_access_line() -> None:
    """Matrix parameters and a JWT in a path segment are redacted in url.path (which the
    span starts with raw, for the sampler) and in the access line, sampled or not."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJlc2VjcmV0"
    path = f"/app;token=CANARY1/login/{jwt}"
    lines: list[dict[str, Any]] = []
    sink = logger.add(lambda m: lines.append(json.loads(json_line(m.record))), level="INFO")
    try:
        async with running_server() as srv:
            await exchange(srv.stub, [request_headers(f"{path}?token=CANARY2&a=1"),
                                      response_headers("200")])
            unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # a parent that was not sampled
            await exchange(srv.stub, [request_headers(path, ("traceparent", unsampled)),
                                      response_headers("200")])
            (span,) = srv.spans()
    finally:
        logger.remove(sink)
    attributes = span.attributes or {}
    assert str(attributes["url.path"]).startswith(f"/app;token={REDACTED}")
    assert attributes["url.query"] == f"token={REDACTED}&a=1"
    access = [line for line in lines if line["msg"] == "access"]
    assert [line["path"] for line in access] == [attributes["url.path"]] * 2
    exported = json.dumps({k: str(v) for k, v in attributes.items()}) + json.dumps(lines)
    assert "CANARY" not in exported and jwt not in exported


async def test_concurrent_streams_leave_no_state_behind() -> None:
    async with running_server() as srv:
        async def finished(i: int) -> None:
            await exchange(srv.stub, [request_headers(f"/ok{i}"), response_headers("200")])

        async def aborted(i: int) -> None:
            call = srv.stub.Process()
            await call.write(request_headers(f"/abort{i}"))
            await call.read()
            call.cancel()

        await asyncio.gather(*(finished(i) for i in range(30)), *(aborted(i) for i in range(30)))
        await released(srv)
        assert len(srv.spans()) == 60
        errors = [s for s in srv.spans() if s.status.status_code == StatusCode.ERROR]
        assert {s.attributes["url.path"] for s in errors} == {f"/abort{i}" for i in range(30)}


async def released(srv: Running, limit_s: float = 5.0) -> None:
    """Every stream the server took is closed and its span ended (the server's own
    drained() event, bounded)."""
    await asyncio.wait_for(srv.sidecar.processor.drained(), limit_s)
