"""Prometheus text / OpenMetrics rendering and the metrics pipeline's env handling."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.trace import SpanContext, TraceFlags

from ext_proc.config.telemetry import MetricsSettings
from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry.metrics.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    label_name,
    metric_name,
    render,
    wants_openmetrics,
)
from ext_proc.telemetry.metrics.pipeline import (
    MetricsConfigError,
    PullReader,
    build_metrics,
    exporter_names,
)
from ext_proc.telemetry.otel_env import TelemetryConfigError

CTX = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False, TraceFlags(1))
OM_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def scraped(accept: str | None, **settings: object) -> tuple[str, str]:
    metrics = build_metrics(MetricsSettings(**settings), pull=True, readers=())  # type: ignore[arg-type]
    assert metrics.red is not None and metrics.pull is not None and metrics.runtime is not None
    metrics.red.stream_started("GET", "/api/users")
    metrics.red.stream_finished(ExchangeRecord("GET", '/a"b\\c', 200, None, 0.02, CTX))
    metrics.runtime.observe_rejections(lambda: {"b3": 2})
    ctype, body = metrics.pull.scrape(accept)
    return ctype, body.decode()


@pytest.mark.parametrize(("name", "unit", "counter", "expected"), [
    ("http.server.request.duration", "s", False, "http_server_request_duration_seconds"),
    ("http.server.active_requests", "{request}", False, "http_server_active_requests"),
    ("extproc.propagation.rejected", "{header}", True, "extproc_propagation_rejected"),
    ("http.server.request.body.size", "By", False, "http_server_request_body_size_bytes"),
    ("x_seconds", "s", False, "x_seconds"),
    ("requests_total", "", True, "requests"),
    ("9lives", "", False, "_9lives"),
])
def test_metric_names_follow_the_otel_prometheus_rules(
        name: str, unit: str, counter: bool, expected: str) -> None:
    assert metric_name(name, unit, counter=counter) == expected


def test_label_names_are_sanitised() -> None:
    assert label_name("http.request.method") == "http_request_method"
    assert label_name("1a") == "key_1a"


def test_accept_header_negotiates_openmetrics() -> None:
    assert wants_openmetrics(OM_ACCEPT)
    assert not wants_openmetrics("text/plain;version=0.0.4")
    assert not wants_openmetrics(None)


def test_openmetrics_has_exemplars_units_counter_families_and_eof() -> None:
    ctype, text = scraped(OM_ACCEPT)
    assert ctype == OPENMETRICS_CONTENT_TYPE
    assert text.endswith("# EOF\n")
    assert "# UNIT http_server_request_duration_seconds seconds" in text
    assert "# TYPE extproc_propagation_rejected counter" in text
    assert 'extproc_propagation_rejected_total{extproc_propagation_format="b3"} 2' in text
    assert "# TYPE target info" in text
    bucket = next(line for line in text.splitlines()
                  if line.startswith("http_server_request_duration_seconds_bucket")
                  and 'le="0.025"' in line)
    assert bucket.split(" # ")[0].endswith(" 1")
    assert '# {trace_id="4bf92f3577b34da6a3ce929d0e0e4736",span_id="00f067aa0ba902b7"} 0.02 ' \
        in bucket


def test_text_format_has_no_exemplars_and_names_counters_with_total() -> None:
    ctype, text = scraped("text/plain")
    assert ctype == TEXT_CONTENT_TYPE
    assert "# EOF" not in text and "trace_id" not in text
    assert "# TYPE extproc_propagation_rejected_total counter" in text
    assert "# TYPE http_server_active_requests gauge" in text
    assert 'http_server_active_requests{http_request_method="GET"} 0' in text


def test_label_values_are_escaped() -> None:
    _, text = scraped(None)
    assert 'http_route="/a\\"b\\\\c"' in text


def test_exemplars_off_renders_none() -> None:
    _, text = scraped(OM_ACCEPT, exemplars=False)
    assert "trace_id" not in text


def test_render_of_nothing_is_valid() -> None:
    assert render(None, openmetrics=True) == b"# EOF\n"
    assert render(None, openmetrics=False) == b"\n"


@pytest.mark.parametrize(("value", "expected"), [
    (None, {"otlp"}), ("none", set()), ("prometheus", {"prometheus"}),
    ("otlp, console", {"otlp", "console"}), ("OTLP", {"otlp"}),
])
def test_metrics_exporter_names_from_env(value: str | None, expected: set[str]) -> None:
    env = {} if value is None else {"OTEL_METRICS_EXPORTER": value}
    assert exporter_names(env) == expected


def test_unknown_metrics_exporter_or_protocol_is_a_config_error() -> None:
    with pytest.raises(MetricsConfigError, match="OTEL_METRICS_EXPORTER"):
        exporter_names({"OTEL_METRICS_EXPORTER": "statsd"})
    with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        build_metrics(MetricsSettings(), env={"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})


def test_prometheus_exporter_means_a_pull_reader_and_console_a_push_reader() -> None:
    pulled = build_metrics(MetricsSettings(), env={"OTEL_METRICS_EXPORTER": "prometheus"})
    assert isinstance(pulled.pull, PullReader) and pulled.readers == (pulled.pull,)
    pushed = build_metrics(MetricsSettings(), env={"OTEL_METRICS_EXPORTER": "console",
                                                    "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
    try:
        assert pushed.pull is None
        (reader,) = pushed.readers
        assert isinstance(reader, PeriodicExportingMetricReader)
        assert isinstance(reader._exporter, ConsoleMetricExporter)
        assert reader._export_interval_millis == 60000
    finally:
        pushed.shutdown(timeout_s=1)
        pulled.shutdown(timeout_s=1)


def test_none_builds_no_reader() -> None:
    metrics = build_metrics(MetricsSettings(), env={"OTEL_METRICS_EXPORTER": "none"})
    assert metrics.readers == () and metrics.pull is None
