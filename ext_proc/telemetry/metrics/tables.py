"""Explicit-bucket histograms aggregated in plain Python, merged into the SDK's output.

The SDK's synchronous histogram costs about 10 us per `record` and per reader (a copy
and a frozenset of the attributes, a lock, an exemplar filter looking up the current
span). Every request records two (duration, body size), and with the prefilter most
requests are counted from Envoy's access log in batches, where that cost is nearly all
the sidecar's work. A `HistogramTable` does the same aggregation with a tuple key the
caller already has, and each reader's collection gets its points as SDK `Metric`s,
in the ``ext_proc`` scope, with the SDK's semantics (tests compare the two):

- temporality per reader (cumulative, or delta with the interval's min/max, and no
  point for an interval without measurements);
- the cardinality limit: attribute sets beyond it go to one point with
  ``otel.metric.overflow=true``;
- exemplars as the aligned-bucket reservoir keeps them (the latest per bucket, each
  reported once per reader), filtered as ``OTEL_METRICS_EXEMPLAR_FILTER`` says.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import replace
from time import time_ns
from typing import Any, Final

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from ext_proc.request.seams import Bounded

_Offered = tuple[int, float, int, "SpanContext | None", "Mapping[str, Any] | None"]
OVERFLOW: Final = {"otel.metric.overflow": True}
_OVERFLOW_KEY: Final = ("otel.metric.overflow",)
# The SDK's default boundaries (an instrument without advice).
DEFAULT_BOUNDARIES: Final = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0,
    5000.0, 7500.0, 10000.0,
)
EXEMPLAR_FILTERS: Final = frozenset({"trace_based", "always_on", "always_off"})


class _Point:
    __slots__ = (
        "attributes",
        "counts",
        "exemplars",
        "high",
        "intervals",
        "low",
        "overflow",
        "start_ns",
        "total",
    )

    def __init__(self, attributes: Mapping[str, Any], buckets: int, deltas: int) -> None:
        self.attributes = dict(attributes)
        self.start_ns = time_ns()
        self.counts = [0] * buckets
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        # per bucket: (sequence number, value, time, span context, the measurement's
        # attributes when they are not the point's), the latest offered
        self.exemplars: list[_Offered | None] = [None] * buckets
        self.overflow = "otel.metric.overflow" in attributes
        # per delta reader: [count, sum, min, max, bucket counts] since its last collection
        self.intervals = [_interval(buckets) for _ in range(deltas)]


def _added(total: float, values: Sequence[float]) -> float:
    for value in values:
        total += value
    return total


def _interval(buckets: int) -> list[Any]:
    return [0, 0.0, math.inf, -math.inf, [0] * buckets]


class HistogramTable:
    """One histogram instrument. `record` runs on the event loop; readers collect from
    their own threads (one lock between them)."""

    def __init__(self, name: str, unit: str, description: str,
                 boundaries: Sequence[float] = DEFAULT_BOUNDARIES, *,
                 limit: int = 2000, exemplars: str = "trace_based") -> None:
        if exemplars not in EXEMPLAR_FILTERS:
            raise ValueError(f"exemplar filter {exemplars!r}: use one of "
                             f"{', '.join(sorted(EXEMPLAR_FILTERS))}")
        self.name, self.unit, self.description = name, unit, description
        self.boundaries = tuple(boundaries)
        self._buckets = len(self.boundaries) + 1
        self._limit = limit
        self._exemplars = exemplars
        self._points: dict[Hashable, _Point] = {}
        self._lock = threading.Lock()
        self._seq = 0  # exemplars offered so far
        self._deltas = 0  # delta readers registered (each has an interval slot)

    def __len__(self) -> int:
        return len(self._points)

    def bounded(self) -> Bounded:
        """Its attribute sets: up to the cardinality limit, plus the overflow point."""
        return Bounded(f"metrics.{self.name}", self.__len__, self._limit + 1)

    def add_delta_reader(self) -> int:
        """An interval slot for one delta reader (register before recording starts)."""
        with self._lock:
            slot = self._deltas
            self._deltas += 1
            for point in self._points.values():
                point.intervals.append(_interval(self._buckets))
            return slot

    def record(self, key: Hashable, value: float,
               attributes: Callable[[], Mapping[str, Any]],
               span_context: SpanContext | None = None) -> None:
        """Add `value` under `key`; `attributes` is called only for a new key."""
        index = bisect_left(self.boundaries, value)
        with self._lock:
            point = self._points.get(key)
            if point is None:
                point = self._new_point(key, attributes)
            point.counts[index] += 1
            point.total += value
            if value < point.low:
                point.low = value
            if value > point.high:
                point.high = value
            for interval in point.intervals:
                interval[0] += 1
                interval[1] += value
                interval[2] = min(interval[2], value)
                interval[3] = max(interval[3], value)
                interval[4][index] += 1
            mode = self._exemplars
            if mode == "always_off":
                return
            if span_context is not None and span_context.is_valid:
                if mode == "trace_based" and not span_context.trace_flags.sampled:
                    return
            elif mode == "trace_based":
                return
            else:
                span_context = None
            self._seq += 1
            point.exemplars[index] = (self._seq, value, time_ns(), span_context,
                                      attributes() if point.overflow else None)

    def record_many(self, key: Hashable, values: Sequence[float],
                    attributes: Callable[[], Mapping[str, Any]]) -> None:
        """`record(key, value, attributes)` for each of `values` (finite), none with a
        span (requests Envoy did not ask about), under one lock; sums in the same order."""
        if not values:
            return
        indexes = [bisect_left(self.boundaries, value) for value in values]
        low, high = min(values), max(values)
        with self._lock:
            point = self._points.get(key) or self._new_point(key, attributes)
            for index in indexes:
                point.counts[index] += 1
            point.total = _added(point.total, values)
            point.low, point.high = min(point.low, low), max(point.high, high)
            for interval in point.intervals:
                interval[0] += len(values)
                interval[1] = _added(interval[1], values)
                interval[2], interval[3] = min(interval[2], low), max(interval[3], high)
                for index in indexes:
                    interval[4][index] += 1
            if self._exemplars == "always_on":  # else none: no span, nothing sampled
                offered = attributes() if point.overflow else None
                for value, index in zip(values, indexes, strict=True):
                    self._seq += 1
                    point.exemplars[index] = (self._seq, value, time_ns(), None, offered)

    def _new_point(self, key: Hashable, attributes: Callable[[], Mapping[str, Any]]) -> _Point:
        attrs: Mapping[str, Any]
        if len(self._points) >= self._limit:
            key, attrs = _OVERFLOW_KEY, OVERFLOW
            found = self._points.get(key)
            if found is not None:
                return found
        else:
            attrs = attributes()
        point = self._points[key] = _Point(attrs, self._buckets, self._deltas)
        return point

    def collect(self, state: _ReaderState, now_ns: int) -> Metric | None:
        """This reader's view of the table: cumulative totals, or the interval's."""
        points: list[HistogramDataPoint] = []
        with self._lock:
            since = state.seq
            state.seq = self._seq
            for point in self._points.values():
                exemplars = [
                    Exemplar(dict(attrs) if attrs else None, value, at, *(
                        (context.span_id, context.trace_id) if context else (None, None)))
                    for slot in point.exemplars if slot is not None and slot[0] > since
                    for _, value, at, context, attrs in (slot,)]
                if state.slot is None:
                    points.append(HistogramDataPoint(
                        point.attributes, point.start_ns, now_ns, sum(point.counts),
                        point.total, tuple(point.counts), self.boundaries, point.low,
                        point.high, exemplars))
                    continue
                interval = point.intervals[state.slot]
                if not interval[0]:
                    continue
                points.append(HistogramDataPoint(
                    point.attributes, state.last_ns or point.start_ns, now_ns, interval[0],
                    interval[1], tuple(interval[4]), self.boundaries, interval[2],
                    interval[3], exemplars))
                point.intervals[state.slot] = _interval(self._buckets)
            state.last_ns = now_ns
        if not points:
            return None
        return Metric(self.name, self.description, self.unit, Histogram(
            points, AggregationTemporality.DELTA if state.slot is not None
            else AggregationTemporality.CUMULATIVE))


class _ReaderState:
    __slots__ = ("last_ns", "seq", "slot")

    def __init__(self, slot: int | None) -> None:
        self.slot = slot  # interval slot of a delta reader, None for cumulative
        self.seq = 0  # exemplars up to this one were reported
        self.last_ns = 0  # the previous collection (a delta point's start)


def histogram_temporality(reader: MetricReader) -> AggregationTemporality:
    """What `reader` wants for histograms (the SDK keeps it by instrument class)."""
    for cls, temporality in getattr(reader, "_instrument_class_temporality", {}).items():
        if cls.__name__ == "_Histogram":
            return temporality
    return AggregationTemporality.CUMULATIVE


def attach(readers: Iterable[MetricReader], tables: Sequence[HistogramTable],
           resource: Resource, scope: InstrumentationScope) -> None:
    """Merge the tables into what each reader collects (after the provider set it up)."""
    for reader in readers:
        delta = histogram_temporality(reader) is AggregationTemporality.DELTA
        states = [(table, _ReaderState(table.add_delta_reader() if delta else None))
                  for table in tables]
        inner = reader._collect  # set by the MeterProvider for this reader
        if inner is None:
            raise RuntimeError("attach the tables after the MeterProvider is built")

        def collect(r: MetricReader, timeout_millis: float = 10_000, *,
                    inner: Any = inner, states: Any = states) -> MetricsData | None:
            data = inner(r, timeout_millis=timeout_millis)
            now = time_ns()
            ours = [m for table, state in states
                    if (m := table.collect(state, now)) is not None]
            return merge(data, ours, resource, scope)
        reader._collect = collect  # type: ignore[assignment]


def merge(data: MetricsData | None, metrics: list[Metric], resource: Resource,
          scope: InstrumentationScope) -> MetricsData | None:
    """`data` with `metrics` added to `scope` of `resource` (created when absent)."""
    if not metrics:
        return data
    resources = list(data.resource_metrics) if data is not None else []
    for i, rm in enumerate(resources):
        if rm.resource != resource:
            continue
        scopes = list(rm.scope_metrics)
        for j, sm in enumerate(scopes):
            if sm.scope.name == scope.name:
                scopes[j] = replace(sm, metrics=[*sm.metrics, *metrics])
                break
        else:
            scopes.append(ScopeMetrics(scope, metrics, scope.schema_url or ""))
        resources[i] = replace(rm, scope_metrics=scopes)
        break
    else:
        resources.append(ResourceMetrics(
            resource, [ScopeMetrics(scope, metrics, scope.schema_url or "")],
            resource.schema_url))
    return MetricsData(resources)
