"""Our own code's cost per exchange, without gRPC: ``python -m bench.hotpath [N]``.

Drives N exchanges through the sidecar as ``serve`` builds it (default settings,
OTLP/gRPC export to a span counter in a child process), calling what the servicer
calls (``handle``, ``record``, ``close``) with the messages the shipped (lean)
envoy.yaml sends for a plain HTTP request, and Envoy's access log entry for each
(``--full``: with the response headers message too, as envoy-full.yaml sends;
``--phases``: with ``stream.phase_spans`` on and Envoy's timings in each entry).
Reports the process's CPU microseconds per exchange (the export thread included),
and with ``--profile`` the top functions. ``make bench`` measures the whole; this
isolates our part of it.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import time
import uuid

from google.protobuf import duration_pb2
from loguru import logger

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc.app import build_sidecar
from ext_proc.config import Settings, load_settings
from ext_proc.exchange.session import StreamSession
from ext_proc.telemetry.logs import configure_logging, sink_added

NS = "envoy.filters.http.ext_proc"
_RECEIVER = ("from bench.receiver import SpanCounter; import sys, time; r = SpanCounter(); "
             "print(r.start(), flush=True); sys.stdin.read(); print(r.spans, flush=True)")


def _request(request_id: str) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    for key, value in ((":method", "GET"), (":path", "/bench?q=1"), (":scheme", "http"),
                       (":authority", "127.0.0.1:10000"), ("user-agent", "wrk"),
                       ("accept", "*/*"), ("x-forwarded-proto", "http"),
                       ("x-request-id", request_id),
                       ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")):
        req.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    attrs = req.attributes[NS].fields
    attrs["request.time"].string_value = "2026-11-26T20:00:00.000000Z"
    attrs["request.id"].string_value = request_id
    attrs["request.protocol"].string_value = "HTTP/1.1"
    attrs["source.address"].string_value = "127.0.0.1:40000"
    attrs["source.port"].number_value = 40000
    attrs["destination.address"].string_value = "127.0.0.1:10000"
    attrs["xds.route_name"].string_value = "bench"
    attrs["xds.cluster_name"].string_value = "users"
    return req


def _response() -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    for key, value in ((":status", "200"), ("content-length", "3"),
                       ("content-type", "text/plain")):
        req.response_headers.headers.headers.add(key=key, raw_value=value.encode())
    attrs = req.attributes[NS].fields
    attrs["response.code"].number_value = 200
    attrs["response.code_details"].string_value = "via_upstream"
    attrs["upstream.address"].string_value = "127.0.0.1:10001"
    return req


# Envoy's timings of a 900 us request (offsets from its start, ns), as it logs them
_TIMINGS = (("time_to_last_rx_byte", 10_000), ("time_to_first_upstream_tx_byte", 150_000),
            ("time_to_last_upstream_tx_byte", 160_000),
            ("time_to_first_upstream_rx_byte", 700_000),
            ("time_to_last_upstream_rx_byte", 750_000),
            ("time_to_first_downstream_tx_byte", 800_000),
            ("time_to_last_downstream_tx_byte", 900_000))


def _log(request_ids: list[str]) -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage()
    start = time.time_ns()
    for request_id in request_ids:
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = request_id
        entry.response.response_code.value = 200
        entry.response.response_body_bytes = 3
        common = entry.common_properties
        common.duration.CopyFrom(duration_pb2.Duration(nanos=900_000))
        common.access_log_type = log_pb.DownstreamEnd
        common.start_time.FromNanoseconds(start)
        for name, offset in _TIMINGS:
            getattr(common, name).FromNanoseconds(offset)
        common.upstream_remote_address.socket_address.address = "127.0.0.1"
        common.upstream_remote_address.socket_address.port_value = 10001
    return message


def drive(n: int, profile: bool, full: bool, phases: bool = False) -> tuple[float, float]:
    settings = load_settings(server={"listen": "127.0.0.1:0"},
                             stream={"phase_spans": phases})
    with open(os.devnull, "w") as devnull:
        configure_logging(settings.log, devnull)  # JSON lines, as serve writes them
        try:
            return asyncio.run(_drive(settings, n, profile, full))
        finally:
            logger.remove()
            sink_added()  # no direct sink left behind


async def _drive(settings: Settings, n: int, profile: bool,
                 full: bool) -> tuple[float, float]:
    sidecar = build_sidecar(settings)
    processor, join = sidecar.processor, sidecar.join
    assert join is not None
    join.service.connected = True  # as once Envoy's access log stream is open
    deps, options = processor._deps, processor._route_options.get(())
    ids = [str(uuid.uuid4()) for _ in range(n)]
    requests = [_request(i) for i in ids]
    response = _response()
    logs = [_log(ids[i:i + 50]) for i in range(0, n, 50)]
    profiler = cProfile.Profile() if profile else None
    cpu, main_cpu = time.process_time(), time.thread_time()
    if profiler:
        profiler.enable()
    for start in range(0, n, 50):
        for request in requests[start:start + 50]:
            session = StreamSession(deps, options)
            session.handle(request)
            session.record()
            if full:
                session.handle(response)
                session.record()
            session.close()
        join.service.handle(logs[start // 50])
        await asyncio.sleep(0)
    main_cpu = time.thread_time() - main_cpu
    sidecar.telemetry.shutdown()  # flushes every span
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime"))
        stats.print_stats(25)
        if os.environ.get("CALLEES"):
            stats.print_callees(os.environ["CALLEES"])
    return (time.process_time() - cpu) / n * 1e6, main_cpu / n * 1e6


def measure(n: int, profile: bool = False, full: bool = False,
            phases: bool = False) -> tuple[float, float, int]:
    """(CPU µs per exchange, of which on the loop's thread, spans the receiver got)."""
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdin is not None
    port = receiver.stdout.readline().strip()
    saved = dict(os.environ)
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                       "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_METRICS_EXPORTER": "none"})
    try:
        us, main_us = drive(n, profile, full, phases)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        receiver.stdin.close()
        spans = receiver.stdout.readline().strip()
        receiver.stdout.close()
        receiver.wait(10)
    return us, main_us, int(spans)


def main(argv: list[str]) -> None:
    n = int(next((a for a in argv if a.isdigit()), "20000"))
    us, main_us, spans = measure(n, "--profile" in argv, "--full" in argv, "--phases" in argv)
    print(f"{us:.1f} µs CPU per exchange ({main_us:.1f} on the event loop's thread, the "
          f"rest in export threads) over {n} exchanges; spans received {spans}")


if __name__ == "__main__":
    main(sys.argv[1:])
