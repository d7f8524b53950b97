"""Tracer provider and exporters, configured by the standard OTEL_* variables.

``OTEL_TRACES_EXPORTER`` (otlp | console | none, default otlp),
``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (grpc | http/protobuf), and the
exporters' own endpoint/header/TLS/timeout variables; ``OTEL_BSP_*`` for the
batch processor; ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` for the
resource; ``OTEL_TRACES_SAMPLER[_ARG]`` for the default sampler.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast

from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Tracer

import ext_proc
from ext_proc.telemetry.lean_span import LeanTracer
from ext_proc.telemetry.metrics.pipeline import exporter_names
from ext_proc.telemetry.metrics.spans import BoundedSpanProcessor, SpanPipelineStats
from ext_proc.telemetry.otel_env import build_resource, chosen_exporter
from ext_proc.telemetry.otlp_logs import build_log_exporter

INSTRUMENTATION_NAME: Final = "ext_proc"


def _grpc_span_exporter() -> SpanExporter:
    # The SDK's exporter sending the same request, written as bytes ~2.5x faster
    # (ext_proc.telemetry.otlp_encode, ext_proc.telemetry.otlp_export); http/protobuf
    # keeps the SDK's encoder (no hook for it).
    from ext_proc.telemetry.otlp_export import FastOTLPSpanExporter
    return FastOTLPSpanExporter()


def _http_span_exporter() -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def build_span_exporter(env: Mapping[str, str] | None = None) -> SpanExporter | None:
    """The exporter named by OTEL_TRACES_EXPORTER, or None for ``none``."""
    return chosen_exporter(os.environ if env is None else env, "TRACES", ConsoleSpanExporter,
                           _grpc_span_exporter, _http_span_exporter)


# Longest attribute value recorded when OTEL_[SPAN_]ATTRIBUTE_VALUE_LENGTH_LIMIT is
# unset (the SDK's own default is no limit): a hostile header cannot bloat a span.
DEFAULT_ATTRIBUTE_LENGTH: Final = 4096
_LENGTH_VARS: Final = (
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT")


def span_limits(env: Mapping[str, str] | None = None) -> SpanLimits:
    env = os.environ if env is None else env
    for name in _LENGTH_VARS:  # the span-specific variable first, as the SDK reads them
        value = (env.get(name) or "").strip()
        if value.isdigit():
            return SpanLimits(max_attribute_length=int(value))
    return SpanLimits(max_attribute_length=DEFAULT_ATTRIBUTE_LENGTH)


@dataclass(frozen=True)
class Telemetry:
    """Handles the app keeps for the hot path and for shutdown."""

    tracer_provider: TracerProvider
    tracer: Tracer
    exporter: SpanExporter | None = None  # the span exporter it built, if any

    def shutdown(self) -> None:
        self.tracer_provider.force_flush()
        self.tracer_provider.shutdown()


def build_telemetry(
    sampler: Sampler | None = None, exporter: SpanExporter | None = None, *, from_env: bool = True,
    span_stats: SpanPipelineStats | None = None,
    wrap: Callable[[SpanProcessor], SpanProcessor] | None = None,
) -> Telemetry:
    """Provider + batch export. Tests pass an in-memory exporter and from_env=False.

    With `span_stats` the batch processor counts what it drops, exports and fails;
    `wrap` decorates the exporting processor (keep-errors sampling).
    """
    limits = span_limits()
    provider = TracerProvider(resource=build_resource(), sampler=sampler, span_limits=limits)
    if exporter is None and from_env:
        exporter = build_span_exporter()
    if exporter is not None:
        processor: SpanProcessor = (BatchSpanProcessor(exporter) if span_stats is None
                                    else BoundedSpanProcessor(exporter, span_stats))
        provider.add_span_processor(wrap(processor) if wrap is not None else processor)
    scope = InstrumentationScope(INSTRUMENTATION_NAME, ext_proc.__version__)
    sdk_tracer = cast(SdkTracer, provider.get_tracer(scope.name, scope.version))
    tracer = LeanTracer(sdk_tracer, scope, limits.max_attribute_length,
                        limits.max_span_attributes)
    return Telemetry(provider, tracer, exporter)


def check_exporters(otlp_logs: bool, env: Mapping[str, str] | None = None) -> None:
    """Build (and drop) the exporters `serve` would build: raises TelemetryConfigError
    for a value `serve` would refuse."""
    env = os.environ if env is None else env
    exporter = build_span_exporter(env)
    if exporter is not None:
        exporter.shutdown()
    exporter_names(env)
    if otlp_logs:
        logs = build_log_exporter(env)
        if logs is not None:
            logs.shutdown()
