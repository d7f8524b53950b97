"""The gRPC servicer: one `StreamSession` per ext_proc stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from loguru import logger
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation import set_span_in_context

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from ext_proc.route_options import RouteOptionsCache
from ext_proc.stream import StreamDeps, StreamSession


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """Answers Envoy first, records after, ends every span exactly once."""

    def __init__(self, deps: StreamDeps, route_options: RouteOptionsCache,
                 phase_timer: Callable[[str | None, int], None] | None = None) -> None:
        self._deps = deps
        self._phase_timer = phase_timer  # (phase, ns spent answering), called after the answer
        self._route_options = route_options
        self.active: set[StreamSession] = set()  # live streams, for shutdown and tests
        self.accepting = True  # False while shutting down: new streams are refused
        self._idle = asyncio.Event()  # set whenever `active` becomes empty

    async def drained(self) -> None:
        """Return once no ext_proc stream is open (bound it with asyncio.timeout)."""
        while self.active:
            await self._idle.wait()

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        if not self.accepting:  # Envoy lets the request through untraced (fail open)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        session = StreamSession(self._deps,
                                self._route_options.get(context.invocation_metadata()))
        self.active.add(session)
        self._idle.clear()
        correlated = False
        try:
            async for request in request_iterator:
                started = time.perf_counter_ns()
                response = session.handle(request)
                elapsed = time.perf_counter_ns() - started
                if not request.observability_mode:
                    yield response
                if self._phase_timer is not None:
                    self._phase_timer(request.WhichOneof("request"), elapsed)
                if not correlated and session.span is not None:
                    # This RPC runs in its own task, so the span stays current for
                    # every later log line of this stream and no other.
                    otel_context.attach(set_span_in_context(session.span))
                    correlated = True
                session.record()
        except asyncio.CancelledError:
            session.cancelled = True  # Envoy reset the stream rather than closing it
            raise
        finally:
            self.active.discard(session)
            if not self.active:
                self._idle.set()
            try:
                session.close()
            except Exception:
                logger.opt(exception=True).error("closing stream failed")
