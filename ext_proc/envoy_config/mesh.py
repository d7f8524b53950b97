"""Istio and Envoy Gateway resources that carry the sidecar's Envoy config."""

from __future__ import annotations

import yaml

from ext_proc.config import Settings
from ext_proc.envoy_config.builders import (
    EG_API,
    EG_ATTRIBUTE,
    HCM_FILTER,
    ISTIO_API,
    ROUTER_FILTER,
    Doc,
    EnvoyConfigOptions,
    ext_proc_filter,
    per_route_config,
    route_override,
    runtime_layer,
    sidecar_cluster,
    to_dict,
)
from ext_proc.telemetry.semconv import EnvoyAttr


def istio_envoy_filter(settings: Settings, opts: EnvoyConfigOptions) -> Doc:
    """An Istio ``EnvoyFilter`` adding the filter, the cluster and a per-route example."""
    gateway = opts.istio_context == "gateway"
    # no access-log join here: the sidecar needs Envoy's response phase
    http_filter = to_dict(ext_proc_filter(settings, opts, lean=False))
    context = "GATEWAY" if gateway else "SIDECAR_INBOUND"
    hcm_match = {"context": context, "listener": {"filterChain": {"filter": {
        "name": HCM_FILTER, "subFilter": {"name": ROUTER_FILTER}}}}}
    route_match = {"context": context, "routeConfiguration": {
        "vhost": {"route": {"name": opts.example_route_name}}}}
    return {
        "apiVersion": ISTIO_API,
        "kind": "EnvoyFilter",
        "metadata": {"name": opts.name},
        "spec": {
            "workloadSelector": {"labels": {"istio": "ingressgateway"} if gateway
                                 else {"app": "my-app"}},
            "configPatches": [
                {"applyTo": "HTTP_FILTER", "match": hcm_match, "patch": {
                    "operation": "INSERT_BEFORE", "value": http_filter}},
                {"applyTo": "CLUSTER", "match": {"context": "GATEWAY" if gateway
                                                 else "SIDECAR_OUTBOUND"},
                 "patch": {"operation": "ADD", "value": to_dict(sidecar_cluster(opts))}},
                {"applyTo": "HTTP_ROUTE", "match": route_match, "patch": {
                    "operation": "MERGE", "value": {"typed_per_filter_config": per_route_config(
                        route_override(opts.example_route_template))}}},
            ],
        },
    }


def envoy_gateway(settings: Settings, opts: EnvoyConfigOptions) -> list[Doc]:
    """Envoy Gateway resources: the runtime flag (EnvoyProxy) and the filter (policy)."""
    attrs = {"request": [a for a in EnvoyAttr.REQUEST if EG_ATTRIBUTE.match(a)],
             "response": [a for a in EnvoyAttr.RESPONSE if EG_ATTRIBUTE.match(a)]}
    runtime = yaml.safe_dump({"layered_runtime": to_dict(runtime_layer())}, sort_keys=False)
    namespace = settings.stream.metadata_namespace
    timeout_ms = int(opts.message_timeout.total_seconds() * 1000)
    return [
        {"apiVersion": EG_API, "kind": "EnvoyProxy", "metadata": {"name": opts.name},
         "spec": {"bootstrap": {"type": "Merge", "value": runtime}}},
        {"apiVersion": EG_API, "kind": "EnvoyExtensionPolicy", "metadata": {"name": opts.name},
         "spec": {
             "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                             "name": "eg"}],
             "extProc": [{
                 "backendRefs": [{"name": opts.name, "port": opts.sidecar_port}],
                 "failOpen": True,
                 "messageTimeout": f"{timeout_ms}ms",
                 "processingMode": {"request": {"attributes": attrs["request"]},
                                    "response": {"attributes": attrs["response"]}},
                 "metadata": {"accessibleNamespaces": [namespace],
                              "writableNamespaces": [namespace]},
             }],
         }},
    ]
