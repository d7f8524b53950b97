"""How an exchange ended: final span attributes, status and error.type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.trace import Status, StatusCode

from ext_proc import semconv as sc
from ext_proc.envoy_attrs import EnvoyAttributes, response_flag_names

_UNSET: Final = Status(StatusCode.UNSET)

# gRPC status codes by number (grpc/doc/statuscodes.md).
GRPC_CODE_NAMES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
# Codes the RPC conventions count as errors on a SERVER span.
GRPC_SERVER_ERRORS: Final = frozenset({2, 4, 12, 13, 14, 15})

_RESPONSE_STRINGS: Final = (
    (sc.ENVOY_RESPONSE_CODE_DETAILS, sc.EnvoyAttr.RESPONSE_CODE_DETAILS),
    (sc.ENVOY_UPSTREAM_ADDRESS, sc.EnvoyAttr.UPSTREAM_ADDRESS),
    (sc.ENVOY_UPSTREAM_FAILURE, sc.EnvoyAttr.UPSTREAM_FAILURE),
)


@dataclass(slots=True)
class Outcome:
    attributes: dict[str, Any] = field(default_factory=dict)
    status: Status = _UNSET
    error_type: str | None = None


def grpc_code(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 3 else None


def aborted() -> Outcome:
    return Outcome({sc.ERROR_TYPE: sc.ERROR_CLIENT_ABORTED},
                   Status(StatusCode.ERROR, "stream ended before the response"),
                   sc.ERROR_CLIENT_ABORTED)


def outcome(http_status: int, grpc_status: str | None, is_grpc: bool,
            envoy: EnvoyAttributes | None) -> Outcome:
    """Attributes and status for a response with `http_status` (0 when unknown)."""
    result = Outcome()
    attrs = result.attributes
    if http_status:
        attrs[sc.HTTP_RESPONSE_STATUS_CODE] = http_status
    if envoy:
        flags = envoy.integer(sc.EnvoyAttr.RESPONSE_FLAGS)
        if flags:
            attrs[sc.ENVOY_RESPONSE_FLAGS] = response_flag_names(flags)
        for key, name in _RESPONSE_STRINGS:
            value = envoy.string(name)
            if value:
                attrs[key] = value
        attempts = envoy.integer(sc.EnvoyAttr.UPSTREAM_ATTEMPTS)
        if attempts is not None:
            attrs[sc.ENVOY_UPSTREAM_ATTEMPTS] = attempts
    code = grpc_code(grpc_status) if is_grpc else None
    if code is not None:
        attrs[sc.RPC_GRPC_STATUS_CODE] = code
        if code in GRPC_SERVER_ERRORS:
            name = GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else str(code)
            result.error_type = name
            result.status = Status(StatusCode.ERROR, name)
    if result.error_type is None and http_status >= 500:
        result.error_type = str(http_status)
        result.status = Status(StatusCode.ERROR)
    if result.error_type is not None:
        attrs[sc.ERROR_TYPE] = result.error_type
    return result
