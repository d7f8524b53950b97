"""Envoy's gRPC access log (ALS) as a source of final facts about an exchange.

The ext_proc stream ends the same way whether the response completed or was cut
short after its headers (upstream reset, client gone): see ENVOY-NOTES. Envoy's
own access log knows the difference. With ``envoy.access_loggers.http_grpc``
Envoy streams its HTTP access log entries to
``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs``; this servicer
turns each final entry into a `FinalFacts` keyed by the request id
(``x-request-id``, the same id ext_proc reports as ``request.id``) and hands it
to ``on_entry``. Entries are buffered by Envoy and arrive in batches on one
long-lived stream per Envoy worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import grpc
from loguru import logger

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2 as pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2_grpc as pb_grpc
from ext_proc.exchange.timings import Timings, timings
from ext_proc.exchange.tls_facts import TlsFacts, tls_facts

if TYPE_CHECKING:
    from ext_proc import h2grpc

SERVICE_NAME: Final = "envoy.service.accesslog.v3.AccessLogService"

# ResponseFlags field -> Envoy's short code (as printed by %RESPONSE_FLAGS%).
RESPONSE_FLAG_CODES: Final[dict[str, str]] = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",  # a message, present when ext_authz denied
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}


GRPC_STATUS: Final = "grpc-status"


@dataclass(slots=True)  # not frozen: ~1 µs less to build, per request
class FinalFacts:
    """What Envoy's access log says about how one exchange ended."""

    request_id: str
    response_code: int | None  # None: no response was sent downstream
    response_flags: tuple[str, ...]  # short codes in field order, e.g. ("UF", "URX")
    response_code_details: str | None  # e.g. "upstream_reset_after_response_started{...}"
    body_bytes_sent: int | None  # response body bytes sent downstream
    duration_ns: int | None = None  # start to last byte sent downstream (%DURATION%)
    grpc_status: str | None = None  # logged via additional_response_{headers,trailers}_to_log
    upstream_attempts: int | None = None
    upstream_address: str | None = None  # host:port Envoy sent the request to
    upstream_failure: str | None = None  # upstream transport failure reason
    route_name: str | None = None  # Envoy's route name (xds.route_name)
    tls: TlsFacts | None = None  # the downstream connection's TLS; None for plaintext
    timings: Timings | None = None  # when each byte went and came (phase spans)


def response_flag_codes(flags: log_pb.ResponseFlags) -> tuple[str, ...]:
    """The short codes of the flags that are set (ListFields returns only set ones)."""
    return tuple(RESPONSE_FLAG_CODES[field.name] for field, value in flags.ListFields()
                 if value and field.name in RESPONSE_FLAG_CODES)


def _is_final(common: log_pb.AccessLogCommon) -> bool:
    """Periodic, start and upstream entries do not describe the end of the exchange."""
    if common.intermediate_log_entry:
        return False
    return common.access_log_type in AccessLogService.FINAL_TYPES


def response_of(entry: log_pb.HTTPAccessLogEntry
                ) -> tuple[int | None, int | None, str | None, str | None]:
    """(status, body bytes sent, code details, grpc-status) of an entry; all None when
    no response was sent downstream."""
    if not entry.HasField("response"):
        return None, None, None, None
    response = entry.response
    code = response.response_code.value if response.HasField("response_code") else 0
    grpc_status = (response.response_trailers.get(GRPC_STATUS)
                   or response.response_headers.get(GRPC_STATUS) or None)
    return (code or None, response.response_body_bytes,
            response.response_code_details or None, grpc_status)


def final_facts(entry: log_pb.HTTPAccessLogEntry) -> FinalFacts | None:
    """The facts of one final HTTP entry; None for entries we cannot join or use."""
    request_id = entry.request.request_id
    if not request_id or not _is_final(entry.common_properties):
        return None
    code, body, details, grpc_status = response_of(entry)
    common = entry.common_properties
    elapsed = (common.time_to_last_downstream_tx_byte
               if common.HasField("time_to_last_downstream_tx_byte") else
               common.duration if common.HasField("duration") else None)
    return FinalFacts(
        request_id=request_id,
        response_code=code,
        response_flags=response_flag_codes(common.response_flags),
        response_code_details=details,
        body_bytes_sent=body,
        duration_ns=elapsed.ToNanoseconds() if elapsed is not None else None,
        grpc_status=grpc_status,
        upstream_attempts=common.upstream_request_attempt_count or None,
        upstream_address=_socket_address(common),
        upstream_failure=common.upstream_transport_failure_reason or None,
        route_name=common.route_name or None,
        tls=tls_facts(common),
        timings=timings(common),
    )


def _socket_address(common: log_pb.AccessLogCommon) -> str | None:
    if not common.HasField("upstream_remote_address"):
        return None
    remote = common.upstream_remote_address
    if not remote.HasField("socket_address"):
        return None
    socket = remote.socket_address
    return f"{socket.address}:{socket.port_value}" if socket.address else None


class AccessLogService(pb_grpc.AccessLogServiceServicer):
    """Consumes Envoy's ALS streams and reports each final HTTP entry to ``on_entry``.

    ``on_entry`` runs on the event loop for every entry: keep it cheap. Its
    exceptions are logged and never end the stream (Envoy would drop the logs
    buffered meanwhile and reconnect).
    """

    FINAL_TYPES: Final = frozenset({log_pb.NotSet, log_pb.DownstreamEnd})

    def __init__(self, on_entry: Callable[[FinalFacts], None], *,
                 on_unasked: Callable[[list[log_pb.HTTPAccessLogEntry]], None] | None = None,
                 namespace: str = "extproc_otel",
                 awaited: Callable[[str], bool] | None = None) -> None:
        self._on_entry = on_entry
        # Final entries without our dynamic metadata `namespace` (the sidecar was not
        # asked, see exchange/unasked.py) whose request id no exchange is `awaited` for
        # go to `on_unasked` instead, the entries of one message together.
        self._on_unasked = on_unasked
        self._namespace = namespace
        self._awaited = awaited
        self.entries = 0  # final HTTP entries handed to on_entry
        self.unasked = 0  # final HTTP entries handed to on_unasked
        self.ignored = 0  # entries without a request id, or not final
        # entries of exchanges we were asked about whose answer Envoy did not take (no
        # metadata of ours: message_timeout): Envoy is timing out on the sidecar
        self.answers_dropped = 0
        self.streams = 0  # open ALS streams (one per Envoy worker and log config)
        self.connected = False  # an ALS stream has been seen: Envoy sends us its log

    def register(self, server: grpc.aio.Server | h2grpc.Server) -> None:
        """Serve this servicer on `server` (before it starts)."""
        pb_grpc.add_AccessLogServiceServicer_to_server(self, server)

    def handle(self, message: pb.StreamAccessLogsMessage) -> None:
        """Deliver the facts of every final HTTP entry in one message. Never raises."""
        if message.WhichOneof("log_entries") != "http_logs":
            return
        unasked: list[log_pb.HTTPAccessLogEntry] = []
        for entry in message.http_logs.log_entry:
            if self._on_unasked is not None and self.is_unasked(entry):
                unasked.append(entry)
                continue
            try:
                facts = final_facts(entry)
            except Exception:  # a malformed entry must not cost the rest of the batch
                logger.opt(exception=True).warning("access log entry unreadable")
                facts = None
            if facts is None:
                self.ignored += 1
                continue
            self.entries += 1
            try:
                self._on_entry(facts)
            except Exception:
                logger.opt(exception=True).error("access log entry handler failed",
                                                 request_id=facts.request_id)
        if unasked and self._on_unasked is not None:
            self.unasked += len(unasked)
            try:
                self._on_unasked(unasked)
            except Exception:
                logger.opt(exception=True).error("unasked entries handler failed")

    def is_unasked(self, entry: log_pb.HTTPAccessLogEntry) -> bool:
        """A final entry of a request the sidecar was not asked about: no dynamic metadata
        in our namespace (set by every answer to request headers), and no exchange waits
        for its request id (one whose answer Envoy dropped: message_timeout)."""
        common = entry.common_properties
        if self._namespace in common.metadata.filter_metadata or not _is_final(common):
            return False
        request_id = entry.request.request_id
        if request_id and self._awaited is not None and self._awaited(request_id):
            self.answers_dropped += 1
            return False
        return True

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[pb.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[pb.StreamAccessLogsMessage,
                                          pb.StreamAccessLogsResponse],
    ) -> pb.StreamAccessLogsResponse:
        self.streams += 1
        self.connected = True
        log_name: str | None = None
        try:
            async for message in request_iterator:
                if log_name is None and message.HasField("identifier"):
                    log_name = message.identifier.log_name
                    logger.debug("access log stream opened", log_name=log_name)
                self.handle(message)
        finally:
            self.streams -= 1
            logger.debug("access log stream closed", log_name=log_name)
        return pb.StreamAccessLogsResponse()
