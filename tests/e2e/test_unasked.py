"""Issue #18, item 2: every request is counted, asked or not (real Envoy, envoy/envoy.yaml).

A route with ``ExtProcPerRoute.disabled: true`` opens no ext_proc stream; the sidecar
learns of its requests from Envoy's gRPC access log only (no dynamic metadata in our
namespace). They get RED metrics and an access line, no span and no exemplar. Asked
requests (traced, and traced off per route) are still counted exactly once.
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import Config, Stack, hcm_of, wait_until
from tests.conftest import http_request
from tests.e2e.conftest import PER_ROUTE, gateway_spans, route_with_options, tag

pytestmark = pytest.mark.e2e

SKIPPED, ASKED, QUIET = 7, 5, 3  # requests per kind
SKIPPED_STATUS, ASKED_STATUS, QUIET_STATUS = 418, 419, 420
LEARNT, LEARNT_STATUS = 4, 423  # un-asked requests of a route whose asked ones taught us
SKIPPED_TOTAL = SKIPPED + 2 + 2  # plus two that fail with 503, two POSTs (405)


def _add_routes(config: Config) -> None:
    hcm = hcm_of(config)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {  # Envoy never asks the sidecar about these
        "name": "skipped", "match": {"prefix": "/skipped/"},
        "route": {"cluster": "users", "prefix_rewrite": "/status/"},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": PER_ROUTE, "disabled": True}},
    })
    routes.insert(0, {  # Envoy's route "status" again, never asked: as with the prefilter
        "name": "status", "match": {"prefix": "/status-unasked/"},
        "route": {"cluster": "users", "prefix_rewrite": "/status/"},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": PER_ROUTE, "disabled": True}},
    })
    quiet = route_with_options("/quiet/", "users", {"x-extproc-otel-tracing": "off"})
    quiet["route"]["prefix_rewrite"] = "/status/"
    routes.insert(0, quiet)  # asked, but no span: the answer sets no metadata
    for log in hcm["access_log"]:  # the tenant header reaches the sidecar in the entry
        if log["name"] == "envoy.access_loggers.http_grpc":
            log["typed_config"]["additional_request_headers_to_log"] = ["x-tenant"]


@pytest.fixture(scope="module")
def stack(receiver: OtlpReceiver, admin_port: int,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
           "EXTPROC_TENANTS__HEADER": "x-tenant",
           "EXTPROC_METRICS__TENANT_ATTRIBUTE": "true"}
    with Stack(tmp_path_factory.mktemp("unasked"), receiver.endpoint, sidecar_env=env,
               mutate_config=_add_routes) as running:
        yield running


_SAMPLE = re.compile(  # labels may hold braces: http_route="/status/{code}"
    r'^(?P<name>[a-z_]+)\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\} (?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _scrape(admin_port: int, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as resp:
        return str(resp.read().decode())


def _counts(admin_port: int, text: str | None = None) -> list[tuple[dict[str, str], float]]:
    """Every ``http_server_request_duration_seconds_count`` series on /metrics."""
    out = []
    for line in (text if text is not None else _scrape(admin_port)).splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == "http_server_request_duration_seconds_count":
            out.append((dict(_LABEL.findall(match["labels"])), float(match["value"])))
    return out


def _count(admin_port: int, status: int, text: str | None = None, **labels: str) -> float:
    return sum(value for series, value in _counts(admin_port, text)
               if series.get("http_response_status_code") == str(status)
               and all(series.get(k) == v for k, v in labels.items()))


def _access(stack: Stack, path: str) -> list[dict[str, Any]]:
    return [line for line in stack.sidecar_lines()
            if line.get("msg") == "access" and line.get("path") == path]


@pytest.fixture(scope="module")
def traffic(stack: Stack, admin_port: int) -> str:
    t = tag()
    asked_before = stack.envoy_stat("http.ingress.ext_proc.streams_started")
    for _ in range(SKIPPED):
        reply = http_request(stack.base_url, f"/skipped/{SKIPPED_STATUS}?tag={t}",
                             headers=[("x-tenant", "acme")])
        assert reply.status == SKIPPED_STATUS
    for _ in range(2):
        assert http_request(stack.base_url, f"/skipped/503?tag={t}").status == 503
        reply = http_request(stack.base_url, f"/skipped/418?tag={t}", method="POST")
        assert reply.status == 405  # the upstream serves GET only
    for _ in range(ASKED):
        assert http_request(stack.base_url, f"/status/{ASKED_STATUS}?tag={t}").status \
            == ASKED_STATUS
    for _ in range(QUIET):
        assert http_request(stack.base_url, f"/quiet/{QUIET_STATUS}?tag={t}").status \
            == QUIET_STATUS
    # the asked ones of route "status" have taught the sidecar its template
    wait_until(lambda: _count(admin_port, ASKED_STATUS) >= ASKED, 15, "the asked requests")
    for _ in range(LEARNT):
        assert http_request(stack.base_url, f"/status-unasked/{LEARNT_STATUS}").status \
            == LEARNT_STATUS
    # Envoy asked about the asked ones only
    asked = stack.envoy_stat("http.ingress.ext_proc.streams_started") - asked_before
    assert asked == ASKED + QUIET
    wait_until(lambda: _count(admin_port, SKIPPED_STATUS) >= SKIPPED
               and _count(admin_port, 503) >= 2 and _count(admin_port, 405) >= 2
               and _count(admin_port, ASKED_STATUS) >= ASKED
               and _count(admin_port, QUIET_STATUS) >= QUIET
               and _count(admin_port, LEARNT_STATUS) >= LEARNT, 15,
               "every request to be counted")
    # Envoy has sent its log of every request: whatever the sidecar counts twice is there
    total = SKIPPED_TOTAL + ASKED + QUIET + LEARNT
    wait_until(lambda: len(_access(stack, f"/skipped/{SKIPPED_STATUS}")) >= SKIPPED + 2
               and len(_access(stack, f"/status/{ASKED_STATUS}")) >= ASKED
               and len(_access(stack, f"/quiet/{QUIET_STATUS}")) >= QUIET
               and stack.envoy_stat("access_logs.grpc_access_log.logs_written") >= total, 15,
               "Envoy's access log of every request")
    return t


def test_unasked_requests_counted_once_by_method_status_tenant(
        stack: Stack, admin_port: int, traffic: str) -> None:
    series = [(labels, value) for labels, value in _counts(admin_port)
              if labels.get("http_response_status_code") == str(SKIPPED_STATUS)]
    assert len(series) == 1
    labels, value = series[0]
    assert value == SKIPPED
    assert labels["http_request_method"] == "GET"
    assert labels["http_route"] == "_OTHER"  # no template without an ext_proc stream
    assert labels["tenant_id"] == "acme"  # from the header Envoy logged
    assert "error_type" not in labels
    def series_of(status: int) -> list[tuple[str, str | None, float]]:
        return [(labels["http_request_method"], labels.get("error_type"), value)
                for labels, value in _counts(admin_port)
                if labels.get("http_response_status_code") == str(status)]
    assert series_of(503) == [("GET", "503", 2)]
    assert series_of(405) == [("POST", None, 2)]


def test_unasked_requests_of_a_known_route_get_its_template(stack: Stack, admin_port: int,
                                                           traffic: str) -> None:
    assert _count(admin_port, LEARNT_STATUS, http_route="/status/{code}") == LEARNT
    assert _count(admin_port, LEARNT_STATUS) == LEARNT


def test_asked_requests_still_counted_once(stack: Stack, admin_port: int,
                                           traffic: str) -> None:
    assert _count(admin_port, ASKED_STATUS, http_route="/status/{code}") == ASKED
    assert _count(admin_port, ASKED_STATUS) == ASKED
    assert _count(admin_port, QUIET_STATUS) == QUIET  # a stream, no span: counted once


def test_unasked_requests_get_an_access_line_without_trace_ids(stack: Stack,
                                                               traffic: str) -> None:
    lines = [line for line in _access(stack, f"/skipped/{SKIPPED_STATUS}")
             if line["method"] == "GET"]
    assert len(lines) == SKIPPED
    assert len({line["request_id"] for line in lines}) == SKIPPED  # one per request
    for line in lines:
        assert line["trace_id"] is None and line["span_id"] is None
        assert line["method"] == "GET" and line["status"] == SKIPPED_STATUS
        assert line["tenant"] == "acme"
        assert line["duration_ms"] > 0
    asked = _access(stack, f"/status/{ASKED_STATUS}")
    assert len(asked) == ASKED
    assert all(re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) for line in asked)
    assert Counter(line["status"] for line in _access(stack, f"/quiet/{QUIET_STATUS}")) \
        == Counter({QUIET_STATUS: QUIET})


def test_unasked_requests_have_no_span_and_no_exemplar(
        stack: Stack, receiver: OtlpReceiver, admin_port: int, traffic: str) -> None:
    def tagged() -> list[Any]:
        return gateway_spans(receiver, lambda s: f"tag={traffic}" in
                             str(s.attributes.get("url.query", "")))
    assert receiver.wait_for(lambda: len(tagged()) >= ASKED, 10)
    assert {s.attributes["url.path"] for s in tagged()} == {f"/status/{ASKED_STATUS}"}
    assert len(tagged()) == ASKED
    # A scrape hands out the exemplars measured since the last one: watch every scrape
    # from before one more request of each kind (statuses of their own) until both count.
    skipped_status, asked_status = 421, 422
    texts = [_scrape(admin_port, openmetrics=True)]
    assert http_request(stack.base_url, f"/skipped/{skipped_status}").status == skipped_status
    assert http_request(stack.base_url, f"/status/{asked_status}").status == asked_status

    def both_counted() -> bool:
        texts.append(_scrape(admin_port, openmetrics=True))
        return (_count(admin_port, skipped_status, texts[-1]) == 1
                and _count(admin_port, asked_status, texts[-1]) == 1)
    wait_until(both_counted, 15, "both requests to be counted")

    def buckets(status: int) -> list[str]:
        return [line for text in texts for line in text.splitlines()
                if line.startswith("http_server_request_duration_seconds_bucket")
                and f'http_response_status_code="{status}"' in line]
    assert buckets(skipped_status)
    assert not any("trace_id" in line for line in buckets(skipped_status))
    assert any("trace_id" in line for line in buckets(asked_status))  # a recorded one has
