"""Reading Envoy's attributes out of ``ProcessingRequest.attributes``.

Envoy sends a ``map<string, Struct>`` keyed by the filter name with flat dotted
attribute names inside, once per direction, on the first message of that
direction. Numbers arrive as doubles, durations and timestamps as strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from google.protobuf import struct_pb2

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# Envoy's StreamInfo core response flags, bit i -> short name (measured: 256 NR,
# 32 UF, 4 UT, 1024 FI on Envoy 1.40).
RESPONSE_FLAG_NAMES: Final = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX",
    "RLSE", "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC",
    "OM", "DF", "DO", "DR", "UDO",
)


# error.type for a failed request whose response flags say why (Envoy's long names).
FLAG_ERROR_TYPES: Final = {
    "UH": "no_healthy_upstream", "UT": "upstream_request_timeout", "LR": "local_reset",
    "UR": "upstream_remote_reset", "UF": "upstream_connection_failure",
    "UC": "upstream_connection_termination", "UO": "upstream_overflow",
    "NR": "no_route_found", "FI": "fault_injected", "RL": "rate_limited",
    "UAEX": "unauthorized_external_service", "RLSE": "rate_limit_service_error",
    "DC": "downstream_connection_termination", "URX": "upstream_retry_limit_exceeded",
    "SI": "stream_idle_timeout", "IH": "invalid_envoy_request_headers",
    "DPE": "downstream_protocol_error", "UMSDR": "upstream_max_stream_duration_reached",
    "NFCF": "no_filter_config_found", "DT": "duration_timeout",
    "UPE": "upstream_protocol_error", "NC": "no_cluster_found", "OM": "overload_manager",
    "DF": "dns_resolution_failed", "DO": "drop_overload", "DR": "downstream_remote_reset",
}


class EnvoyAttributes:
    """Typed access to one direction's attribute Struct; missing -> None."""

    __slots__ = ("_fields",)

    EMPTY: EnvoyAttributes

    def __init__(self, struct: struct_pb2.Struct | None) -> None:
        self._fields = struct.fields if struct is not None else {}

    @classmethod
    def of(cls, request_attributes: object, namespace: str) -> EnvoyAttributes:
        attrs = request_attributes  # map<string, Struct>
        if namespace in attrs:  # type: ignore[operator]
            return cls(attrs[namespace])  # type: ignore[index]
        return cls.EMPTY

    def __bool__(self) -> bool:
        return bool(self._fields)

    def string(self, name: str) -> str | None:
        value = self._fields.get(name)
        if value is None:
            return None
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return value.string_value
        if kind == "number_value":
            number = value.number_value
            return str(int(number)) if number.is_integer() else str(number)
        if kind == "bool_value":
            return "true" if value.bool_value else "false"
        return None

    def number(self, name: str) -> float | None:
        value = self._fields.get(name)
        if value is None:
            return None
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return value.number_value
        if kind == "string_value":
            try:
                return float(value.string_value)
            except ValueError:
                return None
        return None

    def integer(self, name: str) -> int | None:
        number = self.number(name)
        return int(number) if number is not None and number.is_integer() else None

    def boolean(self, name: str) -> bool | None:
        value = self._fields.get(name)
        if value is None or value.WhichOneof("kind") != "bool_value":
            return None
        return value.bool_value

    def time_ns(self, name: str) -> int | None:
        text = self.string(name)
        return parse_time_ns(text) if text else None


EnvoyAttributes.EMPTY = EnvoyAttributes(None)


def parse_time_ns(text: str) -> int | None:
    """Envoy's ``request.time`` (RFC 3339, e.g. ``2026-11-26T17:06:31.94562+00:00``) -> ns."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def response_flag_names(flags: int) -> list[str]:
    """Decode Envoy's response-flags bitmask into its short names, lowest bit first."""
    return [name for bit, name in enumerate(RESPONSE_FLAG_NAMES) if flags >> bit & 1]
