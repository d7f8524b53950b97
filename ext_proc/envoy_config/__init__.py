"""``extproc-otel envoy-config``: the Envoy side of the sidecar, for its current settings.

Everything is built from the typed Envoy API classes of ``envoy-data-plane``, so
a misspelt field name fails here instead of in a user's Envoy. Formats:

``bootstrap``      a complete, runnable Envoy bootstrap (listener, routes, clusters)
``snippet``        the pieces to paste into an existing bootstrap
``istio``          an Istio ``EnvoyFilter`` (ingress gateway or sidecar variant), with the
                   ``ServiceEntry`` + ``Telemetry`` that send Envoy's access log to the
                   sidecar; the mesh-config provider they need is in the leading comment
``envoy-gateway``  Envoy Gateway ``EnvoyProxy`` (with the access log) + ``EnvoyExtensionPolicy``
"""

from __future__ import annotations

import yaml

from ext_proc.config import Settings
from ext_proc.envoy_config.builders import (
    EG_ATTRIBUTE,
    EXT_PROC_FILTER,
    FORMATS,
    GRACEFUL_CLOSE_FLAG,
    ROUTER_FILTER,
    Doc,
    EnvoyConfigOptions,
    Format,
    IstioContext,
    bootstrap,
    ext_proc_filter,
    options_for,
    per_route_config,
    route_disabled,
    route_override,
    runtime_layer,
    sidecar_cluster,
    snippet,
    to_dict,
)
from ext_proc.envoy_config.mesh import (
    envoy_gateway,
    istio,
    istio_envoy_filter,
    istio_mesh_comment,
    istio_mesh_config,
    istio_operator,
    join_fields,
)
from ext_proc.envoy_config.prefilter import PREFILTER_METADATA, comment, plan_for, unwrap

__all__ = [
    "EG_ATTRIBUTE",
    "EXT_PROC_FILTER",
    "FORMATS",
    "GRACEFUL_CLOSE_FLAG",
    "PREFILTER_METADATA",
    "ROUTER_FILTER",
    "EnvoyConfigOptions",
    "Format",
    "IstioContext",
    "bootstrap",
    "envoy_gateway",
    "ext_proc_filter",
    "istio",
    "istio_envoy_filter",
    "istio_mesh_config",
    "istio_operator",
    "join_fields",
    "options_for",
    "per_route_config",
    "plan_for",
    "render",
    "route_disabled",
    "route_override",
    "runtime_layer",
    "sidecar_cluster",
    "snippet",
    "to_dict",
    "unwrap",
]


def render(fmt: Format, settings: Settings, opts: EnvoyConfigOptions) -> str:
    """The YAML text for `fmt` (multi-document for ``envoy-gateway``), headed by a comment
    on the prefilter: what Envoy skips, or why it asks about every request."""
    docs: list[Doc]
    if fmt == "bootstrap":
        docs = [to_dict(bootstrap(settings, opts))]
    elif fmt == "snippet":
        docs = [snippet(settings, opts)]
    elif fmt == "istio":
        docs = istio(settings, opts)
    elif fmt == "envoy-gateway":
        docs = envoy_gateway(settings, opts)
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    head = comment(plan_for(settings), carried=fmt != "envoy-gateway")
    if fmt == "istio":
        head += istio_mesh_comment(opts)
    return head + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (an embedded YAML document) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
