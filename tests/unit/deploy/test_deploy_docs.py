"""docs/: the deployment guides exist and the tuning guide covers every per-route knob.

The YAML examples themselves are validated with Envoy by tests/e2e/test_envoy_configs.py.
"""

from __future__ import annotations

import re
from typing import Any, Final

import pytest
import yaml

from ext_proc.dev.devstack import ROOT
from ext_proc.envoy_config import EXT_PROC_FILTER
from ext_proc.envoy_config.embed import markdown_yaml_blocks
from ext_proc.request import route_options

DOCS: Final = ROOT / "docs"
TUNE: Final = DOCS / "tune-via-envoy.md"


def _knobs() -> set[str]:
    """Every metadata key the sidecar reads, from route_options' constants."""
    not_per_route = {"PREFIX", "PREFILTER"}  # PREFILTER: envoy-config sets it, per filter
    return {value for name, value in vars(route_options).items()
            if isinstance(value, str) and name.isupper() and name not in not_per_route
            and value.startswith(route_options.PREFIX)}


def _per_route_examples() -> list[dict[str, Any]]:
    examples = []
    for block in markdown_yaml_blocks(TUNE.read_text()):
        for doc in yaml.safe_load_all(block):
            routes = doc.get("routes", []) if isinstance(doc, dict) else []
            examples += [r["typed_per_filter_config"][EXT_PROC_FILTER] for r in routes
                         if EXT_PROC_FILTER in r.get("typed_per_filter_config", {})]
    return examples


def test_every_knob_has_a_yaml_example() -> None:
    knobs = _knobs()
    assert route_options.HTTP_ROUTE in knobs
    used = {m["key"] for ex in _per_route_examples()
            for m in ex.get("overrides", {}).get("grpc_initial_metadata", [])}
    # A knob ending in "-" is a key prefix (x-extproc-otel-attr-<name>).
    missing = {k for k in knobs if not any(u == k or (k.endswith("-") and u.startswith(k))
                                           for u in used)}
    assert not missing, f"knobs without an example in {TUNE.name}: {missing}"


def test_disabled_route_is_documented_as_untraced() -> None:
    assert any(ex.get("disabled") is True for ex in _per_route_examples())
    assert re.search(r"no span", TUNE.read_text(), re.IGNORECASE)


@pytest.mark.parametrize("name", ["deploy-kubernetes.md", "attach-istio-envoy-gateway.md",
                                  "tune-via-envoy.md", "backends.md"])
def test_guide_links_resolve(name: str) -> None:
    path = DOCS / name
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{name}: broken link {target}"
