"""Envoy's gRPC access log (ALS) reaches `AccessLogService` on a real Envoy.

Envoy runs the repo's envoy.yaml with the ext_proc filter removed (this test is
about the access log only), the file access log kept (to cross-check flags) and
an ``envoy.access_loggers.http_grpc`` logger whose cluster points at an
in-process `AccessLogService`. Each entry must carry the request id, code and
flags Envoy printed itself, including the endings ext_proc cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import socketserver
import statistics
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ext_proc.dev.devstack import (
    Config,
    Ports,
    Proc,
    envoy_binary,
    hcm_of,
    render_envoy_config,
    static_cluster,
    wait_until,
)
from ext_proc.exchange.als import AccessLogService, FinalFacts
from tests.e2e.rawhttp import read_request_head, stall

pytestmark = pytest.mark.e2e

HTTP_GRPC_CONFIG = ("type.googleapis.com/"
                    "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig")
FLUSH_INTERVAL = "0.05s"
STALL_S = 0.3


class _Upstream(socketserver.ThreadingTCPServer):
    """HTTP/1.1 upstream: /ok answers in full, /cut sends headers and part of the body,
    stalls (a recv timeout, no sleep) and closes; /stall does the same for longer."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        head = read_request_head(self.request)
        if head is None:
            return
        path = head.split(b" ", 2)[1]
        with contextlib.suppress(OSError):
            if path.startswith(b"/ok"):
                self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                return
            self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
            stall(self.request, STALL_S if path.startswith(b"/cut") else 5.0)
            if path.startswith(b"/cut-rst"):  # close with a TCP RST instead of a FIN
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                self.request.close()  # now, before socketserver's shutdown(SHUT_WR) sends a FIN


def _als_logger(cluster: str, buffer_size_bytes: int) -> Config:
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": HTTP_GRPC_CONFIG,
        "common_config": {
            "log_name": "extproc_otel",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "buffer_flush_interval": FLUSH_INTERVAL,
            "buffer_size_bytes": buffer_size_bytes,  # 0: send every entry at once
        }}}


def _config(ports: Ports, file_log: Path, upstream: int, als: int, dead: int,
            buffer_size_bytes: int) -> Config:
    config = render_envoy_config(ports, file_log)
    hcm = hcm_of(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] != "envoy.filters.http.ext_proc"]
    hcm["access_log"].append(_als_logger("als", buffer_size_bytes))
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/down"}, "route": {"cluster": "down"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "raw", "timeout": "10s"}}]
    hcm["route_config"]["virtual_hosts"][0]["domains"] = ["app"]  # other hosts: no route
    config["static_resources"]["clusters"] = [
        static_cluster("raw", upstream), static_cluster("down", dead),
        static_cluster("als", als, http2=True)]
    return config


def _http(port: int, path: str, request_id: str, host: str = "app",
          headers_only: bool = False) -> bytes:
    """One HTTP/1.1 request; reads to EOF, or only the response head when `headers_only`
    (then closes early: a client that leaves mid-response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nx-request-id: {request_id}\r\n"
                     "connection: close\r\n\r\n".encode())
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
                if headers_only and b"\r\n\r\n" in data:
                    break
        return data


@dataclass
class Collected:
    facts: dict[str, FinalFacts] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # time.monotonic()
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_entry(self, facts: FinalFacts) -> None:
        self.facts[facts.request_id] = facts
        self.arrived[facts.request_id] = time.monotonic()
        self.changed.set()

    async def wait(self, request_id: str) -> FinalFacts:
        async with asyncio.timeout(10.0):
            while request_id not in self.facts:
                self.changed.clear()
                await self.changed.wait()
        return self.facts[request_id]


@dataclass
class Env:
    port: int
    collected: Collected
    envoy: Proc
    file_log: Path
    buffer_size_bytes: int

    def file_lines(self) -> dict[str, dict[str, Any]]:
        """Envoy's file access log, complete once Envoy has exited (it flushes on exit)."""
        lines = (json.loads(line) for line in self.file_log.read_text().splitlines()
                 if line.startswith("{"))
        return {line["request_id"]: line for line in lines}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def _upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    buffer_size_bytes = getattr(request, "param", 0)
    collected = Collected()
    service = AccessLogService(collected.on_entry)
    server = grpc.aio.server()
    service.register(server)
    als_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with _upstream() as upstream, socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused (UF)
        ports = Ports()
        file_log = tmp_path / "access.log"
        file_log.touch()
        config_path = tmp_path / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(
            _config(ports, file_log, upstream.server_address[1], als_port,
                    dead.getsockname()[1], buffer_size_bytes), sort_keys=False))
        envoy = Proc("envoy", [envoy_binary(), "-c", str(config_path), "--disable-hot-restart",
                               "--log-level", "warn", "--concurrency", "1"],
                     tmp_path / "envoy.log")
        envoy.start()
        try:
            def ready() -> bool:
                if not envoy.alive():
                    raise RuntimeError(f"envoy exited:\n{envoy.output()[-2000:]}")
                return _ready(ports.admin)

            await asyncio.to_thread(wait_until, ready, 20.0, "envoy ready")
            yield Env(ports.listener, collected, envoy, file_log, buffer_size_bytes)
        finally:
            envoy.stop()
            await server.stop(None)


async def _request(env: Env, path: str, **kw: Any) -> tuple[str, bytes, float]:
    request_id = str(uuid.uuid4())
    reply = await asyncio.to_thread(_http, env.port, path, request_id, **kw)
    return request_id, reply, time.monotonic()


async def test_entries_join_by_request_id_with_codes_and_flags(env: Env) -> None:
    cases = {
        "ok": await _request(env, "/ok"),
        "no_route": await _request(env, "/ok", host="elsewhere"),
        "connect_failure": await _request(env, "/down"),
        "cut_after_headers": await _request(env, "/cut"),
        "reset_after_headers": await _request(env, "/cut-rst"),
        "client_left": await _request(env, "/stall", headers_only=True),
    }
    got = {name: await env.collected.wait(rid) for name, (rid, _, _) in cases.items()}

    assert cases["ok"][1].endswith(b"hello")
    assert got["ok"].response_code == 200 and got["ok"].response_flags == ()
    assert got["ok"].body_bytes_sent == 5 and got["ok"].response_code_details == "via_upstream"
    assert (got["no_route"].response_code, got["no_route"].response_flags) == (404, ("NR",))
    assert (got["connect_failure"].response_code,
            got["connect_failure"].response_flags) == (503, ("UF",))
    for name in ("cut_after_headers", "reset_after_headers"):
        cut = got[name]
        assert cases[name][1].startswith(b"HTTP/1.1 200")  # looked like success downstream
        assert cut.response_code == 200 and cut.body_bytes_sent == len(b"partial"), cut
        assert (cut.response_code_details or "").startswith(
            "upstream_reset_after_response_started"), cut
        # Measured on 1.40 with an HTTP/1.1 upstream: UPE, for a FIN and for a RST alike
        # (the body ends before content-length); UR/UC are what other versions/codecs report.
        assert {"UR", "UC", "UPE"} & set(cut.response_flags), cut
    left = got["client_left"]
    assert "DC" in left.response_flags or "DR" in left.response_flags, left

    await asyncio.to_thread(env.envoy.stop)
    lines = env.file_lines()
    for name, (rid, _, _) in cases.items():  # same story as Envoy's own file log
        line = lines[rid]
        flags = line["response_flags"]
        assert got[name].response_flags == (() if flags == "-" else tuple(flags.split(","))), \
            (name, line)
    delays = [env.collected.arrived[rid] - done for rid, _, done in cases.values()]
    assert max(delays) < 2.0, delays


@pytest.mark.parametrize("env", [0, 16384], indirect=True, ids=["unbuffered", "16KiB"])
async def test_delay_from_request_completion_to_entry(env: Env) -> None:
    delays = []
    for _ in range(20):
        rid, _, done = await _request(env, "/ok")
        await env.collected.wait(rid)
        delays.append(env.collected.arrived[rid] - done)
    median = statistics.median(delays)
    print(f"\nALS delay (flush {FLUSH_INTERVAL}, buffer_size_bytes {env.buffer_size_bytes}): "
          f"median {median * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms")
    assert median < 0.5 and max(delays) < 2.0, delays
