"""Transport security: TLS/mTLS on the gRPC listener, the plaintext guard, OTLP over TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from ext_proc.app import Sidecar, build_sidecar
from ext_proc.config import ConfigError, ServerSettings, load_settings
from ext_proc.dev.devstack import free_port
from ext_proc.telemetry.provider import Telemetry, build_span_exporter
from ext_proc.tls import (
    TransportSecurityError,
    check_listen_security,
    load_server_tls,
)
from tests.pki import SERVER_NAME, Pki, make_pki

pytestmark = pytest.mark.usefixtures("in_process_sidecar")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(pki: Pki, mutual: bool = True, **extra: Any) -> dict[str, Any]:
    server: dict[str, Any] = {"listen": "127.0.0.1:0", "grace_s": 0.5,
                              "tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    if mutual:
        server["tls_client_ca_file"] = pki.ca
    return {**server, **extra}


# -- settings and credential loading ---------------------------------------------------


def test_cert_without_key_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert_file and server\.tls_key_file"):
        load_settings(server={"tls_cert_file": pki.server_cert})


def test_client_ca_without_server_cert_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls_client_ca_file needs"):
        load_settings(server={"tls_client_ca_file": pki.ca})


def test_tls_settings_come_from_the_environment(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_SERVER__TLS_CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("EXTPROC_SERVER__TLS_KEY_FILE", str(pki.server_key))
    monkeypatch.setenv("EXTPROC_SERVER__TLS_CLIENT_CA_FILE", str(pki.ca))
    server = load_settings().server
    assert server.tls_enabled and server.tls_client_ca_file == pki.ca
    assert server.require_client_cert


def test_no_tls_material_when_off() -> None:
    assert load_server_tls(ServerSettings()) is None


def test_loads_pem_material(pki: Pki) -> None:
    tls = load_server_tls(ServerSettings(**tls_server(pki)))
    assert tls is not None
    assert tls.certificate_chain == pki.server_cert.read_bytes()
    assert tls.private_key == pki.server_key.read_bytes()
    assert tls.client_ca == pki.ca.read_bytes()


def test_unreadable_key_names_the_setting(pki: Pki, tmp_path: Path) -> None:
    settings = ServerSettings(**tls_server(pki, tls_key_file=tmp_path / "missing.key"))
    with pytest.raises(TransportSecurityError, match=r"server\.tls_key_file .*missing\.key"):
        load_server_tls(settings)


def test_a_non_pem_file_is_refused(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.crt"
    garbage.write_bytes(b"\x00\x01 not a certificate")
    with pytest.raises(TransportSecurityError, match=r"tls_client_ca_file .*not a PEM file"):
        load_server_tls(ServerSettings(**tls_server(pki, tls_client_ca_file=garbage)))


# -- the plaintext guard ------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:1", "localhost:1", "[::1]:1", "127.9.9.9:1"])
def test_loopback_plaintext_is_allowed(listen: str) -> None:
    check_listen_security(ServerSettings(listen=listen))


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.0.0.5", "sidecar"])
def test_non_loopback_plaintext_is_refused(host: str) -> None:
    with pytest.raises(TransportSecurityError,
                       match="EXTPROC_SERVER__ALLOW_INSECURE_NON_LOOPBACK"):
        check_listen_security(ServerSettings(listen=f"{host}:{free_port()}"))


def test_opt_in_allows_plaintext_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    check_listen_security(ServerSettings(listen=f"0.0.0.0:{free_port()}",
                                         allow_insecure_non_loopback=True))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "unencrypted" in warnings[0].getMessage()


def test_non_loopback_with_tls_needs_no_opt_in(pki: Pki) -> None:
    check_listen_security(ServerSettings(**tls_server(pki, listen=f"0.0.0.0:{free_port()}")))


def test_cli_refuses_a_plaintext_wildcard_listen_with_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTPROC_", "OTEL_"))}
    env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
               OTEL_LOGS_EXPORTER="none")
    proc = subprocess.run([sys.executable, "-m", "ext_proc", "serve", "--listen",
                           f"0.0.0.0:{free_port()}"], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "not loopback and TLS is off" in proc.stderr
    assert "EXTPROC_SERVER__TLS_CERT_FILE" in proc.stderr


# -- a real listener ------------------------------------------------------------------------


@asynccontextmanager
async def tls_sidecar(**server: Any) -> AsyncIterator[Sidecar]:
    provider = TracerProvider()
    sidecar = build_sidecar(load_settings(server=server),
                            Telemetry(provider, provider.get_tracer("test")))
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop()


def channel_credentials(pki: Pki, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)


async def health_check(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    """The health status, or the gRPC status code name when the call fails."""
    target = f"127.0.0.1:{port}"
    channel = (grpc.aio.insecure_channel(target) if credentials is None else
               grpc.aio.secure_channel(target, credentials, options=[
                   ("grpc.ssl_target_name_override", SERVER_NAME)]))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.fixture(params=["h2", "grpcio"])
def engine(request: pytest.FixtureRequest) -> str:
    """Both gRPC servers (server.engine) enforce the same transport security."""
    return str(request.param)


async def test_mtls_listener_serves_a_client_with_a_certificate(pki: Pki, engine: str) -> None:
    async with tls_sidecar(**tls_server(pki), engine=engine) as sidecar:
        assert await health_check(sidecar.port, channel_credentials(
            pki, pki.client_cert, pki.client_key)) == "SERVING"


@pytest.mark.parametrize("client", ["plaintext", "no-cert", "rogue-cert"])
async def test_mtls_listener_refuses_other_clients(pki: Pki, client: str, engine: str) -> None:
    credentials = {
        "plaintext": None,
        "no-cert": channel_credentials(pki),
        "rogue-cert": channel_credentials(pki, pki.rogue_cert, pki.rogue_key),
    }[client]
    async with tls_sidecar(**tls_server(pki), engine=engine) as sidecar:
        assert await health_check(sidecar.port, credentials) == "UNAVAILABLE"
        # and the listener still serves a proper client afterwards
        assert await health_check(sidecar.port, channel_credentials(
            pki, pki.client_cert, pki.client_key)) == "SERVING"


async def test_optional_client_cert(pki: Pki, engine: str) -> None:
    async with tls_sidecar(**tls_server(pki, require_client_cert=False),
                           engine=engine) as sidecar:
        assert await health_check(sidecar.port, channel_credentials(pki)) == "SERVING"


async def test_server_only_tls(pki: Pki, engine: str) -> None:
    async with tls_sidecar(**tls_server(pki, mutual=False), engine=engine) as sidecar:
        assert await health_check(sidecar.port, channel_credentials(pki)) == "SERVING"
        assert await health_check(sidecar.port, None) == "UNAVAILABLE"


# -- the OTLP exporter over TLS -------------------------------------------------------------


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, str]]] = []
        self.lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.calls.append((spans, dict(context.invocation_metadata())))
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def mtls_trace_receiver(pki: Pki) -> Iterator[tuple[int, _Traces]]:
    """An OTLP/gRPC trace receiver that requires a client certificate."""
    traces = _Traces()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(traces, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True))
    server.start()
    try:
        yield port, traces
    finally:
        server.stop(None).wait()


def export_one_span(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> SpanExportResult:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exporter = build_span_exporter()
    assert exporter is not None
    results: list[SpanExportResult] = []
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    real_export = exporter.export

    def export(spans: Any) -> SpanExportResult:
        results.append(real_export(spans))
        return results[-1]

    monkeypatch.setattr(exporter, "export", export)
    provider.get_tracer("test").start_span("tls-export").end()
    provider.shutdown()
    assert len(results) == 1
    return results[0]


def test_otlp_exporter_speaks_mtls_with_headers(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with mtls_trace_receiver(pki) as (port, traces):
        result = export_one_span(monkeypatch, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=gw-1,authorization=Bearer%20collector-token",
        })
        assert result == SpanExportResult.SUCCESS
        assert len(traces.calls) == 1
        spans, metadata = traces.calls[0]
        assert spans == 1
        assert metadata["x-tenant"] == "gw-1"
        assert metadata["authorization"] == "Bearer collector-token"


def test_otlp_exporter_without_client_cert_is_refused(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with mtls_trace_receiver(pki) as (port, traces):
        result = export_one_span(monkeypatch, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        })
        assert result == SpanExportResult.FAILURE
        assert traces.calls == []
