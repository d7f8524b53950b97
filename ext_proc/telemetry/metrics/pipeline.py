"""Meter provider and readers, configured by the standard OTEL_* variables.

``OTEL_METRICS_EXPORTER`` is a comma-separated list of otlp | prometheus |
console | none (default otlp). ``prometheus`` means "pull only": the admin
endpoint serves ``/metrics`` from a `PullReader` (any configured admin endpoint
does). ``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT`` and the OTLP exporter's
own variables (endpoint, headers, protocol, temporality) are honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from loguru import logger
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

import ext_proc
from ext_proc.config.telemetry import MetricsSettings
from ext_proc.telemetry.metrics.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    render,
    wants_openmetrics,
)
from ext_proc.telemetry.metrics.red import RedMetrics, RuntimeMetrics
from ext_proc.telemetry.metrics.spans import SpanPipelineStats
from ext_proc.telemetry.metrics.tables import EXEMPLAR_FILTERS, attach
from ext_proc.telemetry.otel_env import TelemetryConfigError, otlp_exporter

METER_NAME: Final = "ext_proc"
EXPORTERS: Final = frozenset({"otlp", "prometheus", "console", "none"})


class MetricsConfigError(TelemetryConfigError):
    """An OTEL_METRICS_* variable has a value we cannot use."""


def exporter_names(env: Mapping[str, str]) -> frozenset[str]:
    raw = env.get("OTEL_METRICS_EXPORTER") or "otlp"
    names = frozenset(n.strip().lower() for n in raw.split(",") if n.strip())
    unknown = names - EXPORTERS
    if unknown:
        raise MetricsConfigError(
            f"OTEL_METRICS_EXPORTER={raw!r}: use otlp, prometheus, console or none")
    return names - {"none"}


def _grpc_metric_exporter() -> MetricExporter:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def _http_metric_exporter() -> MetricExporter:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


def _otlp_exporter(env: Mapping[str, str]) -> MetricExporter:
    return otlp_exporter(env, "METRICS", _grpc_metric_exporter, _http_metric_exporter,
                         MetricsConfigError)


class PullReader(InMemoryMetricReader):
    """Collects on demand for a scrape (cumulative, so scrapes are independent)."""

    def scrape(self, accept: str | None) -> tuple[str, bytes]:
        """(content type, body) for one scrape; negotiates OpenMetrics from `accept`."""
        openmetrics = wants_openmetrics(accept)
        body = render(self.get_metrics_data(), openmetrics)
        return (OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE), body


@dataclass
class Metrics:
    """The metrics side of the app: provider, instruments and the scrape reader."""

    provider: MeterProvider
    meter: Meter
    red: RedMetrics | None
    runtime: RuntimeMetrics | None
    spans: SpanPipelineStats | None
    pull: PullReader | None = None
    readers: tuple[MetricReader, ...] = field(default_factory=tuple)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """One final export by every push reader, bounded by `timeout_s`, then stop.
        Best effort: an unreachable collector is logged, never raised (exit stays 0)."""
        try:
            self.provider.shutdown(timeout_millis=max(timeout_s, 0.1) * 1000)
        except Exception as exc:  # the SDK raises when a reader misses the deadline
            logger.warning("final metrics export incomplete", reason=str(exc)[:200])


def build_metrics(
    settings: MetricsSettings,
    resource: Resource | None = None,
    *,
    pull: bool = False,
    readers: tuple[MetricReader, ...] | None = None,
    env: Mapping[str, str] | None = None,
) -> Metrics:
    """Readers from OTEL_METRICS_EXPORTER (or `readers`, for tests) plus a pull reader
    when `pull` is set or the variable names ``prometheus``."""
    env = os.environ if env is None else env
    if readers is None:
        names = exporter_names(env)
        pull = pull or "prometheus" in names
        built: list[MetricReader] = []
        if "otlp" in names:
            built.append(PeriodicExportingMetricReader(_otlp_exporter(env)))
        if "console" in names:
            built.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        readers = tuple(built)
    pull_reader = PullReader() if pull else None
    all_readers = (*readers, *([pull_reader] if pull_reader else []))
    limit = settings.cardinality_limit
    resource = resource or Resource.create()
    exemplar_filter = (env.get("OTEL_METRICS_EXEMPLAR_FILTER") or "trace_based").strip().lower()
    if exemplar_filter not in EXEMPLAR_FILTERS:
        raise MetricsConfigError(f"OTEL_METRICS_EXEMPLAR_FILTER={exemplar_filter!r}: use "
                                 "trace_based, always_on or always_off")
    provider = MeterProvider(
        metric_readers=all_readers,
        resource=resource,
        views=[View(instrument_name="*", aggregation_cardinality_limit=limit)],
        # None: OTEL_METRICS_EXEMPLAR_FILTER, by default exemplars of sampled spans
        exemplar_filter=None if settings.exemplars else AlwaysOffExemplarFilter(),
        shutdown_on_exit=False,  # the app shuts it down, in order
    )
    meter = provider.get_meter(METER_NAME, ext_proc.__version__)
    enabled = settings.enabled
    spans = SpanPipelineStats() if settings.self_telemetry else None
    if spans is not None:
        spans.observe(meter)
    red = RedMetrics(meter, settings, exemplar_filter) if enabled else None
    runtime = RuntimeMetrics(meter) if settings.self_telemetry else None
    tables = (*(red.tables if red else ()), *(runtime.tables if runtime else ()))
    # the tables' histograms join every reader's collection
    attach(all_readers, tables, resource, InstrumentationScope(METER_NAME, ext_proc.__version__))
    return Metrics(
        provider=provider, meter=meter,
        red=red,
        runtime=runtime,
        spans=spans, pull=pull_reader, readers=all_readers,
    )
