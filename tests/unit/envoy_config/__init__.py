"""Tests of ext_proc.envoy_config and of the project's protos against Envoy's API."""
