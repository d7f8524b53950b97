"""The ALS servicer: Envoy's HTTP access log entries become `FinalFacts`."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy_data_plane.envoy.config.core import v3 as up_core
from envoy_data_plane.envoy.data.accesslog import v3 as up_log
from envoy_data_plane.envoy.service.accesslog import v3 as up_als

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2 as pb
from ext_proc.exchange.als import (
    RESPONSE_FLAG_CODES,
    SERVICE_NAME,
    AccessLogService,
    FinalFacts,
    final_facts,
    response_flag_codes,
)
from ext_proc.exchange.timings import Timings

METHOD = f"/{SERVICE_NAME}/StreamAccessLogs"


def _entry(request_id: str = "rid-1", *, code: int | None = 200,
           flags: dict[str, bool] | None = None, log_type: int = log_pb.DownstreamEnd,
           intermediate: bool = False,
           details: str = "via_upstream", body: int = 5) -> log_pb.HTTPAccessLogEntry:
    entry = log_pb.HTTPAccessLogEntry()
    entry.request.request_id = request_id
    common = entry.common_properties
    common.access_log_type = log_type  # type: ignore[assignment]
    common.intermediate_log_entry = intermediate
    for name, value in (flags or {}).items():
        setattr(common.response_flags, name, value)
    if code is not None:
        entry.response.response_code.value = code
    entry.response.response_code_details = details
    entry.response.response_body_bytes = body
    return entry


def _message(*entries: log_pb.HTTPAccessLogEntry) -> pb.StreamAccessLogsMessage:
    message = pb.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    return message


def test_every_upstream_flag_has_a_short_code() -> None:
    declared = {f.name for f in log_pb.ResponseFlags.DESCRIPTOR.fields}
    upstream = {f.name for f in __import__("dataclasses").fields(up_log.ResponseFlags)}
    assert declared == upstream
    assert set(RESPONSE_FLAG_CODES) == declared
    assert len(set(RESPONSE_FLAG_CODES.values())) == len(RESPONSE_FLAG_CODES)


def test_all_flags_map_in_field_order() -> None:
    flags = log_pb.ResponseFlags()
    for field in flags.DESCRIPTOR.fields:
        if field.name != "unauthorized_details":
            setattr(flags, field.name, True)
    flags.unauthorized_details.reason = log_pb.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    codes = response_flag_codes(flags)
    assert codes[:6] == ("LH", "UH", "UT", "LR", "UR", "UF")
    assert "UAEX" in codes and "DF" in codes and codes[-1] == "DR"
    assert len(codes) == len(RESPONSE_FLAG_CODES)


def test_final_facts_of_a_connect_failure() -> None:
    facts = final_facts(_entry(code=503, details="upstream_reset_before_response_started",
                               flags={"upstream_connection_failure": True,
                                      "upstream_retry_limit_exceeded": True}, body=91))
    assert facts == FinalFacts("rid-1", 503, ("UF", "URX"),
                               "upstream_reset_before_response_started", 91)


def test_no_response_code_and_empty_details_are_none() -> None:
    facts = final_facts(_entry(code=None, details="", flags={"downstream_remote_reset": True}))
    assert facts is not None
    assert facts.response_code is None and facts.response_code_details is None
    assert facts.response_flags == ("DR",)
    zero = final_facts(_entry(code=0))
    assert zero is not None and zero.response_code is None


def test_entry_without_response_has_no_body_count() -> None:
    entry = log_pb.HTTPAccessLogEntry()
    entry.request.request_id = "r"
    facts = final_facts(entry)  # access_log_type NotSet: older Envoys, still final
    assert facts == FinalFacts("r", None, (), None, None)


@pytest.mark.parametrize("entry", [
    _entry(request_id=""),
    _entry(intermediate=True),
    _entry(log_type=log_pb.UpstreamEnd),
    _entry(log_type=log_pb.DownstreamPeriodic),
    _entry(log_type=log_pb.DownstreamStart),
], ids=["no-id", "intermediate", "upstream", "periodic", "start"])
def test_entries_that_are_not_final_are_ignored(entry: log_pb.HTTPAccessLogEntry) -> None:
    assert final_facts(entry) is None


def test_handle_counts_and_survives_a_failing_handler() -> None:
    seen: list[str] = []

    def on_entry(facts: FinalFacts) -> None:
        if facts.request_id == "boom":
            raise RuntimeError("handler bug")
        seen.append(facts.request_id)

    service = AccessLogService(on_entry)
    service.handle(_message(_entry("a"), _entry("boom"), _entry(""), _entry("b")))
    service.handle(pb.StreamAccessLogsMessage())  # no entries at all
    assert seen == ["a", "b"]
    assert (service.entries, service.ignored) == (3, 1)


START = datetime.datetime(2026, 11, 26, 17, 6, 31, 250_000, tzinfo=datetime.UTC)


def _upstream_message(request_id: str) -> bytes:
    """A message built from Envoy's full API, with fields our subset does not declare."""
    return bytes(up_als.StreamAccessLogsMessage(
        identifier=up_als.StreamAccessLogsMessageIdentifier(
            node=up_core.Node(id="envoy-1", cluster="edge"), log_name="extproc_otel"),
        http_logs=up_als.StreamAccessLogsMessageHttpAccessLogEntries(log_entry=[
            up_log.HttpAccessLogEntry(
                common_properties=up_log.AccessLogCommon(
                    sample_rate=1.0, upstream_cluster="users", route_name="echo",
                    start_time=START,
                    time_to_first_upstream_tx_byte=datetime.timedelta(milliseconds=2),
                    time_to_first_upstream_rx_byte=datetime.timedelta(milliseconds=50),
                    time_to_first_downstream_tx_byte=datetime.timedelta(milliseconds=51),
                    response_flags=up_log.ResponseFlags(upstream_remote_reset=True),
                    access_log_type=up_log.AccessLogType.DownstreamEnd,
                    upstream_remote_address=up_core.Address(socket_address=up_core.SocketAddress(
                        address="10.0.0.7", port_value=8080)),
                    upstream_transport_failure_reason="delayed connect error: 111",
                    custom_tags={"k": "v"}),
                protocol_version=up_log.HttpAccessLogEntryHttpVersion.HTTP11,
                request=up_log.HttpRequestProperties(
                    request_id=request_id, path="/x", authority="a", port=80,
                    request_headers={"x-a": "b"}),
                response=up_log.HttpResponseProperties(
                    response_code=200, response_body_bytes=3, response_headers={"h": "v"},
                    response_code_details="upstream_reset_after_response_started{remote_reset}"),
            )]),
    ))


def _tcp_message() -> bytes:
    return bytes(up_als.StreamAccessLogsMessage(
        tcp_logs=up_als.StreamAccessLogsMessageTcpAccessLogEntries(
            log_entry=[up_log.TcpAccessLogEntry(common_properties=up_log.AccessLogCommon(
                upstream_cluster="tcp"))])))


async def test_stream_over_grpc_with_envoys_full_messages() -> None:
    got: list[FinalFacts] = []
    arrived = asyncio.Event()

    def on_entry(facts: FinalFacts) -> None:
        got.append(facts)
        if len(got) == 2:
            arrived.set()

    service = AccessLogService(on_entry)
    server = grpc.aio.server()
    service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(METHOD, request_serializer=lambda raw: raw,
                                        response_deserializer=pb.StreamAccessLogsResponse.FromString)

            async def messages() -> AsyncIterator[bytes]:
                yield _upstream_message("first")
                yield _tcp_message()
                yield b"\x12\x02\x0a\x00"  # http_logs with one empty entry
                yield _upstream_message("second")
                await asyncio.wait_for(arrived.wait(), 10)

            reply = await call(messages(), timeout=10)
        assert isinstance(reply, pb.StreamAccessLogsResponse)
    finally:
        await server.stop(None)
    assert [f.request_id for f in got] == ["first", "second"]
    assert got[0] == FinalFacts("first", 200, ("UR",),
                                "upstream_reset_after_response_started{remote_reset}", 3,
                                upstream_address="10.0.0.7:8080",
                                upstream_failure="delayed connect error: 111",
                                route_name="echo",
                                timings=Timings(int(START.timestamp()) * 10**9 + 250_000_000,
                                                2_000_000, 50_000_000, None, 51_000_000, None))
    assert got[0].timings is not None and got[0].timings.upstream_s is None  # reset: unknown
    assert (service.streams, service.entries, service.ignored) == (0, 2, 1)
