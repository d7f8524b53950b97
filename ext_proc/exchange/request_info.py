"""What the gateway span says about the request, from headers and Envoy attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ext_proc._gen.envoy.config.core.v3 import base_pb2
from ext_proc.request.envoy_attrs import EnvoyAttributes
from ext_proc.request.headers import Carrier, first
from ext_proc.telemetry import semconv as sc


@dataclass(slots=True)  # not frozen: ~1 µs less to build, per request
class RequestInfo:
    method: str  # normalised per the conventions (_OTHER for unknown methods)
    method_original: str
    path: str
    query: str | None
    scheme: str | None
    authority: str | None
    user_agent: str | None
    request_id: str | None
    route: str | None = None  # route template (http.route) when Envoy's config names one
    rpc_service: str | None = None  # set for gRPC requests (content-type application/grpc)
    rpc_method: str | None = None
    extra: tuple[tuple[str, str], ...] = ()  # static attributes from the route's options

    @property
    def is_grpc(self) -> bool:
        return self.rpc_service is not None

    @property
    def span_name(self) -> str:
        if self.rpc_service is not None:
            return f"{self.rpc_service}/{self.rpc_method}"
        method = "HTTP" if self.method == sc.OTHER_METHOD else self.method
        return f"{method} {self.route}" if self.route else method

    @property
    def start_attributes(self) -> dict[str, Any]:
        """Attributes known before the span starts (the sampler sees these). The query
        is recorded later, redacted."""
        attrs: dict[str, Any] = {sc.HTTP_REQUEST_METHOD: self.method, sc.URL_PATH: self.path}
        if self.method != self.method_original:
            attrs[sc.HTTP_REQUEST_METHOD_ORIGINAL] = self.method_original
        if self.route:
            attrs[sc.HTTP_ROUTE] = self.route
        if self.scheme:
            attrs[sc.URL_SCHEME] = self.scheme
        if self.rpc_service is not None:
            attrs[sc.RPC_SYSTEM] = "grpc"
            attrs[sc.RPC_SERVICE] = self.rpc_service
            attrs[sc.RPC_METHOD] = self.rpc_method
        for key, value in self.extra:
            attrs.setdefault(key, value)
        if self.authority:
            host, port = split_authority(self.authority)
            attrs[sc.SERVER_ADDRESS] = host
            if port is not None:
                attrs[sc.SERVER_PORT] = port
        return attrs

    def late_attributes(self, envoy: EnvoyAttributes) -> dict[str, Any]:
        """Attributes recorded after Envoy has its answer."""
        attrs: dict[str, Any] = {}
        if self.user_agent:
            attrs[sc.USER_AGENT_ORIGINAL] = self.user_agent
        request_id = self.request_id or envoy.string(sc.EnvoyAttr.REQUEST_ID)
        if request_id:
            attrs[sc.ENVOY_REQUEST_ID] = request_id
        if not envoy:
            return attrs
        source = envoy.string(sc.EnvoyAttr.SOURCE_ADDRESS)  # "ip:port" of the peer
        if source:
            host, port = split_authority(source)
            attrs[sc.CLIENT_ADDRESS] = host
            port = envoy.integer(sc.EnvoyAttr.SOURCE_PORT) or port
            if port is not None:
                attrs[sc.CLIENT_PORT] = port
        protocol = envoy.string(sc.EnvoyAttr.REQUEST_PROTOCOL)
        if protocol in sc.PROTOCOL_VERSIONS:
            attrs[sc.NETWORK_PROTOCOL_VERSION] = sc.PROTOCOL_VERSIONS[protocol]
        for key, name in (
            (sc.ENVOY_ROUTE_NAME, sc.EnvoyAttr.ROUTE_NAME),
            (sc.ENVOY_CLUSTER_NAME, sc.EnvoyAttr.CLUSTER_NAME),
            (sc.ENVOY_VIRTUAL_HOST, sc.EnvoyAttr.VIRTUAL_HOST_NAME),
        ):
            value = envoy.string(name)
            if value:
                attrs[key] = value
        return attrs

    @staticmethod
    def route_template(metadata: base_pb2.Metadata, namespace: str) -> str | None:
        """``http_route`` from our metadata namespace, when Envoy forwarded it."""
        if namespace not in metadata.filter_metadata:
            return None
        value = metadata.filter_metadata[namespace].fields.get("http_route")
        if value is None or value.WhichOneof("kind") != "string_value":
            return None
        return value.string_value or None


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` / ``[v6]:port`` -> (host, port or None); tolerant of junk."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            return authority, None
    return host, int(port_text) if port_text.isdigit() and len(port_text) <= 5 else None


def grpc_method(path: str) -> tuple[str, str] | None:
    """``/package.Service/Method`` -> (``package.Service``, ``Method``)."""
    service, sep, method = path[1:].partition("/")
    if not path.startswith("/") or not sep or not service or not method or "/" in method:
        return None
    return service, method


def request_info(carrier: Carrier, route: str | None = None,
                 extra: tuple[tuple[str, str], ...] = ()) -> RequestInfo:
    original = first(carrier, ":method") or ""
    method = original if original in sc.KNOWN_METHODS else sc.OTHER_METHOD
    target = first(carrier, ":path") or ""
    path, sep, query = target.partition("?")
    rpc = None
    if (first(carrier, "content-type") or "").startswith("application/grpc"):
        rpc = grpc_method(path)
    return RequestInfo(
        method=method,
        method_original=original,
        path=path,
        query=query if sep else None,
        scheme=first(carrier, ":scheme"),
        authority=first(carrier, ":authority") or first(carrier, "host"),
        user_agent=first(carrier, "user-agent"),
        request_id=first(carrier, "x-request-id"),
        route=route,
        rpc_service=rpc[0] if rpc else None,
        rpc_method=rpc[1] if rpc else None,
        extra=extra,
    )
