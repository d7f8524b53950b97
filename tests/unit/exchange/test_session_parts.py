"""Pure pieces of the stream: Envoy attributes, request info, headers, route options."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)

from ext_proc._gen.envoy.config.core.v3 import base_pb2
from ext_proc.config import PropagationSettings
from ext_proc.exchange.request_info import request_info, split_authority
from ext_proc.request.envoy_attrs import EnvoyAttributes, parse_time_ns, response_flag_names
from ext_proc.request.headers import carrier_from_headers, header_mutation
from ext_proc.request.route_options import DEFAULT, HTTP_ROUTE, RouteOptionsCache, route_options
from ext_proc.telemetry.otel_env import TelemetryConfigError
from ext_proc.telemetry.provider import build_span_exporter


def test_request_time_is_parsed_to_the_microsecond() -> None:
    assert parse_time_ns("2026-11-26T17:06:31.94562+00:00") == 1795712791945620000
    assert parse_time_ns("1970-01-01T00:00:01+00:00") == 1_000_000_000
    assert parse_time_ns("2026-11-26T19:06:31.5+02:00") == 1795712791500000000
    assert parse_time_ns("2026-11-26T17:06:31") is None  # no zone: not Envoy's
    assert parse_time_ns("yesterday") is None


@given(st.text(max_size=60))
def test_parse_time_never_raises(text: str) -> None:
    parse_time_ns(text)


def test_response_flags_decode_to_envoy_names() -> None:
    assert response_flag_names(256) == ["NR"]
    assert response_flag_names(32 | 4) == ["UT", "UF"]
    assert response_flag_names(1024) == ["FI"]
    assert response_flag_names(0x4000 | 0x8000) == ["DC", "URX"]
    assert response_flag_names(0) == []


def test_envoy_attributes_are_typed_and_tolerant() -> None:
    struct = struct_pb2.Struct()
    struct.update({"response.code": 503.0, "response.flags": 32.0, "connection.mtls": False,
                   "request.id": "abc", "upstream.address": "127.0.0.1:80",
                   "size": "12", "bad": "x"})
    attrs = EnvoyAttributes(struct)
    assert attrs.integer("response.code") == 503
    assert attrs.string("response.code") == "503"
    assert attrs.boolean("connection.mtls") is False
    assert attrs.string("request.id") == "abc"
    assert attrs.number("size") == 12.0
    assert attrs.number("bad") is None and attrs.integer("missing") is None
    assert not EnvoyAttributes(None)


def test_headers_read_raw_value_keep_duplicates_and_survive_bad_bytes() -> None:
    hmap = base_pb2.HeaderMap()
    for key, raw, value in [("TraceState", b"a=1", ""), ("tracestate", b"b=2", ""),
                            ("x-old", b"", "legacy"), ("x-bin", b"\xff\xfe", "")]:
        hmap.headers.add(key=key, raw_value=raw, value=value)
    carrier = carrier_from_headers(hmap)
    assert carrier["tracestate"] == ["a=1", "b=2"]
    assert carrier["x-old"] == ["legacy"]
    assert carrier["x-bin"] == ["\ufffd\ufffd"]


def test_header_mutation_overwrites_in_raw_value() -> None:
    mutation = header_mutation({"traceparent": "00-abc"}, ["grpc-trace-bin"])
    (option,) = mutation.set_headers
    assert option.header.raw_value == b"00-abc" and option.header.value == ""
    assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(mutation.remove_headers) == ["grpc-trace-bin"]


def test_request_info_follows_the_http_conventions() -> None:
    info = request_info({":method": ["PATCH"], ":path": ["/a/b?x=1&y"], ":scheme": ["https"],
                         ":authority": ["[::1]:8443"]}, "/a/{id}")
    assert info.span_name == "PATCH /a/{id}"
    attrs = info.start_attributes
    assert attrs["url.path"] == "/a/b" and "url.query" not in attrs  # recorded later, redacted
    assert info.query == "x=1&y"
    assert attrs["server.address"] == "::1" and attrs["server.port"] == 8443
    assert attrs["http.route"] == "/a/{id}" and attrs["url.scheme"] == "https"
    odd = request_info({":method": ["FOO"], ":path": ["/"]})
    assert odd.span_name == "HTTP"
    assert odd.start_attributes["http.request.method"] == "_OTHER"
    assert odd.start_attributes["http.request.method_original"] == "FOO"
    assert "url.query" not in odd.start_attributes


@pytest.mark.parametrize(("authority", "expected"), [
    ("example.com", ("example.com", None)), ("example.com:80", ("example.com", 80)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)), ("[::1]", ("::1", None)),
    ("host:notaport", ("host", None)), ("host:9999999", ("host", None)),
])
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


def test_route_options_from_grpc_initial_metadata() -> None:
    assert route_options(None) is DEFAULT
    assert route_options([("user-agent", "grpc")]) is DEFAULT
    assert route_options([(HTTP_ROUTE, "/users/{id}")]).http_route == "/users/{id}"
    assert route_options([(HTTP_ROUTE, "x" * 1000)]) is DEFAULT
    assert route_options([(HTTP_ROUTE + "-bin", b"\x00")]) is DEFAULT


def test_route_options_cache_answers_known_metadata_alike() -> None:
    cache = RouteOptionsCache(PropagationSettings())
    route = (("content-type", "application/grpc"), (HTTP_ROUTE, "/users/{id}"))
    first = cache.get(route)
    assert first.http_route == "/users/{id}"
    assert cache.get(tuple(route)) is first  # the same metadata again (another tuple)
    assert cache.get((("te", "trailers"),)) is DEFAULT
    assert cache.get(None) is DEFAULT
    odd = ((HTTP_ROUTE, "/a"), ("x-list", ["unhashable"]))
    assert cache.get(odd).http_route == "/a"  # type: ignore[arg-type]  # filtered as always
    assert cache.get(list(route)) is first  # a list is filtered, then the parsed cache


def test_span_exporter_follows_the_otel_variables() -> None:
    assert build_span_exporter({"OTEL_TRACES_EXPORTER": "none"}) is None
    grpc_exp = build_span_exporter({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert isinstance(grpc_exp, GrpcSpanExporter)  # FastOTLPSpanExporter, a subclass
    http_exp = build_span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert type(http_exp).__module__.endswith("proto.http.trace_exporter")
    traces_only = build_span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                       "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
    assert type(traces_only).__module__.endswith("proto.http.trace_exporter")
    for exporter in (grpc_exp, http_exp, traces_only):
        assert exporter is not None
        exporter.shutdown()
    with pytest.raises(TelemetryConfigError, match="OTEL_TRACES_EXPORTER"):
        build_span_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TelemetryConfigError, match="http/json"):
        build_span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_attribute_values_are_bounded_unless_configured() -> None:
    from ext_proc.telemetry.provider import DEFAULT_ATTRIBUTE_LENGTH, span_limits

    assert span_limits({}).max_attribute_length == DEFAULT_ATTRIBUTE_LENGTH
    configured = span_limits({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100"})
    assert configured.max_attribute_length == 100
