"""Every Envoy config the project ships passes ``envoy --mode validate``.

Files are found by globbing the whole repository, so a new config is covered
without touching this test: full bootstraps, bootstraps inside Kubernetes
ConfigMaps, Istio EnvoyFilter patches and Envoy Gateway resources (embedded
into a host bootstrap), the YAML examples in the Markdown docs, and every
format of ``extproc-otel envoy-config``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from ext_proc.config import Settings
from ext_proc.dev.devstack import ROOT, envoy_binary, rewrite_tls_dir
from ext_proc.envoy_config import EG_ATTRIBUTE, EXT_PROC_FILTER, FORMATS, options_for, render
from ext_proc.envoy_config.embed import (
    Fragments,
    envoy_configs,
    envoy_validate,
    file_configs,
    host_bootstrap,
    markdown_yaml_blocks,
)
from ext_proc.telemetry.semconv import EnvoyAttr
from tests.pki import make_pki

pytestmark = pytest.mark.e2e

_SKIP_DIRS: Final = {".venv", ".git", "_gen", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                     "node_modules", "build", "dist"}
# Text that marks a YAML file as carrying Envoy config.
_MARKERS: Final = ("type.googleapis.com/envoy.", "static_resources:", "kind: EnvoyFilter",
                   "kind: EnvoyExtensionPolicy", "kind: EnvoyProxy")


def _yaml_files() -> list[Path]:
    found = []
    for pattern in ("*.yaml", "*.yml", "*.md"):
        for path in ROOT.rglob(pattern):
            rel = path.relative_to(ROOT)
            if not _SKIP_DIRS.intersection(rel.parts[:-1]):
                found.append(path)
    return sorted(found)


def _envoy_files() -> list[Path]:
    """YAML files, and Markdown files with YAML blocks, that carry Envoy config."""
    found = []
    for path in _yaml_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".md":
            text = "\n".join(markdown_yaml_blocks(text))
        if any(marker in text for marker in _MARKERS):
            found.append(path)
    return found


def _cases() -> list[Any]:
    cases = []
    for path in _envoy_files():
        rel = path.relative_to(ROOT)
        for index, config in enumerate(file_configs(path)):
            cases.append(pytest.param(config, id=f"{rel}#{index}"))
    settings = Settings()
    for fmt in FORMATS:
        for context in ("gateway", "sidecar"):
            if context == "sidecar" and fmt != "istio":
                continue
            text = render(fmt, settings, options_for(settings, istio_context=context))
            configs = [c for doc in yaml.safe_load_all(text) for c in envoy_configs(doc)]
            for index, config in enumerate(configs):
                cases.append(pytest.param(config, id=f"envoy-config:{fmt}:{context}#{index}"))
    return cases


@pytest.fixture(scope="module")
def envoy() -> str:
    return envoy_binary()


def test_discovery_finds_every_shipped_config() -> None:
    """Each file that looks like Envoy config yields something to validate."""
    files = _envoy_files()
    rels = {str(p.relative_to(ROOT)) for p in files}
    assert "envoy/envoy.yaml" in rels
    empty = [str(p.relative_to(ROOT)) for p in files if not file_configs(p)]
    assert empty == [], f"files with Envoy markers but no config found: {empty}"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Envoy opens every certificate a config names: a per-run CA stands in for the
    shipped mount (nothing private is committed)."""
    return make_pki(tmp_path_factory.mktemp("pki")).directory


@pytest.mark.parametrize("config", _cases())
def test_envoy_accepts(config: dict[str, Any], envoy: str, tls_dir: Path) -> None:
    config = copy.deepcopy(config)
    rewrite_tls_dir(config, tls_dir)
    result = envoy_validate(config, envoy)
    assert result.ok, result.output[-3000:]


def test_validation_rejects_a_misspelt_field(envoy: str) -> None:
    """The harness really detects a bad fragment (guards against a vacuous pass)."""
    bad = Fragments(http_filters=[{"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "extproc_otel"}},
        "request_atributes": ["request.id"]}}])
    result = envoy_validate(host_bootstrap(bad), envoy)
    assert not result.ok
    assert "request_atributes" in result.output


def _ext_proc_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for net in chain.get("filters", []):
                for flt in net.get("typed_config", {}).get("http_filters", []):
                    if flt.get("name") == EXT_PROC_FILTER:
                        found.append(flt["typed_config"])
    return found


@pytest.mark.parametrize("config", _cases())
def test_shipped_filters_ask_for_every_attribute_the_sidecar_reads(config: dict[str, Any]) -> None:
    """A config missing an attribute from semconv.EnvoyAttr silently loses span data."""
    for typed in _ext_proc_filters(config):
        if "request_attributes" not in typed:
            continue  # a placeholder filter of the validation harness
        cluster = typed["grpc_service"]["envoy_grpc"]["cluster_name"]
        allowed = (lambda a: bool(EG_ATTRIBUTE.match(a))) if cluster.startswith("eg_extproc_") \
            else (lambda a: True)
        want_req = {a for a in EnvoyAttr.REQUEST if allowed(a)}
        want_resp = {a for a in EnvoyAttr.RESPONSE if allowed(a)}
        assert want_req <= set(typed["request_attributes"]), want_req - set(
            typed["request_attributes"])
        assert want_resp <= set(typed.get("response_attributes", [])), want_resp - set(
            typed.get("response_attributes", []))
