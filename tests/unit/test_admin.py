"""The admin HTTP endpoint over real loopback sockets, alone and inside the sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from pydantic import ValidationError

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from ext_proc.admin import AdminEndpoints, AdminServer, parse_request
from ext_proc.app import build_sidecar
from ext_proc.config import load_settings
from ext_proc.config.telemetry import AdminSettings
from ext_proc.dev.devstack import free_port
from ext_proc.telemetry.metrics.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE

LOOPBACK = AdminSettings(listen="127.0.0.1:0")


async def fetch(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def get(port: int, path: str, accept: str | None = None,
              method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return await fetch(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


@asynccontextmanager
async def serving(endpoints: AdminEndpoints,
                  settings: AdminSettings = LOOPBACK) -> AsyncIterator[int]:
    server = AdminServer(settings, endpoints)
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop()


def scrape(accept: str | None) -> tuple[str, bytes]:
    om = accept is not None and "openmetrics" in accept
    return (OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE), b"m 1\n"


async def test_health_ready_metrics_config_and_errors() -> None:
    ready = [True]
    endpoints = AdminEndpoints(ready=lambda: ready[0],
                               config=lambda: {"a": {"secret": "**********"}}, scrape=scrape)
    async with serving(endpoints) as port:
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz"))[0] == 200
        ready[0] = False
        assert (await get(port, "/readyz"))[0] == 503
        status, headers, body = await get(port, "/metrics?x=1")
        assert (status, headers["content-type"], body) == (200, TEXT_CONTENT_TYPE, b"m 1\n")
        _, headers, _ = await get(port, "/metrics", "application/openmetrics-text;version=1.0.0")
        assert headers["content-type"] == OPENMETRICS_CONTENT_TYPE
        status, headers, body = await get(port, "/config")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"a": {"secret": "**********"}}
        status, headers, body = await get(port, "/healthz", method="HEAD")
        assert (status, headers["content-length"], body) == (200, "3", b"")
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/healthz", method="POST"))[0] == 405
        assert (await fetch(port, b"garbage\r\n\r\n"))[0] == 400
        huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await fetch(port, huge))[0] == 431


async def test_metrics_and_config_can_be_switched_off() -> None:
    endpoints = AdminEndpoints(ready=lambda: True, config=lambda: {"a": 1}, scrape=scrape)
    settings = AdminSettings(listen="127.0.0.1:0", metrics=False, config=False)
    async with serving(endpoints, settings) as port:
        assert (await get(port, "/metrics"))[0] == 404
        assert (await get(port, "/config"))[0] == 404
    async with serving(AdminEndpoints(ready=lambda: True)) as port:
        assert (await get(port, "/metrics"))[0] == 404


async def test_a_silent_client_does_not_block_others() -> None:
    async with serving(AdminEndpoints(ready=lambda: True)) as port:
        _, idle = await asyncio.open_connection("127.0.0.1", port)
        assert (await get(port, "/healthz"))[0] == 200
        idle.close()


def test_parse_request_rejects_malformed_heads() -> None:
    assert parse_request(b"GET /x?y HTTP/1.1\r\nAccept: a/b\r\n\r\n") is not None
    parsed = parse_request(b"GET /x?y HTTP/1.1\r\nACCEPT: a/b\r\n\r\n")
    assert parsed is not None and (parsed.path, parsed.accept) == ("/x", "a/b")
    assert parse_request(b"GET x HTTP/1.1\r\n\r\n") is None
    assert parse_request(b"GET /x SPDY/3\r\n\r\n") is None


def test_admin_settings_are_loopback_unless_allowed() -> None:
    assert AdminSettings().listen is None
    with pytest.raises(ValidationError, match="not loopback"):
        AdminSettings(listen=f"0.0.0.0:{free_port()}")
    assert AdminSettings(listen=f"0.0.0.0:{free_port()}", allow_non_loopback=True).listen
    with pytest.raises(ValidationError):
        AdminSettings(listen="nope")
    with pytest.raises(ValueError, match=r"admin\.listen"):
        AdminServer(AdminSettings(), AdminEndpoints(ready=lambda: True))


async def test_sidecar_is_not_ready_while_shutting_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    settings = load_settings(server={"listen": "127.0.0.1:0", "grace_s": 5},
                             admin={"listen": "127.0.0.1:0"})
    sidecar = build_sidecar(settings)
    port = await sidecar.start()
    admin = sidecar.admin_port
    assert admin
    assert (await get(admin, "/readyz"))[0] == 200
    status, _, body = await get(admin, "/config")
    assert status == 200 and json.loads(body)["admin"]["listen"] == "127.0.0.1:0"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    await call.read()  # the stream is open and answered; keep it in flight
    stopping = asyncio.create_task(sidecar.stop())
    await asyncio.wait_for(sidecar.stopping.wait(), 5)  # stop() has begun
    assert (await get(admin, "/readyz"))[0] == 503
    assert (await get(admin, "/healthz"))[0] == 200
    _, _, metrics = await get(admin, "/metrics")
    assert b"extproc_stream_active 1" in metrics
    # the h2 engine's counters: nothing shed, no bad HTTP/2 input
    assert b"extproc_stream_shed_total 0" in metrics
    assert b"extproc_grpc_protocol_errors_total 0" in metrics
    await call.done_writing()
    await asyncio.wait_for(stopping, 10)
    await channel.close()
    with pytest.raises(OSError):
        await get(admin, "/healthz")
