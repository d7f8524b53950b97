"""Self-telemetry of the span pipeline: no span is dropped or lost silently.

`BoundedSpanProcessor` wraps the SDK `BatchSpanProcessor` and owns the queue
bound: it counts spans in flight (ended, not yet handed to the exporter) and
drops, counts and logs a span itself when ``OTEL_BSP_MAX_QUEUE_SIZE`` are
already in flight. The inner processor gets room for one more batch than that,
so it never drops on its own (its own drop would be silent to us). The
`CountingSpanExporter` sees each batch: exported, failed, export duration.
Counters are plain integers under a lock (the hot path does one increment);
`SpanPipelineStats.observe` turns them into observable instruments named after
the SDK self-observability conventions (``otel.sdk.*``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from loguru import logger
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from ext_proc.telemetry.throttle import Throttle

PROCESSED: Final = "otel.sdk.processor.span.processed"
QUEUE_SIZE: Final = "otel.sdk.processor.span.queue.size"
QUEUE_CAPACITY: Final = "otel.sdk.processor.span.queue.capacity"
EXPORTED: Final = "otel.sdk.exporter.span.exported"
EXPORT_DURATION: Final = "otel.sdk.exporter.operation.duration"
ERROR_TYPE: Final = "error.type"
QUEUE_FULL: Final = "queue_full"
ALREADY_SHUTDOWN: Final = "already_shutdown"
EXPORT_FAILED: Final = "export_failed"


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


# Spans held while the collector is slow or away (OTEL_BSP_MAX_QUEUE_SIZE overrides).
# One process at saturation makes ~2,500-3,400 spans/s with the h2 engine; 16384 holds
# ~5 s of that, so a 4 s collector stall loses nothing (tests/e2e/test_collector_stall.py:
# 21 % lost with 8192, 43 % with the SDK's 2048 under grpc.aio's lower rate), for
# ~4.4 KiB of memory per queued span (docs/reliability.md, section 3b).
DEFAULT_QUEUE_SIZE: Final = 16384

# Seconds: one OTLP export takes ~1 ms on loopback, tens of ms to a remote collector,
# and up to OTEL_BSP_EXPORT_TIMEOUT (30 s) when it hangs. Without this advice the SDK
# uses its default bounds (0, 5, 10 ... 10000), sized for milliseconds: every export
# fell in the first bucket and the dashboard's p95 read ~4.75 s.
EXPORT_DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
)


class SpanPipelineStats:
    """Thread-safe counters shared by the processor (event loop) and the exporter (worker)."""

    LOG_INTERVAL_S: Final = 10.0

    def __init__(self, capacity: int = DEFAULT_QUEUE_SIZE) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self.in_flight = 0
        self.handed = 0  # given to the exporter
        self.dropped: dict[str, int] = {QUEUE_FULL: 0, ALREADY_SHUTDOWN: 0}
        self.exported = 0
        self.failed = 0
        self._duration: Histogram | None = None
        self._drop_log = Throttle(self.LOG_INTERVAL_S)

    def admit(self, shutdown: bool) -> bool:
        """Reserve a queue slot for one ended span; count and report a drop instead."""
        with self._lock:
            reason = ALREADY_SHUTDOWN if shutdown else (
                QUEUE_FULL if self.in_flight >= self.capacity else None)
            if reason is None:
                self.in_flight += 1
                return True
            self.dropped[reason] += 1
            held = self._drop_log.ready()
            if held is None:
                return False
        logger.warning("spans dropped", reason=reason, dropped=held + 1, capacity=self.capacity)
        return False

    def handed_over(self, count: int) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - count)
            self.handed += count

    def export_done(self, count: int, ok: bool, seconds: float) -> None:
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.failed += count
        if self._duration is not None:
            self._duration.record(seconds, {ERROR_TYPE: EXPORT_FAILED} if not ok else None)
        if not ok:
            logger.warning("span export failed", spans=count)

    def observe(self, meter: Meter) -> None:
        """Expose the counters as instruments of `meter` (called once)."""
        self._duration = meter.create_histogram(
            EXPORT_DURATION, unit="s", description="Duration of span export operations.",
            explicit_bucket_boundaries_advisory=EXPORT_DURATION_BUCKETS)
        meter.create_observable_counter(
            PROCESSED, [self._processed], unit="{span}",
            description="Spans whose processing finished (error.type set: dropped).")
        meter.create_observable_up_down_counter(
            QUEUE_SIZE, [lambda _o: [Observation(self.in_flight)]], unit="{span}",
            description="Spans waiting in the batch queue.")
        meter.create_observable_up_down_counter(
            QUEUE_CAPACITY, [lambda _o: [Observation(self.capacity)]], unit="{span}",
            description="Spans the batch queue holds before dropping.")
        meter.create_observable_counter(
            EXPORTED, [self._exported], unit="{span}",
            description="Spans handed to the exporter (error.type set: export failed).")

    def _processed(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            out = [Observation(self.handed)]
            out += [Observation(n, {ERROR_TYPE: why}) for why, n in self.dropped.items()]
        return out

    def _exported(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(self.exported),
                    Observation(self.failed, {ERROR_TYPE: EXPORT_FAILED})]


class CountingSpanExporter(SpanExporter):
    """Delegates to `inner`; tells `stats` about every batch and its outcome."""

    def __init__(self, inner: SpanExporter, stats: SpanPipelineStats) -> None:
        self._inner = inner
        self._stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self._stats.handed_over(count)
        start = time.perf_counter()
        result = SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        finally:
            self._stats.export_done(count, result is SpanExportResult.SUCCESS,
                                    time.perf_counter() - start)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class BoundedSpanProcessor(SpanProcessor):
    """A `BatchSpanProcessor` whose drops are counted and logged (``OTEL_BSP_*`` honoured)."""

    def __init__(self, exporter: SpanExporter, stats: SpanPipelineStats,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        batch = _env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        stats.capacity = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE_SIZE)
        batch = min(batch, stats.capacity)
        self._stats = stats
        self._shutdown = False
        self._inner = BatchSpanProcessor(
            CountingSpanExporter(exporter, stats),
            max_queue_size=stats.capacity + batch, max_export_batch_size=batch,
            schedule_delay_millis=_env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
            export_timeout_millis=_env_int(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000),
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._stats.admit(self._shutdown):
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._shutdown = True
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
