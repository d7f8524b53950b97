"""envoy/envoy-full.yaml is envoy/envoy.yaml (lean) with the response phase sent."""

from __future__ import annotations

import yaml

from bench.variants import FULL_YAML, render_full_yaml
from ext_proc.dev.devstack import ENVOY_YAML, hcm_of


def test_full_yaml_is_current() -> None:
    assert FULL_YAML.read_text() == render_full_yaml(ENVOY_YAML.read_text()), \
        "envoy/envoy-full.yaml is stale: run `.venv/bin/python -m bench.variants`"


def test_full_yaml_differs_only_in_the_response_modes() -> None:
    lean = yaml.safe_load(ENVOY_YAML.read_text())
    full = yaml.safe_load(FULL_YAML.read_text())
    configs = [hcm_of(c)["http_filters"][0]["typed_config"] for c in (lean, full)]
    modes = [c["processing_mode"] for c in configs]
    assert modes[0]["response_header_mode"] == modes[0]["response_trailer_mode"] == "SKIP"
    assert modes[1]["response_header_mode"] == modes[1]["response_trailer_mode"] == "SEND"
    # lean: the sidecar may ask for the response phase of the requests that need it
    assert configs[0]["allow_mode_override"] is True
    modes[1].update(response_header_mode="SKIP", response_trailer_mode="SKIP")
    assert full == lean
    # the lean mode depends on Envoy's gRPC access log to the sidecar
    names = [log["name"] for log in hcm_of(lean)["access_log"]]
    assert "envoy.access_loggers.http_grpc" in names


def test_render_refuses_a_config_without_the_modes() -> None:
    assert render_full_yaml("admin: {}\n") is None
