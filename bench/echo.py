"""The floor under the sidecar: an ext_proc server that only answers (no tracing).

``python -m bench.echo PORT [MODE]`` serves ``ExternalProcessor/Process`` (each
message gets its phase's no-op answer) and drains Envoy's gRPC access log, so it
runs behind the same Envoy config as the sidecar. ``make bench`` runs it as the
opt-in rows ``echo-*`` (BENCH_CONFIGS): what the gRPC server alone costs per
request, i.e. the most a change to our own code can win. Modes:

- ``h2`` (default): the sidecar's own server (``ext_proc.h2grpc``, the default
  ``server.engine``), each message answered by a direct call as the sidecar's are
  (``ext_proc.h2grpc.direct``: no task or generator per stream);
- ``h2-task``: the same server running the async-generator servicer in a task per
  stream (how the sidecar ran before direct calls);
- ``aio``: the same servicer on grpc.aio (``server.engine: grpcio``);
- ``aio-rw``: grpc.aio, ``context.read()``/``context.write()`` instead of iterators;
- ``sync``: grpcio's thread-pool server;
- ``grpclib``: grpclib (a pure-Python asyncio gRPC server on the ``h2`` library, as
  ours is) running the same upb messages: what a well-kept general-purpose server costs
  where ``ext_proc.h2grpc`` is hand-written for this one call.

With ``ECHO_ANSWER=traced`` (the row ``echo-traced``) the answer to request headers
has the sidecar's shape: a ``traceparent`` to set upstream and the trace ids as
dynamic metadata (fixed ones, built once), so Envoy applies and logs what it does
behind the sidecar. What the sidecar costs beyond that row is its own work.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any, Final

import grpc
from opentelemetry.trace import SpanContext, TraceFlags

from ext_proc import h2grpc
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from ext_proc.exchange.answers import empty_response, trace_metadata
from ext_proc.policy.propagation.w3c import traceparent_value
from ext_proc.request.headers import header_mutation

PROCESS: Final = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
ACCESS_LOGS: Final = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
MODES: Final = ("h2", "h2-task", "aio", "aio-rw", "sync", "grpclib")


_BUSY_NS: Final = int(float(os.environ.get("ECHO_BUSY_US", "0")) * 1000)
TRACE: Final = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7,
                           is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def traced_answer(namespace: str = "extproc_otel") -> pb.ProcessingResponse:
    """The answer to request headers in the sidecar's shape, for the ids of `TRACE`."""
    answer = pb.ProcessingResponse()
    mutation = answer.request_headers.response.header_mutation
    header_mutation({"traceparent": traceparent_value(TRACE)}, into=mutation)
    trace_metadata(namespace, TRACE, into=answer.dynamic_metadata)
    return answer


_TRACED: Final = traced_answer() if os.environ.get("ECHO_ANSWER") == "traced" else None


def _answer(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    if _BUSY_NS:  # stand-in for per-message work (ECHO_BUSY_US), to see what it costs
        until = time.thread_time_ns() + _BUSY_NS
        while time.thread_time_ns() < until:
            pass
    phase = request.WhichOneof("request")
    if _TRACED is not None and phase == "request_headers":
        return _TRACED
    return empty_response(phase)


class DirectEcho:
    """A `ext_proc.h2grpc.DirectStream`: answers, records nothing."""

    def message(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return _answer(request)

    def answered(self) -> None:
        pass

    def end(self, cancelled: bool, unanswered: bool) -> None:
        pass


class AioEcho(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: Any) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            yield _answer(request)


class AioReadWriteEcho(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator: Any, context: Any) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            await context.write(_answer(request))


class SyncEcho(pb_grpc.ExternalProcessorServicer):
    def Process(self, request_iterator: Iterator[pb.ProcessingRequest],
                context: Any) -> Iterator[pb.ProcessingResponse]:
        for request in request_iterator:
            yield _answer(request)


class AioDrain(als_pb2_grpc.AccessLogServiceServicer):
    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


class SyncDrain(als_pb2_grpc.AccessLogServiceServicer):
    def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


class GrpclibEcho:
    """The echo and the access-log drain as grpclib handlers (``__mapping__``)."""

    @staticmethod
    async def process(stream: Any) -> None:
        async for request in stream:
            await stream.send_message(_answer(request))

    @staticmethod
    async def drain(stream: Any) -> None:
        async for _ in stream:
            pass
        await stream.send_message(als_pb2.StreamAccessLogsResponse())

    def __mapping__(self) -> dict[str, Any]:
        from grpclib.const import Cardinality, Handler
        return {
            PROCESS: Handler(self.process, Cardinality.STREAM_STREAM,
                             pb.ProcessingRequest, pb.ProcessingResponse),
            ACCESS_LOGS: Handler(self.drain, Cardinality.STREAM_UNARY,
                                 als_pb2.StreamAccessLogsMessage,
                                 als_pb2.StreamAccessLogsResponse),
        }


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_grpclib(port: int) -> None:
    from grpclib.server import Server
    server = Server([GrpclibEcho()])
    await server.start("127.0.0.1", port)
    print('{"msg": "started"}', flush=True)
    await _until_signalled()
    server.close()
    await server.wait_closed()


async def _serve_aio(port: int, mode: str) -> None:
    server: grpc.aio.Server | h2grpc.Server = \
        h2grpc.Server(http2_layer=os.environ.get("EXTPROC_SERVER__HTTP2_LAYER")) \
        if mode.startswith("h2") else grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(
        AioReadWriteEcho() if mode == "aio-rw" else AioEcho(), server)
    if mode == "h2" and isinstance(server, h2grpc.Server):
        server.add_direct_method(PROCESS, h2grpc.DirectMethod(
            lambda _metadata: DirectEcho(), pb.ProcessingRequest.FromString,
            pb.ProcessingResponse.SerializeToString))
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AioDrain(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print('{"msg": "started"}', flush=True)
    await _until_signalled()
    await server.stop(0)


def _serve_sync(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         maximum_concurrent_rpcs=None)
    pb_grpc.add_ExternalProcessorServicer_to_server(SyncEcho(), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(SyncDrain(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print('{"msg": "started"}', flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


def main(argv: list[str]) -> None:
    port, mode = int(argv[0]), (argv[1] if len(argv) > 1 else "h2")
    if mode not in MODES:
        raise SystemExit(f"mode {mode!r}: use one of {MODES}")
    if mode == "sync":
        _serve_sync(port)
    else:
        import uvloop
        uvloop.run(_serve_grpclib(port) if mode == "grpclib" else _serve_aio(port, mode))


if __name__ == "__main__":
    main(sys.argv[1:])
