"""Issue #6: RED metrics scraped by a real Prometheus, OTLP metrics and logs at a real receiver.

Traffic goes through a real Envoy to the sidecar; Prometheus (Debian package,
installed by ``make test``) scrapes the sidecar's admin endpoint every second;
PromQL over its HTTP API must return the request count and a p95 for that
traffic, and exemplars that name the gateway spans.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedMetric
from ext_proc.dev.devstack import Proc, Stack, free_port, wait_until
from ext_proc.telemetry.metrics.red import DURATION_BUCKETS
from tests.conftest import http_request
from tests.e2e.conftest import SIDECAR_SERVICE, gateway_spans, tag, with_query

pytestmark = pytest.mark.e2e

ROUTE = "/api/users"
REQUESTS = 20


class Prometheus:
    """A real Prometheus server scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: run `make test` (it installs it)"
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "sidecar", "static_configs": [{"targets": [target]}]}],
        }))
        self.proc = Proc("prometheus", [
            binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.path={workdir / 'tsdb'}", "--enable-feature=exemplar-storage",
            "--log.level=warn",
        ], workdir / "prometheus.log")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def scalar(self, promql: str) -> float | None:
        result = self.api("query", query=promql)["result"]
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"prometheus exited:\n{self.proc.output()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def metrics_stack(receiver: OtlpReceiver, admin_port: int,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
           "EXTPROC_OTLP_LOGS__ENABLED": "true"}
    with Stack(tmp_path_factory.mktemp("metrics"), receiver.endpoint, sidecar_env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def prometheus(metrics_stack: Stack, admin_port: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{admin_port}")
    prom.proc.start()
    try:
        wait_until(prom.ready, 20, "prometheus to be ready")
        yield prom
    finally:
        prom.proc.stop()


@pytest.fixture(scope="module")
def traffic(metrics_stack: Stack) -> str:
    """REQUESTS requests to ROUTE and two to an unknown path, all tagged."""
    t = tag()
    for _ in range(REQUESTS):
        assert http_request(metrics_stack.base_url, f"{ROUTE}?tag={t}").status == 200
    for _ in range(2):
        assert http_request(metrics_stack.base_url, f"/no-such-route?tag={t}").status == 404
    return t


def _durations_s(stack: Stack) -> list[float]:
    return sorted(line["duration_ms"] / 1000 for line in stack.sidecar_lines()
                  if line.get("msg") == "access" and line.get("path") == ROUTE)


def test_prometheus_sees_request_count_and_p95(
        metrics_stack: Stack, prometheus: Prometheus, traffic: str) -> None:
    selector = f'http_server_request_duration_seconds_count{{http_route="{ROUTE}"}}'
    count_query = f"sum({selector})"
    wait_until(lambda: prometheus.scalar(count_query) == REQUESTS, 20,
               "Prometheus to scrape the request count")
    labels = prometheus.api("series", **{"match[]": selector})
    assert {s["http_request_method"] for s in labels} == {"GET"}
    assert {s["http_response_status_code"] for s in labels} == {"200"}

    p95 = prometheus.scalar(
        "histogram_quantile(0.95, sum by (le) (http_server_request_duration_seconds_bucket"
        f'{{http_route="{ROUTE}"}}))')
    assert p95 is not None and math.isfinite(p95) and p95 > 0
    # The quantile lies in the bucket holding the 19th of the 20 sorted durations.
    durations = _durations_s(metrics_stack)
    assert len(durations) == REQUESTS
    rank_sample = durations[math.ceil(0.95 * REQUESTS) - 1]
    bounds = (0.0, *DURATION_BUCKETS)
    upper = next(i for i, b in enumerate(bounds) if rank_sample <= b)
    print(f"p95 from Prometheus {p95 * 1000:.2f} ms, sample {rank_sample * 1000:.2f} ms")
    assert bounds[upper - 1] <= p95 <= bounds[upper]

    unmatched = prometheus.scalar(
        'sum(http_server_request_duration_seconds_count{http_route="_OTHER",'
        'http_response_status_code="404"})')
    assert unmatched == 2


def test_prometheus_exemplars_name_the_gateway_spans(
        receiver: OtlpReceiver, prometheus: Prometheus, traffic: str) -> None:
    assert receiver.wait_for(
        lambda: len(gateway_spans(receiver, with_query(traffic))) == REQUESTS + 2, 10)
    trace_ids = {s.trace_id for s in gateway_spans(receiver, with_query(traffic))}
    query = f'http_server_request_duration_seconds_bucket{{http_route="{ROUTE}"}}'

    def exemplar_ids() -> set[str]:
        now = time.time()
        found = prometheus.api("query_exemplars", query=query,
                               start=str(now - 300), end=str(now + 60))
        return {ex["labels"]["trace_id"] for series in found for ex in series["exemplars"]}
    wait_until(lambda: bool(exemplar_ids()), 20, "Prometheus to store exemplars")
    assert exemplar_ids() <= trace_ids


def _points(receiver: OtlpReceiver, name: str) -> list[tuple[ReceivedMetric, Any]]:
    return [(m, p) for m in receiver.metrics()
            if m.name == name and m.resource.get("service.name") == SIDECAR_SERVICE
            for p in m.data_points]


def test_otlp_receiver_gets_red_and_self_metrics(receiver: OtlpReceiver, traffic: str) -> None:
    def route_count() -> int:
        counts = [p.count for _, p in _points(receiver, "http.server.request.duration")
                  if p.attributes.get("http.route") == ROUTE]
        return max(counts, default=0)
    assert receiver.wait_for(lambda: route_count() >= REQUESTS, 15)
    metric, point = next((m, p) for m, p in _points(receiver, "http.server.request.duration")
                         if p.attributes.get("http.route") == ROUTE)
    assert (metric.unit, metric.type) == ("s", "histogram")
    assert point.explicit_bounds == DURATION_BUCKETS
    assert point.attributes == {"http.request.method": "GET", "http.route": ROUTE,
                                "http.response.status_code": 200}
    active = _points(receiver, "http.server.active_requests")
    assert active and all(p.attributes == {"http.request.method": "GET"} for _, p in active)

    def self_metrics_seen() -> bool:
        phases = {p.attributes.get("extproc.phase")
                  for _, p in _points(receiver, "extproc.phase.duration")}
        exported = [p.value for _, p in _points(receiver, "otel.sdk.exporter.span.exported")
                    if "error.type" not in p.attributes]
        # the lean envoy.yaml sends one phase per request (no response phase)
        return "request_headers" in phases and max(exported, default=0) > 0
    assert receiver.wait_for(self_metrics_seen, 15)
    names = {m.name for m in receiver.metrics()}
    assert {"otel.sdk.processor.span.processed", "otel.sdk.processor.span.queue.size",
            "extproc.stream.active"} <= names


def test_otlp_log_records_carry_the_span_trace_ids(
        receiver: OtlpReceiver, traffic: str) -> None:
    assert receiver.wait_for(
        lambda: len(gateway_spans(receiver, with_query(traffic))) == REQUESTS + 2, 10)
    spans = {s.trace_id: s for s in gateway_spans(receiver, with_query(traffic))}

    def access_records() -> list[Any]:
        return [r for r in receiver.log_records()
                if r.body == "access" and r.trace_id in spans]
    assert receiver.wait_for(lambda: len(access_records()) == REQUESTS + 2, 15)
    for record in access_records():
        span = spans[record.trace_id]
        assert record.span_id == span.span_id
        assert record.severity_text == "INFO" and record.severity_number == 9
        assert record.attributes["path"] == span.attributes["url.path"]
        assert record.resource.get("service.name") == SIDECAR_SERVICE


def test_text_exposition_passes_promtool(metrics_stack: Stack, admin_port: int,
                                        traffic: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is not installed: run `make test`"
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = resp.read()
    assert b"http_server_request_duration_seconds_bucket" in body
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                             timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_admin_endpoint_health_and_masked_config(metrics_stack: Stack, admin_port: int) -> None:
    base = f"http://127.0.0.1:{admin_port}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(base + "/config", timeout=5) as resp:
        config = json.loads(resp.read())
    assert config["admin"]["listen"] == f"127.0.0.1:{admin_port}"
    assert config["otlp_logs"]["enabled"] is True
