"""#19 item 3 through a real Envoy terminating TLS (and requiring a client certificate) on
its listener: the SERVER span carries tls.* from Envoy's access log, and the client
certificate only as a keyed hash, never as such."""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver, ReceivedSpan
from ext_proc.dev.devstack import Config, Stack
from ext_proc.policy.redaction.engine import CERTIFICATE_DOMAIN
from tests.e2e.conftest import tag, wait_gateway_span, with_query
from tests.pki import Pki, make_client_certificate, make_pki

pytestmark = pytest.mark.e2e

SNI = "localhost"  # a name the server certificate holds (Python sends no SNI for an IP)
SECRET = f"tls-e2e-key-{uuid.uuid4().hex}"
CN = f"cnrycn{uuid.uuid4().hex[:16]}"
DNS = f"cnrydns{uuid.uuid4().hex[:16]}.clients.test"
URI = f"spiffe://clients.test/cnryuri{uuid.uuid4().hex[:16]}"
INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
TLS_CONTEXT = ("type.googleapis.com/"
               "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")


def terminate_tls(pki: Pki) -> Callable[[Config], None]:
    """The listener's filter chain terminates TLS and requires a certificate of pki's CA;
    its tls_inspector reads the SNI (without it Envoy logs none: measured)."""
    def mutate(config: Config) -> None:
        listener = config["static_resources"]["listeners"][0]
        listener.setdefault("listener_filters", []).append({
            "name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": INSPECTOR}})
        (chain,) = listener["filter_chains"]
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS_CONTEXT, "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": str(pki.server_cert)},
                    "private_key": {"filename": str(pki.server_key)}}],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca)}}}}}
    return mutate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_cert(pki: Pki) -> tuple[Path, Path]:
    return make_client_certificate(pki, CN, DNS, URI)


@pytest.fixture(scope="module")
def tls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Stack, OtlpReceiver]]:
    receiver = OtlpReceiver()
    receiver.start()
    env = {"EXTPROC_REDACTION__HMAC_SECRET": SECRET,
           "EXTPROC_REDACTION__CLIENT_CERTIFICATE_HASH": "true"}
    try:
        with Stack(tmp_path_factory.mktemp("tls-stack"), receiver.endpoint, sidecar_env=env,
                   mutate_config=terminate_tls(pki)) as stack:
            yield stack, receiver
    finally:
        receiver.stop()


def https_get(stack: Stack, path: str, context: ssl.SSLContext) -> tuple[int, str, str]:
    """GET over TLS with SNI: (status, the negotiated version, OpenSSL's cipher name)."""
    with socket.create_connection(("127.0.0.1", stack.ports.listener), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SNI) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        version, cipher = conn.version(), conn.cipher()
    assert version is not None and cipher is not None
    return int(data.split(b" ", 2)[1]), version, cipher[0]


def client_context(pki: Pki, cert: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def expected_hash(subject: str, issuer: str) -> str:
    """Envoy 1.40 logs the peer's subject, issuer and URI SANs (no DNS SANs: measured)."""
    identity = f"subject={subject}\nissuer={issuer}\nuri={URI}"
    return hmac.new(SECRET.encode(), (CERTIFICATE_DOMAIN + identity).encode(),
                    hashlib.sha256).hexdigest()[:32]


def assert_no_certificate(span: ReceivedSpan, cert: Path) -> None:
    pem_body = "".join(cert.read_text().splitlines()[1:-1])
    text = repr(span.attributes)
    for secret in (CN, DNS, URI, pem_body[:40], pem_body[-40:]):
        assert secret not in text


def test_tls_13_facts_and_the_client_certificate_hash(
        tls_stack: tuple[Stack, OtlpReceiver], pki: Pki, client_cert: tuple[Path, Path]) -> None:
    stack, receiver = tls_stack
    t = tag()
    status, version, cipher = https_get(stack, f"/echo?tag={t}", client_context(pki, client_cert))
    assert status == 200 and version == "TLSv1.3"
    span = wait_gateway_span(receiver, with_query(t))
    attrs = span.attributes
    assert attrs["tls.protocol.name"] == "tls"
    assert attrs["tls.protocol.version"] == "1.3"
    assert attrs["tls.cipher"] == cipher  # TLS 1.3 suites: OpenSSL's name is IANA's
    assert attrs["tls.client.server_name"] == SNI
    assert attrs["envoy.tls.peer_certificate_hash"] == expected_hash(
        f"CN={CN}", "CN=extproc-otel test CA")
    assert_no_certificate(span, client_cert[0])
    output = stack.sidecar.output()
    assert all(secret not in output for secret in (CN, DNS, URI))


def test_tls_12_cipher_by_its_iana_name(
        tls_stack: tuple[Stack, OtlpReceiver], pki: Pki, client_cert: tuple[Path, Path]) -> None:
    stack, receiver = tls_stack
    context = client_context(pki, client_cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")  # the server key is EC P-256
    t = tag()
    status, version, cipher = https_get(stack, f"/echo?tag={t}", context)
    assert (status, version, cipher) == (200, "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    attrs = wait_gateway_span(receiver, with_query(t)).attributes
    assert attrs["tls.protocol.version"] == "1.2"
    assert attrs["tls.cipher"] == "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
    assert attrs["tls.client.server_name"] == SNI
    # same certificate, same keyed hash
    assert attrs["envoy.tls.peer_certificate_hash"] == expected_hash(
        f"CN={CN}", "CN=extproc-otel test CA")
