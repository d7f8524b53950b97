"""Issue #7 behind a real Envoy: no secret leaves the sidecar; mTLS Envoy -> sidecar.

The canary test sends unique secrets in every position a credential can take,
through the shipped envoy/envoy.yaml, then scans everything the sidecar emitted
(OTLP spans, logs and metrics, stdout, the admin endpoint) and Envoy's access
log with the shipped format. The mTLS test runs envoy/envoy-mtls.yaml against a
sidecar that requires client certificates, with the sidecar exporting over
OTLP/gRPC with mTLS and headers to a TLS receiver.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan, decode_spans
from ext_proc.dev.devstack import (
    ENVOY_MTLS_YAML,
    ENVOY_YAML,
    Stack,
    envoy_binary,
    free_port,
    rewrite_tls_dir,
)
from ext_proc.envoy_config.embed import envoy_validate
from tests.conftest import http_request
from tests.e2e.conftest import SIDECAR_SERVICE, tag, wait_gateway_span, with_query
from tests.pki import SERVER_NAME, Pki, make_pki

pytestmark = pytest.mark.e2e


def canary(name: str) -> str:
    return f"cnry{name}{uuid.uuid4().hex[:20]}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Canaries:
    """One unique secret per position, and the encoded forms they travel in."""

    def __init__(self) -> None:
        self.sub = canary("sub")
        self.jwt_sig = canary("sig")
        self.jwt = ".".join([
            b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
            b64url(json.dumps({"sub": self.sub, "iss": "canary"}).encode()),
            self.jwt_sig])
        self.basic_password = canary("basic")
        self.basic = base64.b64encode(f"alice:{self.basic_password}".encode()).decode()
        self.cookie = canary("cookie")
        self.custom = canary("custom")
        self.api_key = canary("apikey")
        self.params = {name: canary(name.replace("-", "").lower()) for name in (
            "token", "api_key", "X-Amz-Signature", "X-Amz-Credential", "access_token",
            "password", "sig")}
        self.userinfo = canary("userinfo")
        self.hmac_secret = canary("hmac")

    def all(self) -> dict[str, str]:
        found = {"jwt.sub": self.sub, "jwt.signature": self.jwt_sig, "jwt": self.jwt,
                 "jwt.payload": self.jwt.split(".")[1], "basic.password": self.basic_password,
                 "basic.encoded": self.basic, "cookie": self.cookie,
                 "x-internal-secret": self.custom, "x-api-key": self.api_key,
                 "userinfo": self.userinfo, "hmac_secret": self.hmac_secret}
        found.update({f"query.{k}": v for k, v in self.params.items()})
        return found

    def query(self, t: str) -> str:
        return "&".join([f"tag={t}", *(f"{k}={v}" for k, v in self.params.items())])


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def sidecar_items(receiver: OtlpReceiver) -> list[Any]:
    def ours(item: Any) -> bool:
        return bool(item.resource.get("service.name") == SIDECAR_SERVICE)
    return [*filter(ours, receiver.spans()), *filter(ours, receiver.log_records()),
            *filter(ours, receiver.metrics())]


def test_no_canary_leaves_the_sidecar(tmp_path: Path) -> None:
    secrets = Canaries()
    receiver = OtlpReceiver()
    receiver.start()
    admin_port = free_port()
    env = {
        "EXTPROC_REDACTION__CAPTURE_REQUEST_HEADERS": json.dumps(
            ["authorization", "cookie", "x-internal-secret", "x-api-key", "user-agent"]),
        "EXTPROC_REDACTION__DENIED_HEADERS": json.dumps(["x-internal-secret"]),
        "EXTPROC_REDACTION__HMAC_SECRET": secrets.hmac_secret,
        "EXTPROC_OTLP_LOGS__ENABLED": "true",
        "EXTPROC_OTLP_LOGS__LEVEL": "DEBUG",
        "EXTPROC_LOG__LEVEL": "DEBUG",
        "EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
    }
    stack = Stack(tmp_path, receiver.endpoint, sidecar_env=env, envoy_source=ENVOY_YAML)
    try:
        stack.start()
        bearer, basic, absolute, api_key = tag(), tag(), tag(), tag()
        common = [("cookie", f"session={secrets.cookie}; theme=dark"),
                  ("x-internal-secret", secrets.custom), ("user-agent", "canary-test")]
        echoed = http_request(stack.base_url, f"/echo?{secrets.query(bearer)}", headers=[
            ("authorization", f"Bearer {secrets.jwt}"), *common])
        assert echoed.status == 200
        # the canaries really went through Envoy (the scan below is not vacuous)
        assert echoed.json()["headers"]["authorization"] == [f"Bearer {secrets.jwt}"]
        assert http_request(stack.base_url, f"/echo?{secrets.query(basic)}", headers=[
            ("authorization", f"Basic {secrets.basic}"), *common]).status == 200
        assert http_request(stack.base_url, f"/echo?{secrets.query(api_key)}", headers=[
            ("x-api-key", secrets.api_key), *common]).status == 200
        # absolute-form request target with userinfo (RFC 9112 section 3.2.2)
        target = (f"http://alice:{secrets.userinfo}@127.0.0.1:{stack.ports.listener}"
                  f"/echo?{secrets.query(absolute)}")
        absolute_reply = http_request(stack.base_url, target, headers=common)

        span = wait_gateway_span(receiver, with_query(bearer))
        attrs = span.attributes
        assert attrs["auth.scheme"] == "bearer"
        assert len(str(attrs["enduser.id"])) == 32  # a truncated HMAC, hex
        assert attrs["http.request.header.authorization"] == ["REDACTED"]
        assert attrs["http.request.header.cookie"] == ["REDACTED"]
        assert attrs["http.request.header.x-internal-secret"] == ["REDACTED"]
        assert attrs["http.request.header.user-agent"] == ["canary-test"]
        assert "token=REDACTED" in attrs["url.query"]
        assert "X-Amz-Signature=REDACTED" in attrs["url.query"]
        basic_span = wait_gateway_span(receiver, with_query(basic))
        assert basic_span.attributes["auth.scheme"] == "basic"
        assert "enduser.id" not in basic_span.attributes
        key_span = wait_gateway_span(receiver, with_query(api_key))
        assert key_span.attributes["auth.scheme"] == "api-key"
        assert key_span.attributes["http.request.header.x-api-key"] == ["REDACTED"]
        # Envoy accepts it, moves the authority into :authority/Host and drops the
        # userinfo before any filter runs: the sidecar never sees it.
        assert absolute_reply.status == 200
        assert absolute_reply.json()["headers"]["host"] == [f"127.0.0.1:{stack.ports.listener}"]
        assert wait_gateway_span(receiver, with_query(absolute)).attributes[
            "server.address"] == "127.0.0.1"

        # every signal has been exported at least once after those requests
        assert receiver.wait_for(lambda: any(
            m.name == "http.server.request.duration" and m.resource.get("service.name") ==
            SIDECAR_SERVICE for m in receiver.metrics()), 10)
        assert receiver.wait_for(lambda: any(
            log.trace_id == span.trace_id for log in receiver.log_records()), 10)
        admin = {path: http_get(f"http://127.0.0.1:{admin_port}{path}")
                 for path in ("/metrics", "/config", "/healthz", "/readyz")}
        assert "http_server_request_duration" in admin["/metrics"]
        assert "hmac_secret" in admin["/config"]
    finally:
        stack.stop()
        receiver.stop()

    emitted = {
        "otlp": repr(sidecar_items(receiver)),
        "stdout": stack.sidecar.output(),
        **{f"admin{path}": body for path, body in admin.items()},
        "envoy access log": stack.access_log.read_text(),
    }
    assert emitted["otlp"] and emitted["stdout"]
    assert any(line.get("level") == "DEBUG" for line in stack.sidecar_lines())  # all of it
    assert len(stack.access_lines()) == 4  # Envoy flushed its access log on exit
    found = {where: leaks(text, secrets.all()) for where, text in emitted.items()}
    assert found == {where: [] for where in emitted}, found


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsTraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that requires a client certificate, keeping the
    decoded spans and each export's gRPC metadata."""

    def __init__(self, pki: Pki) -> None:
        self._cond = threading.Condition()
        self.spans: list[ReceivedSpan] = []
        self.metadata: list[dict[str, str]] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(), require_client_auth=True))

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._cond:
            self.spans.extend(decode_spans(request))
            self.metadata.append(dict(context.invocation_metadata()))
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_span(self, query_tag: str, timeout: float = 10.0) -> ReceivedSpan:
        def match() -> list[ReceivedSpan]:
            return [s for s in self.spans
                    if f"tag={query_tag}" in str(s.attributes.get("url.query", ""))]
        with self._cond:
            assert self._cond.wait_for(lambda: bool(match()), timeout), "no span arrived"
            return match()[0]

    @contextmanager
    def running(self) -> Iterator[TlsTraceReceiver]:
        self._server.start()
        try:
            yield self
        finally:
            self._server.stop(None).wait()


def mtls_stack(workdir: Path, pki: Pki, otlp_port: int) -> Stack:
    """envoy/envoy-mtls.yaml in front of a sidecar that requires Envoy's certificate and
    exports its spans over OTLP/gRPC with mTLS and an authorization header."""
    sidecar_env = {
        "EXTPROC_SERVER__TLS_CERT_FILE": str(pki.server_cert),
        "EXTPROC_SERVER__TLS_KEY_FILE": str(pki.server_key),
        "EXTPROC_SERVER__TLS_CLIENT_CA_FILE": str(pki.ca),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20collector-token",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    return Stack(workdir, None, sidecar_env=sidecar_env, envoy_source=ENVOY_MTLS_YAML,
                 mutate_config=lambda config: rewrite_tls_dir(config, pki.directory),
                 sidecar_credentials=credentials)


def health(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    """Health status of the sidecar, or the failing call's status code."""
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_the_shipped_mtls_config_validates(pki: Pki, tmp_path: Path) -> None:
    config = yaml.safe_load(ENVOY_MTLS_YAML.read_text())
    rewrite_tls_dir(config, pki.directory)
    result = envoy_validate(config, envoy_binary())
    assert result.ok, result.output[-3000:]


def test_mtls_config_differs_from_the_reference_only_in_transport_security() -> None:
    reference = yaml.safe_load(ENVOY_YAML.read_text())
    mtls = yaml.safe_load(ENVOY_MTLS_YAML.read_text())
    socket = next(c for c in mtls["static_resources"]["clusters"]
                  if c["name"] == "extproc_otel").pop("transport_socket")
    assert mtls == reference
    context = socket["typed_config"]["common_tls_context"]
    assert context["tls_certificates"] and context["validation_context"]["trusted_ca"]


def test_envoy_reaches_the_sidecar_over_mtls(pki: Pki, tmp_path: Path) -> None:
    with TlsTraceReceiver(pki).running() as otlp, mtls_stack(tmp_path, pki, otlp.port) as stack:
        t = tag()
        reply = http_request(stack.base_url, f"/echo?tag={t}")
        assert reply.status == 200
        span = otlp.wait_span(t)
        # the sidecar answered over mTLS: its traceparent reached the upstream
        _, trace_id, span_id, _ = reply.json()["headers"]["traceparent"][0].split("-")
        assert (trace_id, span_id) == (span.trace_id, span.span_id)
        assert stack.envoy_stat("cluster.extproc_otel.ssl.handshake") >= 1
        assert stack.envoy_stat("cluster.extproc_otel.ssl.connection_error") == 0
        # ...and exported over OTLP with mTLS, carrying OTEL_EXPORTER_OTLP_HEADERS
        assert otlp.metadata[0]["authorization"] == "Bearer collector-token"
        # a client without a certificate (or without TLS) is refused
        port = stack.ports.sidecar
        assert health(port, grpc.ssl_channel_credentials(pki.ca.read_bytes())) == "UNAVAILABLE"
        assert health(port, None) == "UNAVAILABLE"
        assert health(port, grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes())
        ) == "UNAVAILABLE"
        assert "TLS listener" in stack.sidecar.output()
