"""Attribute keys, span names and Envoy attribute names, defined once.

Keys follow the stable HTTP semantic conventions (opentelemetry.semconv);
Envoy facts live under ``envoy.*``.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv.attributes import (
    client_attributes,
    error_attributes,
    http_attributes,
    network_attributes,
    server_attributes,
    url_attributes,
    user_agent_attributes,
)

HTTP_REQUEST_METHOD: Final = http_attributes.HTTP_REQUEST_METHOD
HTTP_REQUEST_METHOD_ORIGINAL: Final = http_attributes.HTTP_REQUEST_METHOD_ORIGINAL
HTTP_RESPONSE_STATUS_CODE: Final = http_attributes.HTTP_RESPONSE_STATUS_CODE
HTTP_ROUTE: Final = http_attributes.HTTP_ROUTE
HTTP_REQUEST_RESEND_COUNT: Final = http_attributes.HTTP_REQUEST_RESEND_COUNT
HTTP_RESPONSE_BODY_SIZE: Final = "http.response.body.size"
URL_SCHEME: Final = url_attributes.URL_SCHEME
URL_PATH: Final = url_attributes.URL_PATH
URL_QUERY: Final = url_attributes.URL_QUERY
SERVER_ADDRESS: Final = server_attributes.SERVER_ADDRESS
SERVER_PORT: Final = server_attributes.SERVER_PORT
CLIENT_ADDRESS: Final = client_attributes.CLIENT_ADDRESS
CLIENT_PORT: Final = client_attributes.CLIENT_PORT
USER_AGENT_ORIGINAL: Final = user_agent_attributes.USER_AGENT_ORIGINAL
NETWORK_PROTOCOL_VERSION: Final = network_attributes.NETWORK_PROTOCOL_VERSION
ERROR_TYPE: Final = error_attributes.ERROR_TYPE

# RPC conventions, as issue #4 names them (rpc.system=grpc, rpc.grpc.status_code).
RPC_SYSTEM: Final = "rpc.system"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"

# TLS of the downstream connection (semconv tls.*, development), from Envoy's access log.
TLS_PROTOCOL_NAME: Final = "tls.protocol.name"
TLS_PROTOCOL_VERSION: Final = "tls.protocol.version"
TLS_CIPHER: Final = "tls.cipher"
# The SNI. The registry has no tls.server.name; tls.client.server_name is the SNI, deprecated
# for server.address, which the SERVER span already takes from the Host/:authority.
TLS_CLIENT_SERVER_NAME: Final = "tls.client.server_name"
# A keyed hash of the client certificate's identity, not tls.client.hash.sha256 (that one
# is the certificate's plain DER fingerprint, which Envoy's access log does not carry).
ENVOY_TLS_PEER_CERTIFICATE_HASH: Final = "envoy.tls.peer_certificate_hash"

ENVOY_REQUEST_ID: Final = "envoy.request_id"
ENVOY_ROUTE_NAME: Final = "envoy.route_name"
ENVOY_CLUSTER_NAME: Final = "envoy.cluster_name"
ENVOY_VIRTUAL_HOST: Final = "envoy.virtual_host_name"
ENVOY_RESPONSE_FLAGS: Final = "envoy.response_flags"
ENVOY_RESPONSE_CODE_DETAILS: Final = "envoy.response_code_details"
ENVOY_UPSTREAM_ADDRESS: Final = "envoy.upstream_address"
ENVOY_UPSTREAM_ATTEMPTS: Final = "envoy.upstream_request_attempt_count"
ENVOY_UPSTREAM_FAILURE: Final = "envoy.upstream_transport_failure_reason"
# which part of the request a phase span covers: filters, upstream, response (#19)
ENVOY_PHASE: Final = "envoy.phase"

# error.type when the stream ends before any response was seen (client abort,
# downstream reset, or Envoy giving up on us).
ERROR_CLIENT_ABORTED: Final = "client_aborted"
# error.type when the stream was reset after the response had started (upstream
# reset mid-body, or the client leaving mid-response).
ERROR_RESPONSE_INCOMPLETE: Final = "response_incomplete"

# HTTP methods the conventions know; anything else is recorded as _OTHER.
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
OTHER_METHOD: Final = "_OTHER"


class EnvoyAttr:
    """Names of Envoy attributes we ask for (request_attributes / response_attributes)."""

    REQUEST_TIME: Final = "request.time"
    REQUEST_ID: Final = "request.id"
    REQUEST_PROTOCOL: Final = "request.protocol"
    SOURCE_ADDRESS: Final = "source.address"
    SOURCE_PORT: Final = "source.port"
    DESTINATION_ADDRESS: Final = "destination.address"
    CONNECTION_MTLS: Final = "connection.mtls"
    ROUTE_NAME: Final = "xds.route_name"
    CLUSTER_NAME: Final = "xds.cluster_name"
    VIRTUAL_HOST_NAME: Final = "xds.virtual_host_name"
    RESPONSE_CODE: Final = "response.code"
    RESPONSE_CODE_DETAILS: Final = "response.code_details"
    RESPONSE_FLAGS: Final = "response.flags"
    UPSTREAM_ADDRESS: Final = "upstream.address"
    UPSTREAM_ATTEMPTS: Final = "upstream.request_attempt_count"
    UPSTREAM_FAILURE: Final = "upstream.transport_failure_reason"

    REQUEST: Final = (
        REQUEST_TIME, REQUEST_ID, REQUEST_PROTOCOL, SOURCE_ADDRESS, SOURCE_PORT,
        DESTINATION_ADDRESS, CONNECTION_MTLS, ROUTE_NAME, CLUSTER_NAME, VIRTUAL_HOST_NAME,
    )
    RESPONSE: Final = (
        RESPONSE_CODE, RESPONSE_CODE_DETAILS, RESPONSE_FLAGS, UPSTREAM_ADDRESS,
        UPSTREAM_ATTEMPTS, UPSTREAM_FAILURE,
    )


# Envoy's request.protocol values -> network.protocol.version
PROTOCOL_VERSIONS: Final = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/3": "3"}
