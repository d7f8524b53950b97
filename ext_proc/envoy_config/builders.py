"""Envoy API objects for the sidecar, built from ``envoy-data-plane``'s typed classes.

The typed classes are imported inside each function: importing them is slow and
they are never needed on the request path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal

from ext_proc.config import Settings
from ext_proc.config.core import split_host_port
from ext_proc.envoy_config.prefilter import PREFILTER_METADATA, plan_for, wrap
from ext_proc.request.route_options import HTTP_ROUTE as ROUTE_HEADER
from ext_proc.telemetry.semconv import EnvoyAttr

Format = Literal["bootstrap", "snippet", "istio", "envoy-gateway"]
IstioContext = Literal["gateway", "sidecar"]
Doc = dict[str, Any]

FORMATS: Final[tuple[Format, ...]] = ("bootstrap", "snippet", "istio", "envoy-gateway")
EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"
ROUTER_FILTER: Final = "envoy.filters.http.router"
HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
ACCESS_LOGGER: Final = "envoy.access_loggers.http_grpc"
GRACEFUL_CLOSE_FLAG: Final = "envoy.reloadable_features.ext_proc_graceful_grpc_close"
H2_OPTIONS_KEY: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_API: Final = "networking.istio.io/v1alpha3"
EG_API: Final = "gateway.envoyproxy.io/v1alpha1"
# Envoy Gateway only forwards attributes matching this (its CRD validation).
EG_ATTRIBUTE: Final = re.compile(
    r"^(connection\.|source\.|destination\.|request\.|response\.|upstream\.|xds\.route_)[a-z_1-9]*$"
)
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class EnvoyConfigOptions:
    """Where things are, as Envoy sees them. Defaults: sidecar beside Envoy."""

    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = 50051
    cluster_name: str = "extproc_otel"
    message_timeout: timedelta = timedelta(milliseconds=200)
    listener_port: int = 10000
    admin_port: int = 9901
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 8080
    example_route_name: str = "users"
    example_route_template: str = "/api/users/{id}"
    istio_context: IstioContext = "gateway"
    name: str = "extproc-otel"


def options_for(settings: Settings, **overrides: Any) -> EnvoyConfigOptions:
    """Options whose sidecar address is the settings' listen address (wildcards -> loopback)."""
    host, port = split_host_port(settings.server.listen)
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return EnvoyConfigOptions(**{"sidecar_host": host, "sidecar_port": port, **overrides})


def to_dict(message: Any) -> Doc:
    """A typed message as the proto-JSON dict Envoy reads, with snake_case keys."""
    import betterproto2

    result: Doc = message.to_dict(casing=betterproto2.Casing.SNAKE)
    return result


def _pack(message: Any) -> Any:
    from envoy_data_plane.google.protobuf import Any as AnyMessage

    return AnyMessage.pack(message)


def ext_proc_filter(settings: Settings, opts: EnvoyConfigOptions, *, lean: bool) -> Any:
    """The ``HttpFilter`` that sends every request to the sidecar (place before the router).

    `lean` (only with the access-log join, `access_log_join`): Envoy skips the response
    phase and the sidecar learns each response from the access log, asking for the
    phase (``mode_override``) only for requests that need it. With the prefilter on, the
    filter is wrapped so that Envoy skips what the sidecar would not sample
    (`ext_proc.envoy_config.prefilter`), and the stream carries the plan's digest."""
    from envoy_data_plane.envoy.config.core.v3 import (
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HeaderValue,
    )
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        MetadataOptions,
        MetadataOptionsMetadataNamespaces,
        ProcessingMode,
        ProcessingModeBodySendMode,
        ProcessingModeHeaderSendMode,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpFilter,
    )

    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    namespaces = MetadataOptionsMetadataNamespaces(untyped=[settings.stream.metadata_namespace])
    plan = plan_for(settings)
    digest = [HeaderValue(key=PREFILTER_METADATA, value=plan.digest())] if plan.enabled else []
    processor = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=opts.cluster_name),
                                 initial_metadata=digest),
        failure_mode_allow=True,
        message_timeout=opts.message_timeout,
        processing_mode=ProcessingMode(
            request_header_mode=send, response_header_mode=skip if lean else send,
            request_body_mode=ProcessingModeBodySendMode.NONE,
            response_body_mode=ProcessingModeBodySendMode.NONE,
            request_trailer_mode=skip, response_trailer_mode=skip if lean else send,
        ),
        allow_mode_override=lean,
        request_attributes=list(EnvoyAttr.REQUEST),
        response_attributes=list(EnvoyAttr.RESPONSE),
        metadata_options=MetadataOptions(forwarding_namespaces=namespaces,
                                         receiving_namespaces=namespaces),
    )
    return wrap(plan, HttpFilter(name=EXT_PROC_FILTER, typed_config=_pack(processor)))


def sidecar_cluster(opts: EnvoyConfigOptions) -> Any:
    """The HTTP/2 cluster Envoy uses to reach the sidecar."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import Http2ProtocolOptions
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )

    h2 = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()))
    return Cluster(
        name=opts.cluster_name, type=_discovery(opts.sidecar_host, ClusterDiscoveryType),
        connect_timeout=timedelta(milliseconds=250),
        typed_extension_protocol_options={H2_OPTIONS_KEY: _pack(h2)},
        load_assignment=_endpoints(opts.cluster_name, opts.sidecar_host, opts.sidecar_port),
    )


def _discovery(host: str, kind: Any) -> Any:
    return kind.STATIC if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", host) else kind.STRICT_DNS


def _endpoints(cluster: str, host: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )

    address = Address(socket_address=SocketAddress(address=host, port_value=port))
    return ClusterLoadAssignment(cluster_name=cluster, endpoints=[LocalityLbEndpoints(
        lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])])


def route_override(http_route: str) -> Any:
    """Per-route ``ExtProcPerRoute``: tell the sidecar this route's ``http.route`` template."""
    from envoy_data_plane.envoy.config.core.v3 import HeaderValue
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExtProcOverrides,
        ExtProcPerRoute,
    )

    return ExtProcPerRoute(overrides=ExtProcOverrides(
        grpc_initial_metadata=[HeaderValue(key=ROUTE_HEADER, value=http_route)]))


def route_disabled() -> Any:
    """Per-route ``ExtProcPerRoute`` that turns the sidecar off (such routes get no span)."""
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ExtProcPerRoute

    return ExtProcPerRoute(disabled=True)


def per_route_config(message: Any) -> Doc:
    """A route's ``typed_per_filter_config`` map holding `message` for our filter."""
    return {EXT_PROC_FILTER: to_dict(_pack(message))}


def runtime_layer() -> Any:
    """A static runtime layer with the graceful-close flag the sidecar relies on."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import LayeredRuntime, RuntimeLayer
    from envoy_data_plane.google.protobuf import Struct

    return LayeredRuntime(layers=[RuntimeLayer(
        name="extproc-otel", static_layer=Struct.from_dict({GRACEFUL_CLOSE_FLAG: True}))])


def access_log_join(opts: EnvoyConfigOptions) -> Any:
    """Envoy's gRPC access log to the sidecar (same cluster): the sidecar ends each span
    when Envoy's own record of the request arrives (responses cut short, body size)."""
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.core.v3 import ApiVersion, GrpcService, GrpcServiceEnvoyGrpc
    from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
        CommonGrpcAccessLogConfig,
        HttpGrpcAccessLogConfig,
    )

    return AccessLog(name=ACCESS_LOGGER, typed_config=_pack(HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=opts.cluster_name,
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=opts.cluster_name)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=timedelta(milliseconds=50),
            buffer_size_bytes=16384,  # batches: one message per entry cost ~80 us/request
        ),
        additional_response_headers_to_log=["grpc-status"],
        additional_response_trailers_to_log=["grpc-status"],
    )))


def bootstrap(settings: Settings, opts: EnvoyConfigOptions) -> Any:
    """A complete bootstrap: listener -> ext_proc -> router -> one upstream."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import (
        Route,
        RouteAction,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpFilter,
    )

    upstream = "app"
    template = opts.example_route_template
    prefix = template.split("{", 1)[0]
    routes = [
        Route(name=opts.example_route_name, match=RouteMatch(prefix=prefix),
              route=RouteAction(cluster=upstream),
              typed_per_filter_config={EXT_PROC_FILTER: _pack(route_override(template))}),
        Route(name="healthz", match=RouteMatch(path="/healthz"),
              route=RouteAction(cluster=upstream),
              typed_per_filter_config={EXT_PROC_FILTER: _pack(route_disabled())}),
        Route(name="default", match=RouteMatch(prefix="/"), route=RouteAction(cluster=upstream)),
    ]
    # No `tracing:` block: Envoy's own tracer would overwrite the traceparent we inject.
    hcm = HttpConnectionManager(
        stat_prefix="ingress",
        route_config=RouteConfiguration(name="local", virtual_hosts=[
            VirtualHost(name="all", domains=["*"], routes=routes)]),
        http_filters=[ext_proc_filter(settings, opts, lean=settings.stream.join_access_log),
                      HttpFilter(name=ROUTER_FILTER, typed_config=_pack(Router()))],
        access_log=[access_log_join(opts)],
    )
    listen = Address(socket_address=SocketAddress(address="0.0.0.0", port_value=opts.listener_port))
    listener = Listener(name="ingress", address=listen, filter_chains=[FilterChain(
        filters=[Filter(name=HCM_FILTER, typed_config=_pack(hcm))])])
    app = Cluster(name=upstream, type=_discovery(opts.upstream_host, ClusterDiscoveryType),
                  connect_timeout=timedelta(milliseconds=250),
                  load_assignment=_endpoints(upstream, opts.upstream_host, opts.upstream_port))
    return Bootstrap(
        admin=Admin(address=Address(socket_address=SocketAddress(
            address="127.0.0.1", port_value=opts.admin_port))),
        layered_runtime=runtime_layer(),
        static_resources=BootstrapStaticResources(
            listeners=[listener], clusters=[sidecar_cluster(opts), app]),
    )


def snippet(settings: Settings, opts: EnvoyConfigOptions) -> Doc:
    """The parts to merge into an existing bootstrap, keyed by where they go."""
    return {
        "layered_runtime": to_dict(runtime_layer()),
        "http_filters": [to_dict(ext_proc_filter(
            settings, opts, lean=settings.stream.join_access_log))],
        "clusters": [to_dict(sidecar_cluster(opts))],
        "http_connection_manager_access_log": [to_dict(access_log_join(opts))],
        "route_typed_per_filter_config": {
            "with_route_template": per_route_config(route_override(opts.example_route_template)),
            "disabled": per_route_config(route_disabled()),
        },
    }
