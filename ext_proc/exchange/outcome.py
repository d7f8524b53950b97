"""How an exchange ended: final span attributes, status and error.type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.trace import Span, Status, StatusCode

from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.tls_facts import tls_attributes
from ext_proc.policy.redaction import Redactor
from ext_proc.request.envoy_attrs import FLAG_ERROR_TYPES, EnvoyAttributes, response_flag_names
from ext_proc.telemetry import semconv as sc

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


def interrupted(result: Outcome) -> Outcome:
    """The response started but its stream was reset (upstream reset, or the client
    went away mid-response): an error whatever the status code said."""
    result.error_type = result.attributes[sc.ERROR_TYPE] = sc.ERROR_RESPONSE_INCOMPLETE
    result.status = Status(StatusCode.ERROR, "stream reset after the response started")
    return result


# Flags in Envoy's final access-log entry that mean the exchange was cut short after
# the response had started (when the status we saw did not already say failure).
RESET_FLAGS: Final = frozenset({"UR", "UC", "LR", "DC", "DR", "UPE", "SI", "DT", "UMSDR", "DPE"})


def merge_final_facts(result: Outcome, final: FinalFacts,
                      redactor: Redactor | None = None) -> None:
    """Add what only Envoy's access-log entry knows: body size, late flags, attempts, TLS."""
    attrs = result.attributes
    if final.tls is not None:
        attrs.update(tls_attributes(final.tls, redactor))
    if final.body_bytes_sent is not None:
        attrs[sc.HTTP_RESPONSE_BODY_SIZE] = final.body_bytes_sent
    if final.response_flags:
        known = attrs.get(sc.ENVOY_RESPONSE_FLAGS) or []
        attrs[sc.ENVOY_RESPONSE_FLAGS] = list(dict.fromkeys([*known, *final.response_flags]))
    if final.upstream_attempts is not None:
        attrs.setdefault(sc.ENVOY_UPSTREAM_ATTEMPTS, final.upstream_attempts)
    # what the response phase's attributes say, when Envoy skipped that phase (lean)
    for key, value in ((sc.ENVOY_RESPONSE_CODE_DETAILS, final.response_code_details),
                       (sc.ENVOY_UPSTREAM_ADDRESS, final.upstream_address),
                       (sc.ENVOY_UPSTREAM_FAILURE, final.upstream_failure)):
        if value:
            attrs.setdefault(key, value)


def with_final_facts(result: Outcome, status: int, final: FinalFacts,
                     redactor: Redactor | None = None) -> Outcome:
    """Refine `result` with Envoy's own record of how the exchange ended."""
    merge_final_facts(result, final, redactor)
    flags = final.response_flags
    if result.error_type == str(status):  # a bare 5xx: the flags may say why
        cause = next((FLAG_ERROR_TYPES[f] for f in flags if f in FLAG_ERROR_TYPES), None)
        if cause is not None:
            result.error_type = result.attributes[sc.ERROR_TYPE] = cause
    if status < 500 and result.error_type is None and RESET_FLAGS.intersection(flags):
        result = interrupted(result)
    return result


def outcome(http_status: int, grpc_status: str | None, is_grpc: bool,
            envoy: EnvoyAttributes | None) -> Outcome:
    """Attributes and status for a response with `http_status` (0 when unknown)."""
    result = Outcome()
    attrs = result.attributes
    if http_status:
        attrs[sc.HTTP_RESPONSE_STATUS_CODE] = http_status
    cause: str | None = None
    if envoy:
        flags = envoy.integer(sc.EnvoyAttr.RESPONSE_FLAGS)
        if flags:
            names = attrs[sc.ENVOY_RESPONSE_FLAGS] = response_flag_names(flags)
            cause = next((FLAG_ERROR_TYPES[n] for n in names if n in FLAG_ERROR_TYPES), None)
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
        result.error_type = cause or str(http_status)
        result.status = Status(StatusCode.ERROR)
    if result.error_type is not None:
        attrs[sc.ERROR_TYPE] = result.error_type
    return result


def upstream_attributes(envoy: EnvoyAttributes) -> dict[str, Any]:
    """The upstream CLIENT span's view: the peer Envoy picked and the attempts it made."""
    attrs: dict[str, Any] = {}
    address = envoy.string(sc.EnvoyAttr.UPSTREAM_ADDRESS)
    if address:
        host, _, port = address.rpartition(":")
        attrs[sc.SERVER_ADDRESS] = host.strip("[]") or address
        if port.isdigit():
            attrs[sc.SERVER_PORT] = int(port)
        attrs[sc.ENVOY_UPSTREAM_ADDRESS] = address
    attempts = envoy.integer(sc.EnvoyAttr.UPSTREAM_ATTEMPTS)
    if attempts is not None:
        attrs[sc.ENVOY_UPSTREAM_ATTEMPTS] = attempts
        if attempts > 1:
            attrs[sc.HTTP_REQUEST_RESEND_COUNT] = attempts - 1
    return attrs


def client_outcome(http_status: int | None, grpc_status: str | None, is_grpc: bool,
                   envoy: EnvoyAttributes | None) -> Outcome:
    """The optional upstream CLIENT span's ending."""
    if http_status is None:
        return aborted()
    result = outcome(http_status, grpc_status, is_grpc, None)
    if envoy:
        result.attributes.update(upstream_attributes(envoy))
    return result


def end_client(client: Span, http_status: int | None, grpc_status: str | None, is_grpc: bool,
               envoy: EnvoyAttributes | None) -> None:
    """End the optional upstream CLIENT span with what Envoy said of the upstream."""
    try:
        apply(client, client_outcome(http_status, grpc_status, is_grpc, envoy))
    finally:
        client.end()


def apply(span: Span, result: Outcome) -> None:
    span.set_attributes(result.attributes)
    if result.status.status_code is not StatusCode.UNSET:
        span.set_status(result.status)


def exchange_outcome(status: int | None, grpc_status: str | None, is_grpc: bool,
                     envoy: EnvoyAttributes | None, extra: dict[str, Any],
                     final: FinalFacts | None, reset: bool, *, unknown: bool = False,
                     redactor: Redactor | None = None) -> Outcome:
    """The gateway span's ending. `status` None: no response was seen; `final`: Envoy's
    access-log entry, when joined; `reset`: the stream was reset after the response;
    `unknown`: no response was expected on the stream and no entry came, so nothing
    says how the exchange ended (not an error we could name); `redactor`: for the client
    certificate's keyed hash."""
    if status is None and unknown:
        return Outcome()
    if status is None:
        result = aborted()
        if final is not None:
            merge_final_facts(result, final, redactor)
        return result
    result = outcome(status, grpc_status, is_grpc, envoy)
    result.attributes.update(extra)
    if final is not None:
        return with_final_facts(result, status, final, redactor)
    return interrupted(result) if reset else result
