"""envoy/envoy-lean.yaml is envoy/envoy.yaml with only the response phase skipped."""

from __future__ import annotations

import yaml

from bench.variants import LEAN_YAML, render_lean_yaml
from ext_proc.devstack import ENVOY_YAML, hcm_of


def test_lean_yaml_is_current() -> None:
    assert LEAN_YAML.read_text() == render_lean_yaml(ENVOY_YAML.read_text()), \
        "envoy/envoy-lean.yaml is stale: run `.venv/bin/python -m bench.variants`"


def test_lean_yaml_differs_only_in_the_response_modes() -> None:
    base = yaml.safe_load(ENVOY_YAML.read_text())
    lean = yaml.safe_load(LEAN_YAML.read_text())
    modes = [hcm_of(c)["http_filters"][0]["typed_config"]["processing_mode"]
             for c in (base, lean)]
    assert modes[0]["response_header_mode"] == "SEND"
    assert modes[1]["response_header_mode"] == modes[1]["response_trailer_mode"] == "SKIP"
    modes[1].update(response_header_mode="SEND", response_trailer_mode="SEND")
    assert lean == base
    # the lean mode depends on Envoy's gRPC access log to the sidecar
    names = [log["name"] for log in hcm_of(lean)["access_log"]]
    assert "envoy.access_loggers.http_grpc" in names


def test_render_refuses_a_config_without_the_modes() -> None:
    assert render_lean_yaml("admin: {}\n") is None
