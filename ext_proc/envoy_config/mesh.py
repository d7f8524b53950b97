"""Istio and Envoy Gateway resources that carry the sidecar's Envoy config.

Both meshes also get Envoy's gRPC access log to the sidecar (`access_log_join`), each
through its own API: Istio's ``envoyHttpAls`` extension provider (mesh config) enabled by
a ``Telemetry`` resource, and Envoy Gateway's ``EnvoyProxy`` access-log sink of type ALS.
What they log is read off `access_log_join`, so the join gets the same fields as with
``--format bootstrap``.
"""

from __future__ import annotations

from typing import Any, Final

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
    access_log_join,
    ext_proc_filter,
    per_route_config,
    route_override,
    runtime_layer,
    sidecar_cluster,
    to_dict,
)
from ext_proc.telemetry.semconv import EnvoyAttr

ISTIO_NETWORKING_API: Final = "networking.istio.io/v1"
ISTIO_TELEMETRY_API: Final = "telemetry.istio.io/v1"
ISTIO_INSTALL_API: Final = "install.istio.io/v1alpha1"
# `access_log_join`'s HttpGrpcAccessLogConfig fields -> Istio's EnvoyHttpGrpcV3LogProvider
# and Envoy Gateway's ALSEnvoyProxyAccessLog.http (neither has buffer settings: Envoy's
# defaults apply, flush every 1 s or 16 KiB).
_LOGGED: Final = (("additional_request_headers_to_log", "additionalRequestHeadersToLog",
                   "requestHeaders"),
                  ("additional_response_headers_to_log", "additionalResponseHeadersToLog",
                   "responseHeaders"),
                  ("additional_response_trailers_to_log", "additionalResponseTrailersToLog",
                   "responseTrailers"))


def join_fields(opts: EnvoyConfigOptions) -> dict[str, Any]:
    """What the bootstrap's access log to the sidecar names: cluster, log name, and the
    headers and trailers it logs (snake_case keys of HttpGrpcAccessLogConfig)."""
    config = to_dict(access_log_join(opts))["typed_config"]
    common = config["common_config"]
    return {"cluster": common["grpc_service"]["envoy_grpc"]["cluster_name"],
            "log_name": common["log_name"],
            **{field: list(config.get(field, [])) for field, _, _ in _LOGGED}}


def istio_als_host(opts: EnvoyConfigOptions) -> str:
    """The ServiceEntry host that stands for the sidecar beside each proxy (127.0.0.1)."""
    return f"{opts.name}.local"


def istio(settings: Settings, opts: EnvoyConfigOptions) -> list[Doc]:
    """What ``kubectl apply`` takes for Istio: the EnvoyFilter, and the ServiceEntry and
    Telemetry that send the access log to the sidecar (once `istio_mesh_config` is in the
    mesh config)."""
    return [istio_envoy_filter(settings, opts), istio_service_entry(opts), istio_telemetry(opts)]


def _istio_labels(opts: EnvoyConfigOptions) -> dict[str, str]:
    return {"istio": "ingressgateway"} if opts.istio_context == "gateway" else {"app": "my-app"}


def istio_envoy_filter(settings: Settings, opts: EnvoyConfigOptions) -> Doc:
    """An Istio ``EnvoyFilter`` adding the filter, the cluster and a per-route example."""
    gateway = opts.istio_context == "gateway"
    # Lean (no response phase), as the bootstrap, when the sidecar joins the access log:
    # the Telemetry below brings Envoy's http_grpc log to the sidecar in the same pod
    # (127.0.0.1), and Envoy's logger copies all dynamic metadata, ours included, into
    # common_properties.metadata whatever Istio's provider sets, so the join finds each
    # entry by request id and tells asked requests from un-asked ones. Without the log
    # (provider or Telemetry not applied) the sidecar notices and asks Envoy for the
    # response phase per request (mode_override).
    http_filter = to_dict(ext_proc_filter(settings, opts, lean=settings.stream.join_access_log))
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
            "workloadSelector": {"labels": _istio_labels(opts)},
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


def istio_service_entry(opts: EnvoyConfigOptions) -> Doc:
    """The sidecar as a registry entry, so that an extension provider can name it: each
    proxy reaches its own pod's sidecar (Istio's pattern for a local ext_authz)."""
    cluster = to_dict(sidecar_cluster(opts))
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    return {
        "apiVersion": ISTIO_NETWORKING_API,
        "kind": "ServiceEntry",
        "metadata": {"name": opts.name},
        "spec": {
            "hosts": [istio_als_host(opts)],
            "exportTo": ["."],  # a listener on this port for this namespace's proxies only
            "ports": [{"number": address["port_value"], "name": "grpc", "protocol": "GRPC"}],
            "resolution": "STATIC" if cluster["type"] == "STATIC" else "DNS",
            "endpoints": [{"address": address["address"]}],
        },
    }


def istio_telemetry(opts: EnvoyConfigOptions) -> Doc:
    """Enables the provider for the workloads the EnvoyFilter selects: a gateway's
    listeners are Istio's CLIENT mode, a sidecar's inbound ones SERVER (its outbound
    calls are not the requests the sidecar traces, and must not be counted as un-asked)."""
    mode = "CLIENT" if opts.istio_context == "gateway" else "SERVER"
    return {
        "apiVersion": ISTIO_TELEMETRY_API,
        "kind": "Telemetry",
        "metadata": {"name": opts.name},
        "spec": {
            "selector": {"matchLabels": _istio_labels(opts)},
            "accessLogging": [{"providers": [{"name": opts.name}], "match": {"mode": mode}}],
        },
    }


def istio_mesh_config(opts: EnvoyConfigOptions) -> Doc:
    """The ``meshConfig`` part: an ``envoyHttpAls`` provider for the ServiceEntry host,
    logging what `access_log_join` logs."""
    fields = join_fields(opts)
    provider: Doc = {"service": istio_als_host(opts), "port": opts.sidecar_port,
                     "logName": fields["log_name"]}
    provider.update({istio: fields[field] for field, istio, _ in _LOGGED if fields[field]})
    return {"extensionProviders": [{"name": opts.name, "envoyHttpAls": provider}]}


def istio_operator(opts: EnvoyConfigOptions) -> Doc:
    """`istio_mesh_config` as an ``istioctl install -f`` overlay (the istiod Helm chart
    takes the same ``meshConfig`` block as a value)."""
    return {"apiVersion": ISTIO_INSTALL_API, "kind": "IstioOperator",
            "metadata": {"name": opts.name}, "spec": {"meshConfig": istio_mesh_config(opts)}}


def istio_mesh_comment(opts: EnvoyConfigOptions) -> str:
    """The YAML comment that gives the mesh-config part with ``--format istio``."""
    block = yaml.safe_dump({"meshConfig": istio_mesh_config(opts)}, sort_keys=False)
    return ("# The Telemetry below needs this extension provider in Istio's mesh config\n"
            "# (istiod Helm value `meshConfig`, or IstioOperator `spec.meshConfig`:\n"
            "# envoy/istio/meshconfig.yaml); merge it with the providers you have:\n"
            + "".join(f"#   {line}\n" for line in block.splitlines()))


def envoy_gateway(settings: Settings, opts: EnvoyConfigOptions) -> list[Doc]:
    """Envoy Gateway resources: the runtime flag and the access log to the sidecar
    (EnvoyProxy), and the filter (policy)."""
    attrs = {"request": [a for a in EnvoyAttr.REQUEST if EG_ATTRIBUTE.match(a)],
             "response": [a for a in EnvoyAttr.RESPONSE if EG_ATTRIBUTE.match(a)]}
    runtime = yaml.safe_dump({"layered_runtime": to_dict(runtime_layer())}, sort_keys=False)
    namespace = settings.stream.metadata_namespace
    timeout_ms = int(opts.message_timeout.total_seconds() * 1000)
    sidecar = {"name": opts.name, "port": opts.sidecar_port}
    # The filter keeps Envoy's response phase (no lean mode, unlike Istio): the policy has
    # no mode override, and the sidecar is a Service with replicas, so an entry reaches
    # the replica that answered its request only by chance; with the response phase, an
    # exchange whose entry went elsewhere still ends, after join_timeout_s.
    return [
        {"apiVersion": EG_API, "kind": "EnvoyProxy", "metadata": {"name": opts.name},
         "spec": {"bootstrap": {"type": "Merge", "value": runtime},
                  "telemetry": {"accessLog": {"settings": [{"sinks": eg_access_log_sinks(
                      opts, sidecar)}]}}}},
        {"apiVersion": EG_API, "kind": "EnvoyExtensionPolicy", "metadata": {"name": opts.name},
         "spec": {
             "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                             "name": "eg"}],
             "extProc": [{
                 "backendRefs": [dict(sidecar)],
                 "failOpen": True,
                 "messageTimeout": f"{timeout_ms}ms",
                 "processingMode": {"request": {"attributes": attrs["request"]},
                                    "response": {"attributes": attrs["response"]}},
                 "metadata": {"accessibleNamespaces": [namespace],
                              "writableNamespaces": [namespace]},
             }],
         }},
    ]


def eg_access_log_sinks(opts: EnvoyConfigOptions, sidecar: Doc) -> list[Doc]:
    """The ALS sink to the sidecar, and the stdout log Envoy Gateway writes by default
    (any access-log setting replaces that default)."""
    fields = join_fields(opts)
    http = {eg: fields[field] for field, _, eg in _LOGGED if fields[field]}
    als: Doc = {"backendRefs": [dict(sidecar)], "type": "HTTP", "logName": fields["log_name"]}
    if http:
        als["http"] = http
    return [{"type": "ALS", "als": als},
            {"type": "File", "file": {"path": "/dev/stdout"}}]
