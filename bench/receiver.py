"""A cheap OTLP/gRPC sink for the bench: it counts spans and decodes nothing else.

The demo's ``OtlpReceiver`` turns every span into Python objects; at the native
tracer's rate that alone would eat a good part of a core on the box being
measured, and more for the rows that export more. Counting the spans of an
already-parsed request costs about a microsecond each.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class SpanCounter:
    """Counts the spans of every trace export; accepts metrics and logs unread."""

    _MAX_MESSAGE: Final = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spans = 0
        self._servers = 0  # of them, SERVER spans (one per request, with phase spans too)
        self._exports = 0
        self._server: grpc.Server | None = None
        self._open = threading.Event()  # cleared: trace exports wait (a stalled collector)
        self._open.set()
        self.port = 0

    def start(self) -> int:
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="bench-rx"),
                             options=[("grpc.max_receive_message_length", self._MAX_MESSAGE)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> int:
        with self._cond:
            return self._spans

    @property
    def server_spans(self) -> int:
        with self._cond:
            return self._servers

    def add(self, count: int, servers: int = 0) -> None:
        with self._cond:
            self._spans += count
            self._servers += servers
            self._exports += 1
            self._cond.notify_all()

    def stall(self) -> None:
        """From now on, trace exports hang (up to 60 s) until `resume`: a stalled collector."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def admit(self) -> None:
        """Called by each trace export before it is counted: waits out a stall."""
        self._open.wait(60)

    def wait_for(self, spans: int, timeout: float, settle: float = 3.0) -> int:
        """Wait until at least `spans` spans arrived, nothing new arrived for `settle`
        seconds, or `timeout` passed; the count then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen, changed = self._spans, time.monotonic()
            while self._spans < spans:
                now = time.monotonic()
                if now >= deadline or now - changed >= settle:
                    break
                self._cond.wait(min(deadline, changed + settle) - now)
                if self._spans != seen:
                    seen, changed = self._spans, time.monotonic()
            return self._spans


_SERVER: Final = 2  # Span.SpanKind.SPAN_KIND_SERVER


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, counter: SpanCounter) -> None:
        self._counter = counter

    def Export(self, request: Any, context: Any) -> Any:
        self._counter.admit()
        spans = [s for rs in request.resource_spans for ss in rs.scope_spans
                 for s in ss.spans]
        self._counter.add(len(spans), sum(1 for s in spans if s.kind == _SERVER))
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return logs_service_pb2.ExportLogsServiceResponse()
