"""``extproc-otel envoy-config``: content follows the settings, and Envoy accepts every format."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ext_proc.cli import main
from ext_proc.config import Settings, load_settings
from ext_proc.dev.devstack import envoy_binary, free_port
from ext_proc.envoy_config import (
    EG_ATTRIBUTE,
    EXT_PROC_FILTER,
    FORMATS,
    GRACEFUL_CLOSE_FLAG,
    options_for,
    render,
    snippet,
    unwrap,
)
from ext_proc.envoy_config.embed import envoy_configs, envoy_validate
from ext_proc.request.route_options import HTTP_ROUTE, route_options
from ext_proc.telemetry.semconv import EnvoyAttr


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _settings(**stream: Any) -> Settings:
    return load_settings(stream=stream)


def _ext_proc_config(text: str) -> dict[str, Any]:
    flt = _docs(text)[0]["http_filters"][0]
    assert flt["name"] == EXT_PROC_FILTER
    return unwrap(flt)


def test_snippet_carries_the_attributes_mode_and_namespace_of_the_settings() -> None:
    settings = _settings(metadata_namespace="acme_tracing")
    config = _ext_proc_config(render("snippet", settings, options_for(settings)))
    assert config["request_attributes"] == list(EnvoyAttr.REQUEST)
    assert config["response_attributes"] == list(EnvoyAttr.RESPONSE)
    assert config["failure_mode_allow"] is True
    assert config["message_timeout"] == "0.200s"
    mode = config["processing_mode"]
    # lean, as the snippet carries the access-log join: the sidecar asks for the
    # response phase where it needs it
    assert (mode["request_header_mode"], mode["response_header_mode"],
            mode["response_trailer_mode"]) == ("SEND", "SKIP", "SKIP")
    assert config["allow_mode_override"] is True
    meta = config["metadata_options"]
    assert meta["forwarding_namespaces"]["untyped"] == ["acme_tracing"]
    assert meta["receiving_namespaces"]["untyped"] == ["acme_tracing"]


def test_snippet_has_the_graceful_close_flag_and_a_sidecar_h2_cluster() -> None:
    port = free_port()
    settings = load_settings(server={"listen": f"0.0.0.0:{port}"})
    doc = snippet(settings, options_for(settings))
    layer = doc["layered_runtime"]["layers"][0]
    assert layer["static_layer"] == {GRACEFUL_CLOSE_FLAG: True}
    cluster = doc["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": port}  # wildcard -> loopback
    assert cluster["type"] == "STATIC"
    options = cluster["typed_extension_protocol_options"]
    (h2,) = options.values()
    assert "http2_protocol_options" in h2["explicit_http_config"]


def test_hostname_sidecar_gets_a_dns_cluster() -> None:
    settings = load_settings(server={"listen": f"extproc-otel:{free_port()}"})
    cluster = snippet(settings, options_for(settings))["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"


def test_per_route_example_round_trips_through_the_sidecar_parser() -> None:
    """The metadata the example sends is what `route_options` really reads."""
    settings = Settings()
    doc = snippet(settings, options_for(settings, example_route_template="/v1/items/{id}"))
    per_route = doc["route_typed_per_filter_config"]["with_route_template"][EXT_PROC_FILTER]
    metadata = per_route["overrides"]["grpc_initial_metadata"]
    assert metadata == [{"key": HTTP_ROUTE, "value": "/v1/items/{id}"}]
    parsed = route_options([(m["key"], m["value"]) for m in metadata])
    assert parsed.http_route == "/v1/items/{id}"
    disabled = doc["route_typed_per_filter_config"]["disabled"][EXT_PROC_FILTER]
    assert disabled["disabled"] is True


def test_envoy_gateway_keeps_only_attributes_it_accepts() -> None:
    settings = Settings()
    docs = _docs(render("envoy-gateway", settings, options_for(settings)))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["EnvoyProxy", "EnvoyExtensionPolicy"]
    ext = docs[1]["spec"]["extProc"][0]
    request = ext["processingMode"]["request"]["attributes"]
    assert request == [a for a in EnvoyAttr.REQUEST if EG_ATTRIBUTE.match(a)]
    assert all(EG_ATTRIBUTE.match(a) for a in ext["processingMode"]["response"]["attributes"])
    assert "xds.cluster_name" not in request  # rejected by Envoy Gateway's CRD pattern
    assert ext["failOpen"] is True
    bootstrap_merge = yaml.safe_load(docs[0]["spec"]["bootstrap"]["value"])
    assert bootstrap_merge["layered_runtime"]["layers"][0]["static_layer"] == {
        GRACEFUL_CLOSE_FLAG: True}


@pytest.mark.parametrize("context,expected", [("gateway", "GATEWAY"),
                                              ("sidecar", "SIDECAR_INBOUND")])
def test_istio_variants(context: str, expected: str) -> None:
    settings = Settings()
    docs = _docs(render("istio", settings, options_for(settings, istio_context=context)))
    assert [d["kind"] for d in docs] == ["EnvoyFilter", "ServiceEntry", "Telemetry"]
    doc = docs[0]
    patches = doc["spec"]["configPatches"]
    assert [p["applyTo"] for p in patches] == ["HTTP_FILTER", "CLUSTER", "HTTP_ROUTE"]
    assert patches[0]["match"]["context"] == expected
    assert patches[0]["patch"]["operation"] == "INSERT_BEFORE"
    # lean, as the Telemetry brings the access log to the sidecar (see
    # tests/unit/deploy/test_deploy_mesh_access_log.py)
    mode = unwrap(patches[0]["patch"]["value"])["processing_mode"]
    assert (mode["response_header_mode"], mode["response_trailer_mode"]) == ("SKIP", "SKIP")
    assert patches[0]["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
        "envoy.filters.http.router")


def test_unknown_format_is_rejected() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="unknown format"):
        render("nginx", settings, options_for(settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_prints_each_format_and_envoy_accepts_it(fmt: str) -> None:
    port = free_port()
    result = CliRunner().invoke(main, ["envoy-config", "--format", fmt,
                                       "--sidecar-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    configs = [c for doc in _docs(result.output) for c in envoy_configs(doc)]
    assert configs, f"no Envoy config in --format {fmt}"
    assert f"port_value: {port}" in result.output or f"port: {port}" in result.output
    for config in configs:
        verdict = envoy_validate(config, envoy_binary())
        assert verdict.ok, verdict.output[-2000:]


def test_cli_rejects_a_bad_sidecar_address() -> None:
    result = CliRunner().invoke(main, ["envoy-config", "--sidecar-address", "nope"])
    assert result.exit_code == 2
    assert "server.listen" in result.output


def test_bootstrap_and_snippet_send_envoys_access_log_to_the_sidecar() -> None:
    settings = _settings()
    opts = options_for(settings)
    (boot,) = _docs(render("bootstrap", settings, opts))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    (join,) = [log for log in hcm["access_log"] if log["name"] == "envoy.access_loggers.http_grpc"]
    common = join["typed_config"]["common_config"]
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == opts.cluster_name
    assert join["typed_config"]["additional_response_trailers_to_log"] == ["grpc-status"]
    snippet_doc = _docs(render("snippet", settings, opts))[0]
    assert snippet_doc["http_connection_manager_access_log"] == hcm["access_log"]


@pytest.mark.parametrize(("path", "context"), [
    ("envoy/istio/envoyfilter-ingressgateway.yaml", "gateway"),
    ("envoy/istio/envoyfilter-sidecar.yaml", "sidecar")])
def test_shipped_istio_filters_are_what_envoy_config_prints(path: str, context: str) -> None:
    """The shipped EnvoyFilters (with their ServiceEntry and Telemetry) are regenerated
    whenever the generator changes (they carry the prefilter of the default settings);
    only the namespace is added."""
    from ext_proc.dev.devstack import ROOT

    shipped = _docs((ROOT / path).read_text())
    for doc in shipped:
        doc["metadata"].pop("namespace")
    printed = render("istio", Settings(), options_for(Settings(), istio_context=context))
    assert shipped == _docs(printed)
    assert len(shipped) == 3
