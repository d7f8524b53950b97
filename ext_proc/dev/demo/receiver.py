"""A real, in-process OTLP/gRPC receiver for the demo and the tests.

The official opentelemetry-proto collector services (trace, metrics, logs) on a
sync ``grpc.server``; exports are decoded into frozen dataclasses of plain Python
values and a ``threading.Condition`` is notified on each, so callers ``wait_for``
a predicate without polling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

Attributes = dict[str, Any]
_SIGNALS: Final = ("traces", "metrics", "logs", "rejected")


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: Attributes
    status_code: int
    status_message: str
    resource: Attributes
    scope: str
    events: tuple[tuple[str, Attributes], ...] = ()

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

@dataclass(frozen=True)
class ReceivedExemplar:
    trace_id: str
    span_id: str
    value: float | int | None
    attributes: Attributes


@dataclass(frozen=True)
class ReceivedDataPoint:
    attributes: Attributes
    start_ns: int
    time_ns: int
    value: float | int | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    exemplars: tuple[ReceivedExemplar, ...] = ()


@dataclass(frozen=True)
class ReceivedMetric:
    name: str
    unit: str
    type: str  # "sum" | "gauge" | "histogram" | "exponential_histogram" | "summary"
    resource: Attributes
    scope: str
    data_points: tuple[ReceivedDataPoint, ...]
    description: str = ""
    is_monotonic: bool | None = None


@dataclass(frozen=True)
class ReceivedLog:
    body: str
    severity_text: str
    severity_number: int
    attributes: Attributes
    trace_id: str
    span_id: str
    resource: Attributes
    scope: str
    time_ns: int


def any_value(value: common_pb2.AnyValue) -> Any:
    """Decode an OTLP ``AnyValue`` into a Python value (lists and dicts included)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, which)


def attributes_of(pairs: Iterable[common_pb2.KeyValue]) -> Attributes:
    return {kv.key: any_value(kv.value) for kv in pairs}


def _hex(raw: bytes) -> str:
    return raw.hex() if raw and any(raw) else ""


def _number(point: Any) -> float | int | None:
    which = point.WhichOneof("value")
    return None if which is None else getattr(point, which)


def _exemplars(point: Any) -> tuple[ReceivedExemplar, ...]:
    return tuple(
        ReceivedExemplar(_hex(ex.trace_id), _hex(ex.span_id), _number(ex),
                         attributes_of(ex.filtered_attributes))
        for ex in point.exemplars)


def _point(kind: str, p: Any) -> ReceivedDataPoint:
    attrs, start, at = attributes_of(p.attributes), p.start_time_unix_nano, p.time_unix_nano
    if kind in ("sum", "gauge"):
        return ReceivedDataPoint(attrs, start, at, value=_number(p), exemplars=_exemplars(p))
    if kind == "histogram":
        return ReceivedDataPoint(
            attrs, start, at, count=p.count, sum=p.sum if p.HasField("sum") else None,
            bucket_counts=tuple(p.bucket_counts), explicit_bounds=tuple(p.explicit_bounds),
            exemplars=_exemplars(p))
    return ReceivedDataPoint(attrs, start, at, count=p.count, sum=p.sum)


def _metric_points(metric: metrics_pb2.Metric) -> tuple[str, tuple[ReceivedDataPoint, ...]]:
    kind = metric.WhichOneof("data") or ""
    data = getattr(metric, kind) if kind else None
    return kind, tuple(_point(kind, p) for p in (data.data_points if data else ()))


def decode_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    return [
        ReceivedSpan(
            trace_id=_hex(s.trace_id), span_id=_hex(s.span_id),
            parent_span_id=_hex(s.parent_span_id), name=s.name, kind=s.kind,
            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
            attributes=attributes_of(s.attributes), status_code=s.status.code,
            status_message=s.status.message, resource=attributes_of(rs.resource.attributes),
            scope=ss.scope.name,
            events=tuple((e.name, attributes_of(e.attributes)) for e in s.events))
        for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]


def decode_metrics(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> list[ReceivedMetric]:
    received: list[ReceivedMetric] = []
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind, points = _metric_points(m)
                received.append(ReceivedMetric(
                    name=m.name, unit=m.unit, type=kind,
                    resource=attributes_of(rm.resource.attributes), scope=sm.scope.name,
                    data_points=points, description=m.description,
                    is_monotonic=m.sum.is_monotonic if kind == "sum" else None))
    return received


def decode_logs(request: logs_service_pb2.ExportLogsServiceRequest) -> list[ReceivedLog]:
    return [
        ReceivedLog(
            body=str(any_value(r.body) or ""), severity_text=r.severity_text,
            severity_number=r.severity_number, attributes=attributes_of(r.attributes),
            trace_id=_hex(r.trace_id), span_id=_hex(r.span_id),
            resource=attributes_of(rl.resource.attributes), scope=sl.scope.name,
            time_ns=r.time_unix_nano)
        for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records
    ]


class OtlpReceiver:
    """OTLP/gRPC receiver collecting spans, metrics and logs in memory."""

    UNAVAILABLE_MESSAGE: Final = "receiver switched to unavailable"
    _MAX_MESSAGE: Final = 64 * 1024 * 1024

    def __init__(self, max_workers: int = 8) -> None:
        self._max_workers = max_workers
        self._cond = threading.Condition(threading.RLock())
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[ReceivedMetric] = []
        self._logs: list[ReceivedLog] = []
        self._counts = dict.fromkeys(_SIGNALS, 0)
        self._unavailable = False
        self._server: grpc.Server | None = None
        self._host = "127.0.0.1"
        self._port = 0

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="otlp-rx"),
            options=[("grpc.max_receive_message_length", self._MAX_MESSAGE)],
        )
        collectors = (
            (trace_service_pb2_grpc.add_TraceServiceServicer_to_server, "traces",
             decode_spans, self._spans, trace_service_pb2.ExportTraceServiceResponse),
            (metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server, "metrics",
             decode_metrics, self._metrics, metrics_service_pb2.ExportMetricsServiceResponse),
            (logs_service_pb2_grpc.add_LogsServiceServicer_to_server, "logs",
             decode_logs, self._logs, logs_service_pb2.ExportLogsServiceResponse),
        )
        for add, signal, decode, target, response in collectors:
            add(_Collector(self, signal, decode, target, response), server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind OTLP receiver on {host}:{port}")
        server.start()
        self._server, self._host, self._port = server, host, bound
        return bound

    def stop(self, grace: float | None = None) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    @property
    def endpoint(self) -> str:
        return f"http://{self._host}:{self._port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def metrics(self) -> list[ReceivedMetric]:
        with self._cond:
            return list(self._metrics)

    def log_records(self) -> list[ReceivedLog]:
        with self._cond:
            return list(self._logs)

    @property
    def export_counts(self) -> dict[str, int]:
        """Export calls per signal (traces, metrics, logs); ``rejected``: UNAVAILABLE answers."""
        with self._cond:
            return dict(self._counts)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` is true (re-checked on every export) or timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._metrics.clear()
            self._logs.clear()
            self._counts = dict.fromkeys(_SIGNALS, 0)
            self._cond.notify_all()

    def set_unavailable(self, flag: bool) -> None:
        with self._cond:
            self._unavailable = flag

    def _ingest(self, signal: str, items: Callable[[], list[Any]], target: list[Any],
                context: grpc.ServicerContext) -> None:
        """Record one export call (or reject it) and wake every ``wait_for``."""
        with self._cond:
            rejected = self._unavailable
            if not rejected:
                target.extend(items())
            self._counts["rejected" if rejected else signal] += 1
            self._cond.notify_all()
        if rejected:
            context.abort(grpc.StatusCode.UNAVAILABLE, self.UNAVAILABLE_MESSAGE)


class _Collector:
    """One collector service (the three share the ``Export`` shape)."""

    def __init__(
        self, receiver: OtlpReceiver, signal: str, decode: Callable[[Any], list[Any]],
        target: list[Any], response: Callable[[], Any],
    ) -> None:
        self._rx, self._signal, self._decode = receiver, signal, decode
        self._target, self._response = target, response

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._rx._ingest(self._signal, lambda: self._decode(request), self._target, context)
        return self._response()

