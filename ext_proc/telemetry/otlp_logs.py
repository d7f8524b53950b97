"""Correlated loguru records, also sent through the OpenTelemetry logs SDK.

Off by default (``otlp_logs.enabled``); stdout JSON stays. A loguru sink turns
each record into an OTel log record whose trace_id/span_id come from the
record's ``extra`` (set by the correlation patcher or bound explicitly, as the
access line does), so any OTLP log backend joins logs to traces. The exporter
follows ``OTEL_LOGS_EXPORTER`` (otlp | console | none, default otlp) and
``OTEL_EXPORTER_OTLP[_LOGS]_PROTOCOL``; batching follows ``OTEL_BLRP_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from loguru import logger
from opentelemetry._logs import SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    ConsoleLogRecordExporter,
    LogRecordExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

import ext_proc
from ext_proc.config.telemetry import OtlpLogsSettings
from ext_proc.telemetry.logs import sink_added
from ext_proc.telemetry.otel_env import TelemetryConfigError, chosen_exporter

if TYPE_CHECKING:
    from loguru import Message, Record

SCOPE: Final = "ext_proc"
_CORRELATION: Final = frozenset({"trace_id", "span_id", "trace_flags"})
_SEVERITY: Final = {
    "TRACE": SeverityNumber.TRACE, "DEBUG": SeverityNumber.DEBUG, "INFO": SeverityNumber.INFO,
    "SUCCESS": SeverityNumber.INFO2, "WARNING": SeverityNumber.WARN,
    "ERROR": SeverityNumber.ERROR, "CRITICAL": SeverityNumber.FATAL,
}


class OtlpLogsConfigError(TelemetryConfigError):
    """An OTEL_LOGS_* variable has a value we cannot use."""


def _grpc_log_exporter() -> LogRecordExporter:
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    return OTLPLogExporter()


def _http_log_exporter() -> LogRecordExporter:
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    return OTLPLogExporter()


def build_log_exporter(env: Mapping[str, str] | None = None) -> LogRecordExporter | None:
    """The exporter named by OTEL_LOGS_EXPORTER, or None for ``none``."""
    return chosen_exporter(os.environ if env is None else env, "LOGS", ConsoleLogRecordExporter,
                           _grpc_log_exporter, _http_log_exporter, OtlpLogsConfigError)


def _hex_int(value: Any, length: int) -> int | None:
    if not isinstance(value, str) or len(value) != length:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


def record_context(extra: Mapping[str, Any]) -> Context | None:
    """A context holding the record's span, from the hex ids in ``extra``; None if absent."""
    trace_id = _hex_int(extra.get("trace_id"), 32)
    span_id = _hex_int(extra.get("span_id"), 16)
    if trace_id is None or span_id is None:
        return None
    flags = _hex_int(extra.get("trace_flags"), 2)
    span = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False,
                                        trace_flags=TraceFlags(flags if flags else 1)))
    return set_span_in_context(span)


def _attribute(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    return str(value)


class OtlpLogSink:
    """A loguru sink: one OTel log record per loguru record."""

    def __init__(self, provider: LoggerProvider) -> None:
        self._logger = provider.get_logger(SCOPE, ext_proc.__version__)

    def __call__(self, message: Message) -> None:
        self.emit(message.record)

    def emit(self, record: Record) -> None:
        extra = record["extra"]
        attributes = {k: _attribute(v) for k, v in extra.items()
                      if k not in _CORRELATION and v is not None}
        exc = record["exception"]
        if exc is not None and exc.type is not None:
            attributes["exception.type"] = exc.type.__name__
            attributes["exception.message"] = str(exc.value)
        level = record["level"].name
        self._logger.emit(
            timestamp=int(record["time"].timestamp() * 1e9),
            context=record_context(extra),
            severity_number=_SEVERITY.get(level, SeverityNumber.UNSPECIFIED),
            severity_text=level,
            body=record["message"],
            attributes=attributes,
        )


class OtlpLogs:
    """The logs pipeline: `install` adds the loguru sink, `shutdown` flushes and removes it."""

    def __init__(self, settings: OtlpLogsSettings, provider: LoggerProvider) -> None:
        self._settings = settings
        self.provider = provider
        self._handler: int | None = None

    def install(self) -> None:
        if self._handler is None:
            sink_added()  # access lines must reach this sink too
            self._handler = logger.add(OtlpLogSink(self.provider), level=self._settings.level,
                                       format="{message}", backtrace=False, diagnose=False,
                                       catch=True)

    def shutdown(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            logger.remove(handler)
        self.provider.force_flush()
        self.provider.shutdown()


def build_otlp_logs(
    settings: OtlpLogsSettings,
    resource: Resource | None = None,
    exporter: LogRecordExporter | None = None,
    env: Mapping[str, str] | None = None,
) -> OtlpLogs | None:
    """The pipeline when enabled and OTEL_LOGS_EXPORTER is not ``none``; tests pass `exporter`."""
    if not settings.enabled:
        return None
    exporter = exporter if exporter is not None else build_log_exporter(env)
    if exporter is None:
        return None
    provider = LoggerProvider(resource=resource or Resource.create(), shutdown_on_exit=False)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return OtlpLogs(settings, provider)
