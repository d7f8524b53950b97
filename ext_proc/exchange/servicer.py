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
from ext_proc.exchange.session import StreamDeps, StreamSession
from ext_proc.h2grpc.direct import DirectMethod, Metadata
from ext_proc.request.route_options import RouteOptionsCache


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """Answers Envoy first, records after, ends every span exactly once."""

    def __init__(self, deps: StreamDeps, route_options: RouteOptionsCache,
                 phase_timer: Callable[[str | None, int], None] | None = None) -> None:
        self._deps = deps
        self._phase_timer = phase_timer  # (phase, ns spent answering), called after the answer
        self._route_options = route_options
        policy = deps.policy
        sampling = policy.sampling if policy is not None else None
        # the digest of the prefilter Envoy runs, against the live plan's
        self._prefilter = sampling.prefilter_watch if sampling is not None else None
        self.active: set[StreamSession] = set()  # live streams, for shutdown and tests
        self.accepting = True  # False while shutting down: new streams are refused
        self._idle = asyncio.Event()  # set whenever `active` becomes empty

    async def drained(self) -> None:
        """Return once no ext_proc stream is open (bound it with asyncio.timeout)."""
        while self.active:
            await self._idle.wait()

    def open_exchange(self, metadata: Metadata) -> Exchange | None:
        """One ext_proc stream's exchange, or None while shutting down."""
        if not self.accepting:  # Envoy lets the request through untraced (fail open)
            return None
        options = self._route_options.get(metadata)
        if self._prefilter is not None:
            self._prefilter.observe(options.prefilter_digest)
        session = StreamSession(self._deps, options)
        self.active.add(session)
        self._idle.clear()
        return Exchange(self, session)

    def _ended(self, session: StreamSession) -> None:
        self.active.discard(session)
        if not self.active:
            self._idle.set()
        try:
            session.close()
        except Exception:
            logger.opt(exception=True).error("closing stream failed")

    def direct_method(self) -> DirectMethod:
        """`Process` as direct calls of the h2 engine (`ext_proc.h2grpc.direct`)."""
        return DirectMethod(self.open_exchange, pb.ProcessingRequest.FromString,
                            pb.ProcessingResponse.SerializeToString, "shutting down")

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = self.open_exchange(context.invocation_metadata() or ())
        if exchange is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            return
        cancelled = False
        try:
            async for request in request_iterator:
                response = exchange.message(request)
                if response is not None:
                    yield response
                exchange.answered()
        except asyncio.CancelledError:
            cancelled = True  # Envoy reset the stream rather than closing it
            raise
        finally:
            exchange.end(cancelled, unanswered=False)


class Exchange:
    """One ext_proc stream: answer each message first, record after, end once
    (an `ext_proc.h2grpc.direct.DirectStream`; `Process` drives it on grpc.aio)."""

    __slots__ = ("_correlated", "_elapsed", "_processor", "_request", "session")

    def __init__(self, processor: ExternalProcessor, session: StreamSession) -> None:
        self._processor = processor
        self.session = session
        self._correlated = False
        self._request: pb.ProcessingRequest | None = None
        self._elapsed = 0

    def message(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        started = time.perf_counter_ns()
        response = self.session.handle(request)
        self._elapsed = time.perf_counter_ns() - started
        self._request = request  # its phase is looked up after the answer
        return None if request.observability_mode else response

    def answered(self) -> None:
        session = self.session
        timer = self._processor._phase_timer
        if timer is not None and self._request is not None:
            timer(self._request.WhichOneof("request"), self._elapsed)
        if not self._correlated and session.span is not None:
            # Each stream runs in a context of its own (its task, or its direct
            # call's), so the span stays current for every later log line of this
            # stream and no other.
            otel_context.attach(set_span_in_context(session.span))
            self._correlated = True
        session.record()

    def end(self, cancelled: bool, unanswered: bool) -> None:
        """`unanswered`: Envoy closed the stream before our answer reached it, so it
        went on without it (message timeout): the span waits for Envoy's access log
        only briefly, and says nothing of an outcome it does not know."""
        self.session.cancelled = cancelled
        self.session.abandoned = unanswered and not cancelled
        self._processor._ended(self.session)
