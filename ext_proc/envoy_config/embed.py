"""Prove Envoy config offline: find the Envoy parts in our files, run ``envoy --mode validate``.

Fragments (a filter, a cluster, a route's per-filter config, a runtime layer)
are embedded into a small host bootstrap first, so that Envoy checks them in
the place they will really live. Used by the tests and handy for users.
"""

from __future__ import annotations

import copy
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ext_proc.envoy_config.builders import (
    EXT_PROC_FILTER,
    HCM_FILTER,
    ROUTER_FILTER,
    Doc,
)
from ext_proc.envoy_config.prefilter import unwrap

_ROUTER: Final = {"name": ROUTER_FILTER, "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_HCM_TYPE: Final = ("type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager")
_EXT_PROC_TYPE: Final = ("type.googleapis.com/envoy.extensions.filters.http."
                         "ext_proc.v3.ExternalProcessor")
_TIMEOUT_S: Final = 60.0
_YAML_FENCE: Final = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass
class Fragments:
    """Pieces of Envoy config found outside a bootstrap."""

    http_filters: list[Doc] = field(default_factory=list)
    clusters: list[Doc] = field(default_factory=list)
    per_route: list[Doc] = field(default_factory=list)  # typed_per_filter_config maps
    runtime_layers: list[Doc] = field(default_factory=list)
    access_logs: list[Doc] = field(default_factory=list)  # HCM access_log entries

    def empty(self) -> bool:
        return not (self.http_filters or self.clusters or self.per_route or self.runtime_layers
                    or self.access_logs)


def host_bootstrap(fragments: Fragments) -> Doc:
    """A minimal valid bootstrap carrying `fragments` (a placeholder sidecar cluster if none)."""
    clusters = copy.deepcopy(fragments.clusters)
    names = {str(c.get("name")) for c in clusters}
    for needed in ("app", *_grpc_clusters(fragments.http_filters)):
        if needed not in names:
            clusters.append(_loopback_cluster(needed))
            names.add(needed)
    routes = [{"name": f"r{i}", "match": {"prefix": f"/r{i}"}, "route": {"cluster": "app"},
               "typed_per_filter_config": copy.deepcopy(cfg)}
              for i, cfg in enumerate(fragments.per_route)]
    routes.append({"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "app"}})
    filters = [f for f in copy.deepcopy(fragments.http_filters) if f.get("name") != ROUTER_FILTER]
    if not any(f.get("name") == EXT_PROC_FILTER for f in filters) and fragments.per_route:
        filters.append(_placeholder_ext_proc(names))
    hcm = {"@type": _HCM_TYPE, "stat_prefix": "host",
           "route_config": {"name": "host", "virtual_hosts": [
               {"name": "all", "domains": ["*"], "routes": routes}]},
           "http_filters": [*filters, copy.deepcopy(_ROUTER)]}
    if fragments.access_logs:
        hcm["access_log"] = copy.deepcopy(fragments.access_logs)
    config: Doc = {
        "static_resources": {
            "listeners": [{"name": "host", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{"name": HCM_FILTER, "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }
    if fragments.runtime_layers:
        config["layered_runtime"] = {"layers": copy.deepcopy(fragments.runtime_layers)}
    return config


def _grpc_clusters(filters: Iterable[Doc]) -> Iterator[str]:
    for flt in filters:
        grpc = unwrap(flt).get("grpc_service", {})  # through a prefilter's match_delegate
        name = grpc.get("envoy_grpc", {}).get("cluster_name")
        if isinstance(name, str):
            yield name


def _loopback_cluster(name: str) -> Doc:
    return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": 50051}}}}]}]}}


def _placeholder_ext_proc(names: set[str]) -> Doc:
    cluster = "extproc_otel" if "extproc_otel" in names else "app"
    return {"name": EXT_PROC_FILTER, "typed_config": {
        "@type": _EXT_PROC_TYPE, "grpc_service": {"envoy_grpc": {"cluster_name": cluster}}}}


@dataclass(frozen=True)
class Validation:
    ok: bool
    output: str


def envoy_validate(config: Mapping[str, Any], envoy: str) -> Validation:
    """Run ``envoy --mode validate`` on `config`; `ok` is Envoy's verdict."""
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        proc = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--log-level", "warn",
             "--disable-hot-restart"],
            capture_output=True, text=True, timeout=_TIMEOUT_S, check=False,
        )
    return Validation(proc.returncode == 0, proc.stdout + proc.stderr)


def is_bootstrap(doc: object) -> bool:
    return isinstance(doc, dict) and "static_resources" in doc


def _istio_fragments(doc: Doc) -> Fragments:
    found = Fragments()
    for patch in doc.get("spec", {}).get("configPatches", []):
        value = patch.get("patch", {}).get("value")
        if not isinstance(value, dict):
            continue
        kind = patch.get("applyTo")
        if kind == "HTTP_FILTER":
            found.http_filters.append(value)
        elif kind == "CLUSTER":
            found.clusters.append(value)
        elif kind == "HTTP_ROUTE" and "typed_per_filter_config" in value:
            found.per_route.append(value["typed_per_filter_config"])
    return found


def _eg_fragments(doc: Doc) -> Fragments:
    """What Envoy Gateway turns our resources into, as far as Envoy's schema is concerned."""
    found = Fragments()
    spec = doc.get("spec", {})
    if doc.get("kind") == "EnvoyProxy":
        value = spec.get("bootstrap", {}).get("value")
        merged = yaml.safe_load(value) if isinstance(value, str) else None
        if isinstance(merged, dict):
            found.runtime_layers.extend(merged.get("layered_runtime", {}).get("layers", []))
    for i, ext in enumerate(spec.get("extProc", []) if doc.get("kind") ==
                            "EnvoyExtensionPolicy" else []):
        found.http_filters.append(_eg_ext_proc_filter(ext, f"eg_extproc_{i}"))
    return found


def _eg_ext_proc_filter(ext: Doc, cluster: str) -> Doc:
    mode = ext.get("processingMode", {})
    namespaces = ext.get("metadata", {})
    config: Doc = {
        "@type": _EXT_PROC_TYPE,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "failure_mode_allow": bool(ext.get("failOpen", False)),
        "processing_mode": {
            "request_header_mode": "SEND" if "request" in mode else "SKIP",
            "response_header_mode": "SEND" if "response" in mode else "SKIP",
        },
        "request_attributes": mode.get("request", {}).get("attributes", []),
        "response_attributes": mode.get("response", {}).get("attributes", []),
        "metadata_options": {
            "forwarding_namespaces": {"untyped": namespaces.get("accessibleNamespaces", [])},
            "receiving_namespaces": {"untyped": namespaces.get("writableNamespaces", [])},
        },
    }
    timeout = ext.get("messageTimeout")
    if isinstance(timeout, str) and timeout.endswith("ms"):
        config["message_timeout"] = f"{int(timeout[:-2]) / 1000}s"
    return {"name": EXT_PROC_FILTER, "typed_config": config}


def envoy_configs(doc: object) -> list[Doc]:
    """Every bootstrap to validate that one YAML document holds (none when it has no Envoy part)."""
    if not isinstance(doc, dict):
        return []
    if is_bootstrap(doc):
        return [doc]
    kind = doc.get("kind")
    if kind == "ConfigMap":
        configs: list[Doc] = []
        for text in (doc.get("data") or {}).values():
            loaded = yaml.safe_load(text) if isinstance(text, str) else None
            if isinstance(loaded, dict) and is_bootstrap(loaded):
                configs.append(loaded)
        return configs
    found = (_istio_fragments(doc) if kind == "EnvoyFilter"
             else _eg_fragments(doc) if kind in ("EnvoyProxy", "EnvoyExtensionPolicy")
             else _snippet_fragments(doc))
    return [] if found.empty() else [host_bootstrap(found)]


def _snippet_fragments(doc: Doc) -> Fragments:
    """The layout printed by ``envoy-config --format snippet``, or routes (docs examples)."""
    found = Fragments()
    listed = doc.get("routes")
    routes: list[Any] = listed if isinstance(listed, list) else [doc]
    found.per_route.extend(r["typed_per_filter_config"] for r in routes
                           if isinstance(r, dict) and "match" in r
                           and isinstance(r.get("typed_per_filter_config"), dict))
    found.http_filters.extend(doc.get("http_filters") or [])
    found.clusters.extend(doc.get("clusters") or [])
    found.per_route.extend((doc.get("route_typed_per_filter_config") or {}).values())
    found.runtime_layers.extend((doc.get("layered_runtime") or {}).get("layers", []))
    found.access_logs.extend(doc.get("http_connection_manager_access_log") or [])
    return found


def file_configs(path: Path) -> list[Doc]:
    """Every Envoy config inside a YAML file, or inside a Markdown file's YAML blocks."""
    texts = markdown_yaml_blocks(path.read_text()) if path.suffix == ".md" else [path.read_text()]
    configs: list[Doc] = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            configs.extend(envoy_configs(doc))
    return configs


def markdown_yaml_blocks(text: str) -> list[str]:
    """The contents of the ```yaml fenced blocks of a Markdown text."""
    return [m.group(1) for m in _YAML_FENCE.finditer(text)]
