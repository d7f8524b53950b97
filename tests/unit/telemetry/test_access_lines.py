"""Access lines: the same JSON whether they bypass loguru or go through it."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator

import pytest
from loguru import logger
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.trace import SpanContext, TraceFlags

from ext_proc.config import LogSettings
from ext_proc.config.telemetry import OtlpLogsSettings
from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry import logs
from ext_proc.telemetry.access_lines import AccessLog
from ext_proc.telemetry.otlp_logs import build_otlp_logs

RECORD = ExchangeRecord(
    method="GET", route="/users/{id}", status=200, error_type=None, duration_s=0.0123456,
    span_context=SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7,
                             is_remote=False, trace_flags=TraceFlags(1)),
    tenant="acme", path="/users/7", request_id="req-1")


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure_logging(LogSettings(format="json", level="INFO"), out)
    yield out
    logger.remove()
    logs.sink_added()  # leave no direct sink behind for other tests


def test_the_direct_line_equals_the_loguru_line(configured: io.StringIO) -> None:
    assert logs.direct_sink() is not None
    AccessLog().stream_finished(RECORD)
    direct = logs.direct_sink()
    logs.sink_added()  # from here on through loguru
    AccessLog().stream_finished(RECORD)
    logger.complete()
    assert direct is not None
    direct.stop()
    first, second = (json.loads(line) for line in configured.getvalue().splitlines())
    assert first.pop("ts")[:10] == second.pop("ts")[:10]
    assert first == second
    assert first == {"level": "INFO", "msg": "access",
                     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                     "span_id": "00f067aa0ba902b7", "trace_flags": "01", "method": "GET",
                     "path": "/users/7", "status": 200, "duration_ms": 12.346,
                     "request_id": "req-1", "tenant": "acme"}


@pytest.mark.parametrize("record", [
    RECORD,
    dataclasses.replace(RECORD, method=None, path=None, status=None, request_id=None,
                        tenant=None, duration_s=0.0),
    dataclasses.replace(RECORD, path='/q"uote\\back\nline\x00ctl/\u00fcnic\u00f6de/\U0001f600',
                        method="M\u00c9TH", request_id="r\u2028", duration_s=12345.6789012,
                        status=599, tenant="t\"x"),
], ids=["plain", "nulls", "odd-text"])
def test_the_written_line_is_what_json_dumps_makes(record: ExchangeRecord) -> None:
    line = AccessLog.line(record)
    document = json.loads(line)
    expected = json.dumps({"ts": document["ts"], "level": "INFO", "msg": "access",
                           **AccessLog.fields(record)}, default=str, separators=(",", ":"))
    assert line == expected


def test_no_direct_sink_when_info_lines_are_filtered() -> None:
    out = io.StringIO()
    logs.configure_logging(LogSettings(format="json", level="WARNING"), out)
    try:
        assert logs.direct_sink() is None
        AccessLog().stream_finished(RECORD)
        logger.complete()
        assert out.getvalue() == ""
    finally:
        logger.remove()


def test_no_direct_sink_for_console_lines() -> None:
    out = io.StringIO()
    logs.configure_logging(LogSettings(format="console", level="INFO"), out)
    try:
        assert logs.direct_sink() is None
        AccessLog().stream_finished(RECORD)
        assert "access" in out.getvalue() and "req-1" in out.getvalue()
    finally:
        logger.remove()


def test_otlp_logs_get_access_lines_too(configured: io.StringIO) -> None:
    exporter = InMemoryLogRecordExporter()
    pipeline = build_otlp_logs(OtlpLogsSettings(enabled=True, level="INFO"), exporter=exporter)
    assert pipeline is not None
    json_sink = logs.direct_sink()
    assert json_sink is not None
    pipeline.install()
    try:
        assert logs.direct_sink() is None
        AccessLog().stream_finished(RECORD)
        pipeline.provider.force_flush()
        (exported,) = [r.log_record for r in exporter.get_finished_logs()]
        assert exported.body == "access"
        assert exported.attributes is not None and exported.attributes["request_id"] == "req-1"
        logger.complete()
        json_sink.stop()  # flush its batch
        assert [json.loads(line)["request_id"]
                for line in configured.getvalue().splitlines()] == ["req-1"]
    finally:
        pipeline.shutdown()


def test_line_numbers_and_timestamp_are_what_json_and_datetime_write() -> None:
    import json as _json
    import math
    from datetime import UTC, datetime

    from ext_proc.telemetry.access_lines import _number, timestamp
    for value in (0.0, 1.5, 0.123, 1e-7, 123456789.125, 1e22, -0.0, math.inf, math.nan):
        assert _number(value) == _json.dumps(value)
    before = datetime.now(UTC)
    stamp = timestamp()
    after = datetime.now(UTC)
    assert len(stamp) == len(before.isoformat(timespec="microseconds"))
    assert stamp.endswith("+00:00")
    parsed = datetime.fromisoformat(stamp)
    assert before.replace(microsecond=0) <= parsed <= after
