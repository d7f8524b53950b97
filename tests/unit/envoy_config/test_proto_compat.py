"""Our proto/ subset must be wire-compatible with Envoy's API.

Every message and enum we define is compared with the upstream definition in
envoy-data-plane (typed classes generated from Envoy's own protos): same
package and name, and for every field we declare the same number, type,
cardinality; for enums the same value numbers.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from ext_proc._gen.envoy.config.core.v3 import address_pb2, base_pb2
from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2
from ext_proc._gen.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2
from ext_proc._gen.envoy.type.v3 import http_status_pb2

OUR_FILES = [address_pb2, base_pb2, processing_mode_pb2, external_processor_pb2, http_status_pb2,
             accesslog_pb2, als_pb2]

_TYPE_NAMES = {
    FieldDescriptor.TYPE_MESSAGE: "message", FieldDescriptor.TYPE_ENUM: "enum",
    FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64", FieldDescriptor.TYPE_DOUBLE: "double",
}


def _messages(desc: Descriptor) -> Iterator[Descriptor]:
    if desc.GetOptions().map_entry:
        return
    yield desc
    for nested in desc.nested_types:
        yield from _messages(nested)


def _all_messages() -> list[Descriptor]:
    return [m for f in OUR_FILES for top in f.DESCRIPTOR.message_types_by_name.values()
            for m in _messages(top)]


def _all_enums() -> list[EnumDescriptor]:
    enums: list[EnumDescriptor] = []
    for f in OUR_FILES:
        enums.extend(f.DESCRIPTOR.enum_types_by_name.values())
        for message in _all_messages():
            if message.file is f.DESCRIPTOR:
                enums.extend(message.enum_types)
    return enums


def _upstream(full_name: str, package: str) -> type:
    module = importlib.import_module(f"envoy_data_plane.{package}")
    local = full_name[len(package) + 1:].replace(".", "")
    # betterproto camel-cases acronyms (HTTPAccessLogEntry -> HttpAccessLogEntry)
    by_lower = {name.lower(): name for name in dir(module)}
    return getattr(module, by_lower.get(local.lower(), local))  # type: ignore[no-any-return]


def _kind(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return "map"
    return _TYPE_NAMES[field.type]


@pytest.mark.parametrize("desc", _all_messages(), ids=lambda d: d.full_name)
def test_message_fields_match_upstream(desc: Descriptor) -> None:
    upstream = _upstream(desc.full_name, desc.file.package)
    meta = {f.name: f.metadata["betterproto"] for f in dataclasses.fields(upstream)
            if "betterproto" in f.metadata}
    assert desc.fields or not meta, desc.full_name  # empty only where upstream is empty
    for field in desc.fields:
        assert field.name in meta, f"{desc.full_name}.{field.name} not upstream"
        up = meta[field.name]
        assert field.number == up.number, f"{desc.full_name}.{field.name} number"
        assert _kind(field) == up.proto_type, f"{desc.full_name}.{field.name} type"
        is_repeated = field.is_repeated and _kind(field) != "map"
        assert is_repeated == bool(up.repeated), f"{desc.full_name}.{field.name} cardinality"
        oneof = field.containing_oneof.name if field.containing_oneof else None
        assert oneof == up.group, f"{desc.full_name}.{field.name} oneof"


@pytest.mark.parametrize("desc", _all_enums(), ids=lambda d: d.full_name)
def test_enum_values_match_upstream(desc: EnumDescriptor) -> None:
    upstream = _upstream(desc.full_name, desc.file.package)
    for value in desc.values:
        assert upstream[value.name].value == value.number, f"{desc.full_name}.{value.name}"


def test_service_name_is_envoys() -> None:
    service = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    method = service.methods_by_name["Process"]
    assert method.client_streaming and method.server_streaming
