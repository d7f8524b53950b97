"""Issue #16: the compose stack's dashboards and links, against a live sidecar.

No Docker engine here, so the pieces run as processes: the real Envoy with
compose/envoy.yaml (addresses moved to loopback, its OTLP access log sent to the
test's OTLP receiver instead of the Collector), the sidecar with compose's EXTPROC_*
settings (tenants on), the demo services with compose's flags, and Debian's
Prometheus with compose/prometheus.yml's scrape jobs (targets on free ports) and
compose's command-line flags (those Prometheus 2.42 knows). Debian's Prometheus
scrapes the sidecar's admin /metrics, which names series as the Collector's
Prometheus exporter does (tests/e2e/test_metrics.py runs promtool on it).

Every PromQL expression of compose/grafana/dashboards/*.json, with Grafana's
variables substituted, must parse; those over the sidecar's metrics must return
data, with every `by (...)` label set (so the tenant panels are not empty) and
quantiles below 1 s (nothing here takes that long: the export-duration histogram had
millisecond bounds). Expressions over Tempo's metrics-generator series are listed
with their source and checked against its documented names (TEMPO_METRICS); here
they only parse. Prometheus must accept remote write (Tempo's path to it).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc
import pytest
import yaml

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import Config, Stack, wait_until
from tests.conftest import http_request
from tests.e2e.conftest import SIDECAR_SERVICE, gateway_spans
from tests.e2e.test_metrics import Prometheus
from tests.unit.deploy.test_deploy_compose import (
    COMPOSE,
    DASHBOARDS,
    DATASOURCES,
    TEMPO_METRICS,
    dashboard_exprs,
    grouping_labels,
    label_values_queries,
    promql_metrics,
    render_tags_query,
)

pytestmark = pytest.mark.e2e

# Grafana's variables, as a dashboard user with "All" selected sees them.
VARIABLES: Final = {"route": ".*", "tenant": ".*", "__rate_interval": "1m",
                    "__interval": "15s", "__range": "5m", "__range_s": "300"}
# Prometheus 3 flags Debian's Prometheus 2.42 does not know (it has no OTLP receiver).
V3_ONLY_FLAGS: Final = frozenset({"--web.enable-otlp-receiver"})
UNKNOWN_TENANT: Final = "not-allowed"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    return doc


def _verify_tenants() -> tuple[str, list[str]]:
    """The tenant header and ids compose/verify.sh sends."""
    script = (COMPOSE / "verify.sh").read_text()
    header = re.search(r"^TENANT_HEADER=\$\{TENANT_HEADER:-([\w-]+)\}", script, re.M)
    tenants = re.search(r"^TENANTS=\(([^)]*)\)", script, re.M)
    assert header and tenants, "verify.sh sends no tenant header"
    return header.group(1), tenants.group(1).split()


def substitute(expr: str) -> str:
    """Grafana's $name / ${name} variables replaced by VARIABLES (longest name first)."""
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", VARIABLES[name]).replace("$" + name,
                                                                         VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def loopback(otlp_port: int) -> Callable[[Config], None]:
    """compose/envoy.yaml on loopback: every address 127.0.0.1, the Collector's cluster
    at the test's OTLP receiver (Stack sets the other ports)."""
    def mutate(config: Config) -> None:
        config["admin"]["address"]["socket_address"]["address"] = "127.0.0.1"
        for listener in config["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["address"] = "127.0.0.1"
        for cluster in config["static_resources"]["clusters"]:
            cluster["type"] = "STATIC"
            for group in cluster["load_assignment"]["endpoints"]:
                for lb in group["lb_endpoints"]:
                    sock = lb["endpoint"]["address"]["socket_address"]
                    sock["address"] = "127.0.0.1"
                    if cluster["name"] == "otel_collector":
                        sock["port_value"] = otlp_port
    return mutate


@pytest.fixture(scope="module")
def compose_stack(receiver: OtlpReceiver, admin_port: int,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    services = _compose()["services"]
    sidecar = services["extproc-otel"]["environment"]
    env = {k: str(v) for k, v in sidecar.items() if k.startswith("EXTPROC_")
           and k not in ("EXTPROC_SERVER__LISTEN", "EXTPROC_SERVER__ALLOW_INSECURE_NON_LOOPBACK")}
    env |= {k: str(sidecar[k]) for k in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")}
    env["EXTPROC_ADMIN__LISTEN"] = f"127.0.0.1:{admin_port}"
    stack = Stack(tmp_path_factory.mktemp("compose"), receiver.endpoint, sidecar_env=env,
                  envoy_source=COMPOSE / "envoy.yaml",
                  mutate_config=loopback(int(receiver.endpoint.rsplit(":", 1)[1])))
    for proc, name in ((stack.users, "users"), (stack.grpc_demo, "grpc-demo")):
        proc.cmd += [arg for arg in services[name]["command"] if arg == "--otlp-logs"]
    with stack:
        yield stack


def _prometheus_config(admin_port: int, envoy_admin: int) -> dict[str, Any]:
    """compose/prometheus.yml with its targets on loopback and a 1 s interval."""
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    # each scrape job's one target, by job: the stack runs them on free loopback ports
    where = {"otel-collector": f"127.0.0.1:{admin_port}", "envoy": f"127.0.0.1:{envoy_admin}"}
    doc["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                     "evaluation_interval": "1s"}
    for job in doc["scrape_configs"]:
        job.pop("scrape_protocols", None)  # Prometheus 2.49+; 2.42 negotiates OpenMetrics itself
        for static in job["static_configs"]:
            assert len(static["targets"]) == 1, job
            static["targets"] = [where[job["job_name"]]]
    return doc


@pytest.fixture(scope="module")
def prometheus(compose_stack: Stack, admin_port: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("compose-prometheus")
    prom = Prometheus(workdir, f"127.0.0.1:{admin_port}")
    (workdir / "prometheus.yml").write_text(
        json.dumps(_prometheus_config(admin_port, compose_stack.ports.admin)))
    command = _compose()["services"]["prometheus"]["command"]
    prom.proc.cmd += [flag for flag in command
                      if not flag.startswith("--config.file=") and flag not in V3_ONLY_FLAGS
                      and flag not in prom.proc.cmd]
    prom.proc.start()
    try:
        wait_until(prom.ready, 20, "prometheus to be ready")
        yield prom
    finally:
        prom.proc.stop()


def _one_round(stack: Stack, header: str, tenants: list[str]) -> int:
    sent = 0
    for tenant in tenants:
        for path in ("/api/users", "/api/users/1", "/api/users", "/status/500"):
            http_request(stack.base_url, path, [(header, tenant)])
            sent += 1
    assert http_request(stack.base_url, "/api/users", [(header, UNKNOWN_TENANT)]).status == 200
    with grpc.insecure_channel(stack.grpc_target) as channel:
        user = users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(id=1), timeout=10, metadata=[(header, tenants[0])])
    assert user.id == 1 and "traceparent" in user.received_metadata
    return sent + 2


@pytest.fixture(scope="module")
def traffic(compose_stack: Stack, prometheus: Prometheus) -> list[str]:
    """verify.sh's tenants: a few requests each, one 5xx each, one gRPC call, and a
    tenant outside compose's allowed list; in two rounds, each scraped, so rates are not
    zero. Returns verify.sh's tenant ids."""
    header, tenants = _verify_tenants()
    total = 0
    for _ in range(2):
        total += _one_round(compose_stack, header, tenants)
        wait_until(lambda n=total: prometheus.scalar(
            "sum(http_server_request_duration_seconds_count)") == n, 20,
            "Prometheus to scrape the round")
    return tenants


def _query(prom: Prometheus, promql: str) -> list[dict[str, Any]]:
    """The instant query's series; a PromQL error fails with Prometheus' message."""
    try:
        result: list[dict[str, Any]] = prom.api("query", query=promql)["result"]
    except urllib.error.HTTPError as exc:
        pytest.fail(f"Prometheus rejects {promql!r}: {exc.read().decode()[:300]}")
    return result


def test_prometheus_accepts_remote_write(prometheus: Prometheus) -> None:
    """Tempo's metrics-generator POSTs snappy-compressed WriteRequests to /api/v1/write;
    without --web.enable-remote-write-receiver that is a 404. An empty WriteRequest is
    the varint 0 in snappy's block format."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{prometheus.port}/api/v1/write", data=b"\x00", method="POST",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                 "X-Prometheus-Remote-Write-Version": "0.1.0"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 204


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(DASHBOARDS.glob("*.json"))]


def test_every_dashboard_expression_has_data(prometheus: Prometheus, traffic: list[str]) -> None:
    sidecar, tempo = [], []
    for name, dashboard in _dashboards():
        for expr in dashboard_exprs(dashboard):
            promql = substitute(expr)
            metrics = promql_metrics(promql)
            if metrics <= set(TEMPO_METRICS):
                tempo.append((name, promql))
            else:
                sidecar.append((name, promql))
    assert sidecar and tempo

    for _, promql in tempo:  # Tempo's series: documented names, valid PromQL, no data here
        _query(prometheus, promql)

    for name, promql in sidecar:
        def answered(q: str = promql) -> bool:  # a quantile needs two scrapes of traffic
            series = _query(prometheus, q)
            return bool(series) and (not q.startswith("histogram_quantile(") or any(
                math.isfinite(float(s["value"][1])) for s in series))
        try:
            wait_until(answered, 20, f"data for {promql}", interval=0.25)
        except TimeoutError:
            pytest.fail(f"{name}: no data for {promql}")
        series = _query(prometheus, promql)
        for label in grouping_labels(promql) - {"le"}:
            empty = [s["metric"] for s in series if not s["metric"].get(label)]
            assert not empty, f"{name}: series without {label} in {promql}: {empty}"
        if promql.startswith("histogram_quantile("):
            values = [float(s["value"][1]) for s in series]
            finite = [v for v in values if math.isfinite(v)]
            assert finite, f"{name}: no finite quantile in {promql}"
            assert max(finite) < 1.0, f"{name}: {promql} = {max(finite)} s (bucket bounds?)"


def test_dashboard_variables_list_values(prometheus: Prometheus, traffic: list[str]) -> None:
    """$route and $tenant offer the values traffic produced (tenant: verify.sh's ids,
    and `other` for an id outside compose's allowed list)."""
    compose_env = _compose()["services"]["extproc-otel"]["environment"]
    unlisted = "other" if "EXTPROC_TENANTS__ALLOWED" in compose_env else UNKNOWN_TENANT
    for _, dashboard in _dashboards():
        queries = label_values_queries(dashboard)
        assert queries
        for selector, label in queries:
            def values(sel: str = selector, lab: str = label) -> set[str]:
                found: list[str] = prometheus.api(f"label/{lab}/values", **{"match[]": sel})
                return set(found)
            wait_until(lambda v=values: bool(v()), 20, f"values of {label}", interval=0.25)
            if label == "tenant_id":
                assert values() == {*traffic, unlisted}
            if label == "http_route":
                assert {"/api/users", "/api/users/{id}", "/status/{code}"} <= values()


def test_trace_to_metrics_queries_parse(prometheus: Prometheus) -> None:
    sources = {d["uid"]: d for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    queries = sources["tempo"]["jsonData"]["tracesToMetrics"]["queries"]
    for query in queries:
        _query(prometheus, render_tags_query(query["query"], 'service="users"'))


def _logs_of(receiver: OtlpReceiver, service: str) -> list[Any]:
    return [r for r in receiver.log_records() if r.resource.get("service.name") == service]


def test_every_service_ships_logs_with_the_trace_id(receiver: OtlpReceiver,
                                                     traffic: list[str]) -> None:
    """Finding 5: Envoy's access log and the demo services' logs arrive over OTLP, each
    record naming a trace the sidecar exported (Loki keeps it as trace_id)."""
    def gateway_traces() -> set[str]:
        return {s.trace_id for s in gateway_spans(receiver, lambda s: True)}

    def envoy_ids() -> set[str]:
        return {str(r.attributes.get("trace_id")) for r in _logs_of(receiver, "envoy")}

    def traced(service: str) -> set[str]:
        return {r.trace_id for r in _logs_of(receiver, service) if r.trace_id}

    assert receiver.wait_for(lambda: len(envoy_ids() & gateway_traces()) >= 5, 15), \
        "no Envoy access log records with the gateway's trace ids"
    for service in ("users", "grpc-demo", SIDECAR_SERVICE):
        assert receiver.wait_for(lambda s=service: bool(traced(s) & gateway_traces()), 15), \
            f"no {service} log records in a gateway trace"
    envoy = next(r for r in _logs_of(receiver, "envoy") if r.attributes.get("trace_id")
                 in gateway_traces())
    assert re.fullmatch(r"[0-9a-f]{32}", str(envoy.attributes["trace_id"]))
    assert envoy.attributes["url.path"].startswith(("/api/users", "/status/", "/demo.v1"))

