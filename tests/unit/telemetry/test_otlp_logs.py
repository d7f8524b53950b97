"""OTLP logs: loguru records become OTel log records joined to their spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger
from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter, InMemoryLogRecordExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import use_span

from ext_proc.config.telemetry import OtlpLogsSettings
from ext_proc.telemetry.logs import install_correlation
from ext_proc.telemetry.otlp_logs import (
    OtlpLogs,
    OtlpLogsConfigError,
    build_log_exporter,
    build_otlp_logs,
    record_context,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def pipeline() -> Iterator[tuple[OtlpLogs, InMemoryLogRecordExporter]]:
    exporter = InMemoryLogRecordExporter()
    logs = build_otlp_logs(OtlpLogsSettings(enabled=True, level="DEBUG"), exporter=exporter)
    assert logs is not None
    logs.install()
    yield logs, exporter
    logs.shutdown()


def exported(logs: OtlpLogs, exporter: InMemoryLogRecordExporter) -> list[object]:
    logs.provider.force_flush()
    return [r.log_record for r in exporter.get_finished_logs()]


def test_bound_trace_ids_become_the_record_context(
        pipeline: tuple[OtlpLogs, InMemoryLogRecordExporter]) -> None:
    logs, exporter = pipeline
    logger.bind(trace_id=TRACE_ID, span_id=SPAN_ID, trace_flags="01",
                method="GET", status=200, obj=[1, 2], nothing=None).info("access")
    (record,) = exported(logs, exporter)
    assert format(record.trace_id, "032x") == TRACE_ID  # type: ignore[attr-defined]
    assert format(record.span_id, "016x") == SPAN_ID  # type: ignore[attr-defined]
    assert record.body == "access"  # type: ignore[attr-defined]
    assert record.severity_text == "INFO"  # type: ignore[attr-defined]
    assert record.severity_number.value == 9  # type: ignore[attr-defined]
    assert dict(record.attributes) == {"method": "GET", "status": 200,  # type: ignore[attr-defined]
                                       "obj": "[1, 2]"}


def test_current_span_is_used_through_the_correlation_patcher(
        pipeline: tuple[OtlpLogs, InMemoryLogRecordExporter]) -> None:
    logs, exporter = pipeline
    install_correlation()
    span = TracerProvider().get_tracer("t").start_span("s")
    with use_span(span, end_on_exit=True):
        logger.warning("inside")
    logger.debug("outside")
    inside, outside = exported(logs, exporter)
    assert inside.trace_id == span.get_span_context().trace_id  # type: ignore[attr-defined]
    assert inside.severity_number.value == 13  # type: ignore[attr-defined]
    assert not outside.trace_id  # type: ignore[attr-defined]
    assert outside.severity_number.value == 5  # type: ignore[attr-defined]


def test_exceptions_are_recorded_as_attributes(
        pipeline: tuple[OtlpLogs, InMemoryLogRecordExporter]) -> None:
    logs, exporter = pipeline
    try:
        raise ValueError("boom")
    except ValueError:
        logger.opt(exception=True).error("failed")
    (record,) = exported(logs, exporter)
    assert record.attributes["exception.type"] == "ValueError"  # type: ignore[attr-defined]
    assert record.attributes["exception.message"] == "boom"  # type: ignore[attr-defined]


def test_level_threshold_and_shutdown_removes_the_sink() -> None:
    exporter = InMemoryLogRecordExporter()
    logs = build_otlp_logs(OtlpLogsSettings(enabled=True, level="WARNING"), exporter=exporter)
    assert logs is not None
    logs.install()
    logs.install()  # idempotent: one sink
    logger.info("dropped by level")
    logger.warning("kept")
    logs.shutdown()
    logger.warning("after shutdown")
    assert [r.log_record.body for r in exporter.get_finished_logs()] == ["kept"]


@pytest.mark.parametrize(("extra", "valid"), [
    ({"trace_id": TRACE_ID, "span_id": SPAN_ID}, True),
    ({"trace_id": TRACE_ID}, False),
    ({"trace_id": "0" * 32, "span_id": SPAN_ID}, False),
    ({"trace_id": "zz" * 16, "span_id": SPAN_ID}, False),
    ({"trace_id": TRACE_ID[:-1], "span_id": SPAN_ID}, False),
    ({"trace_id": 5, "span_id": SPAN_ID}, False),
])
def test_record_context_needs_well_formed_ids(extra: dict[str, object], valid: bool) -> None:
    assert (record_context(extra) is not None) is valid


def test_disabled_or_none_exporter_builds_nothing() -> None:
    assert build_otlp_logs(OtlpLogsSettings()) is None
    assert build_otlp_logs(OtlpLogsSettings(enabled=True),
                           env={"OTEL_LOGS_EXPORTER": "none"}) is None


def test_exporter_from_env() -> None:
    assert isinstance(build_log_exporter({"OTEL_LOGS_EXPORTER": "console"}),
                      ConsoleLogRecordExporter)
    grpc_exporter = build_log_exporter({})
    http_exporter = build_log_exporter({"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"})
    assert type(grpc_exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
    assert type(http_exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.http")
    for exporter in (grpc_exporter, http_exporter):
        assert exporter is not None
        exporter.shutdown()
    with pytest.raises(OtlpLogsConfigError, match="OTEL_LOGS_EXPORTER"):
        build_log_exporter({"OTEL_LOGS_EXPORTER": "syslog"})
    with pytest.raises(OtlpLogsConfigError, match="PROTOCOL"):
        build_log_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})
