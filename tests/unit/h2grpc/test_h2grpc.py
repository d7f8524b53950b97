"""ext_proc.h2grpc: the gRPC server of the hot path, driven by grpcio's own client.

Every test talks over a real socket to a real `Server`; the peer is grpc.aio (the
C-core HTTP/2 and gRPC implementation), so what passes here is wire-compatible.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_proc import h2grpc
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class Echo(pb_grpc.ExternalProcessorServicer):
    """Answers each message with its phase's name in a header mutation; scripted
    failures by the first message's request_headers header key."""

    def __init__(self) -> None:
        self.metadata: list[tuple[tuple[str, Any], ...]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def Process(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.metadata.append(context.invocation_metadata())
        self.started.set()
        try:
            async for request in request_iterator:
                keys = [h.key for h in request.request_headers.headers.headers]
                if "abort" in keys:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nein: ünïcode 100%")
                if "raise" in keys:
                    raise RuntimeError("boom")
                if "big" in keys:  # far past any HTTP/2 window
                    response = pb.ProcessingResponse()
                    response.request_headers.response.header_mutation.remove_headers.extend(
                        ["x" * 1000] * 3000)
                    yield response
                    continue
                if "hang" in keys:
                    await asyncio.Event().wait()
                response = pb.ProcessingResponse()
                response.request_headers.response.header_mutation.remove_headers.append(
                    request.WhichOneof("request") or "none")
                yield response
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[Echo, h2grpc.Server, str]]:
    echo = Echo()
    server = h2grpc.Server(**options)
    pb_grpc.add_ExternalProcessorServicer_to_server(echo, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)  # generic handlers
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield echo, server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def headers_request(*keys: str) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    request.request_headers.SetInParent()
    for key in keys:
        request.request_headers.headers.headers.add(key=key)
    return request


def answers(responses: list[Any]) -> list[str]:
    return [r.request_headers.response.header_mutation.remove_headers[0] for r in responses]


async def test_a_stream_gets_one_answer_per_message_in_order_and_ok() -> None:
    async with serving() as (echo, _, target), grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(
            metadata=(("x-extproc-otel-http-route", "/users/{id}"), ("x-blob-bin", b"\x00\xff")))
        got = []
        for phase in ("request_headers", "response_headers", "request_trailers"):
            request = pb.ProcessingRequest()
            getattr(request, phase).SetInParent()
            await call.write(request)
            got.append(await call.read())
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert answers(got) == ["request_headers", "response_headers", "request_trailers"]
    metadata = dict(echo.metadata[0])
    assert metadata["x-extproc-otel-http-route"] == "/users/{id}"
    assert metadata["x-blob-bin"] == b"\x00\xff"  # binary metadata stays bytes
    assert not any(key.startswith(":") for key in metadata)


async def test_many_concurrent_streams_on_one_connection() -> None:
    async with serving() as (_, _, target), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one(i: int) -> list[str]:
            call = stub.Process()
            await call.write(headers_request(f"k{i}"))
            reply = await call.read()
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            return answers([reply])

        results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [["request_headers"]] * 200


@pytest.mark.parametrize(("key", "code", "details"), [
    ("abort", grpc.StatusCode.FAILED_PRECONDITION, "nein: ünïcode 100%"),
    ("raise", grpc.StatusCode.UNKNOWN, "Unexpected error in handler"),
])
async def test_a_failing_handler_ends_its_stream_only(key: str, code: grpc.StatusCode,
                                                       details: str) -> None:
    async with serving() as (_, _, target), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        healthy = stub.Process()
        await healthy.write(headers_request())
        call = stub.Process()
        await call.write(headers_request(key))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == code
        assert failed.value.details() == details  # percent-encoded on the wire
        # the other stream on the same connection carries on
        assert answers([await healthy.read()]) == ["request_headers"]
        await healthy.done_writing()
        assert await healthy.code() == grpc.StatusCode.OK


async def test_unknown_method_is_unimplemented() -> None:
    async with serving() as (_, _, target), grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/no.Such/Method")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_garbage_and_oversized_messages_fail_their_stream_cleanly() -> None:
    async with serving(max_receive_message_length=64 * 1024) as (_, _, target), \
            grpc.aio.insecure_channel(target) as channel:
        raw = channel.stream_stream(PROCESS, request_serializer=lambda b: b,
                                    response_deserializer=pb.ProcessingResponse.FromString)
        garbage = raw()
        await garbage.write(b"\xff\xff\xff")  # not a ProcessingRequest
        assert await garbage.code() == grpc.StatusCode.INTERNAL
        oversized = raw()
        await oversized.write(b"\x0a" + b"\x00" * (128 * 1024))
        assert await oversized.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        fine = raw()
        await fine.write(headers_request().SerializeToString())
        assert answers([await fine.read()]) == ["request_headers"]


async def test_a_response_larger_than_the_flow_control_window_arrives_whole() -> None:
    options = [("grpc.http2.lookahead_bytes", 65535), ("grpc.max_receive_message_length", -1)]
    async with serving() as (_, _, target), \
            grpc.aio.insecure_channel(target, options=options) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request("big"))
        reply = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert list(reply.request_headers.response.header_mutation.remove_headers) == \
        ["x" * 1000] * 3000


async def test_a_peer_reset_cancels_the_handler() -> None:
    async with serving() as (echo, server, target), grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request("hang"))
        await asyncio.wait_for(echo.started.wait(), 5)
        (task,) = [c.task for conn in server.connections for c in conn.calls.values()]
        call.cancel()
        await asyncio.wait_for(echo.cancelled.wait(), 5)
        done, _ = await asyncio.wait([task], timeout=5)
        assert done and not any(conn.calls for conn in server.connections)


async def test_health_check_and_watch_through_generic_handlers() -> None:
    async with serving() as (_, _, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        first = await asyncio.wait_for(watch.read(), 5)  # unary-stream via context.write
        watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_stop_cancels_what_outlives_the_grace_and_stops_listening() -> None:
    async with serving() as (echo, server, target), grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request("hang"))
        await asyncio.wait_for(echo.started.wait(), 5)
        await asyncio.wait_for(server.stop(0.2), 5)
        assert echo.cancelled.is_set()
        assert await call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        host, port = target.split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()


async def test_protocol_garbage_closes_that_connection_only() -> None:
    async with serving() as (_, server, target), grpc.aio.insecure_channel(target) as channel:
        host, port = target.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)  # not HTTP/2
        await writer.drain()
        assert await asyncio.wait_for(_read_to_eof(reader), 5)  # closed by the server
        writer.close()
        assert server.protocol_errors == 1  # counted (and logged at debug, rate-limited)
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request())
        assert answers([await call.read()]) == ["request_headers"]


async def _read_to_eof(reader: asyncio.StreamReader) -> bool:
    while await reader.read(65536):
        pass
    return True


def test_a_taken_port_is_an_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            h2grpc.Server().add_insecure_port(f"127.0.0.1:{holder.getsockname()[1]}")
    finally:
        holder.close()


async def test_reuse_port_lets_two_servers_share_a_port() -> None:
    first, second = h2grpc.Server(reuse_port=True), h2grpc.Server(reuse_port=True)
    port = first.add_insecure_port("127.0.0.1:0")
    assert second.add_insecure_port(f"127.0.0.1:{port}") == port
    await first.start()
    await second.start()
    await first.stop(0)
    await second.stop(0)


async def test_streams_open_at_a_goaway_still_finish() -> None:
    """Our GOAWAY (stop with a grace) lets the open stream run to its end."""
    async with serving() as (echo, server, target), grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request())
        assert answers([await call.read()]) == ["request_headers"]
        server.close()  # stop listening, GOAWAY
        await call.write(headers_request())  # frames after the GOAWAY are still read
        assert answers([await call.read()]) == ["request_headers"]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(server.stop(10), 5)  # returns once the stream has ended
    assert not echo.cancelled.is_set()


async def test_a_full_backlog_sheds_new_sheddable_calls_only() -> None:
    async with serving(max_backlog=64, sheddable=(PROCESS,)) as (_, server, target), \
            grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one() -> grpc.StatusCode:
            call = stub.Process()
            await call.write(headers_request())
            await call.read()
            await call.done_writing()
            return await call.code()

        assert set(await asyncio.gather(*(one() for _ in range(50)))) == {grpc.StatusCode.OK}
        assert server.backlog == 0 and server.shed == 0  # every call left the backlog
        server.backlog = server.max_backlog  # as if that many were still waiting
        refused = stub.Process()  # refused on its headers: nothing to write
        assert await refused.code() == grpc.StatusCode.UNAVAILABLE
        assert await refused.details() == "overloaded"
        assert server.shed == 1
        reply = await health_pb2_grpc.HealthStub(channel).Check(  # not sheddable
            health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.backlog = 0
        assert await one() == grpc.StatusCode.OK
