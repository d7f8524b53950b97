"""TLS facts from Envoy's access-log entry (#19, item 3): tls.* on the SERVER span, and the
client certificate only as a keyed hash, only when configured."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from envoy_data_plane.envoy.data.accesslog import v3 as up_log
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc.config import PropagationSettings
from ext_proc.config.redaction import RedactionSettings
from ext_proc.exchange.als import FinalFacts, final_facts
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.outcome import exchange_outcome
from ext_proc.exchange.session import StreamDeps, StreamSession
from ext_proc.exchange.tls_facts import CIPHER_SUITES, TlsFacts, cipher_name, tls_facts
from ext_proc.policy.propagation import PropagatorCache, Rejections
from ext_proc.policy.redaction import Redactor
from ext_proc.policy.redaction.engine import CERTIFICATE_DOMAIN
from ext_proc.policy.request_policy import RequestPolicy

SECRET = "a-test-key-of-32-characters-----"
SUBJECT = "CN=cnryclient4f1d,O=Acme"
ISSUER = "CN=Acme Issuing CA"
SAN = "cnryclient4f1d.acme.internal"
IDENTITY = f"subject={SUBJECT}\nissuer={ISSUER}\ndns={SAN}\nuri=spiffe://acme/client"
NS = "envoy.filters.http.ext_proc"


def hashing(on: bool = True) -> Redactor:
    return Redactor(RedactionSettings(hmac_secret=SECRET,
                                      client_certificate_hash=on))


def expected_hash(identity: str = IDENTITY, length: int = 32) -> str:
    mac = hmac.new(SECRET.encode(), (CERTIFICATE_DOMAIN + identity).encode(), hashlib.sha256)
    return mac.hexdigest()[:length]


def upstream_entry(**tls: object) -> log_pb.HTTPAccessLogEntry:
    """An entry built with Envoy's full API (envoy-data-plane), read by our subset."""
    wire = bytes(up_log.HttpAccessLogEntry(
        common_properties=up_log.AccessLogCommon(
            access_log_type=up_log.AccessLogType.DownstreamEnd,
            tls_properties=up_log.TlsProperties(**tls)),  # type: ignore[arg-type]
        request=up_log.HttpRequestProperties(request_id="r1"),
        response=up_log.HttpResponseProperties(response_code=200)))
    return log_pb.HTTPAccessLogEntry.FromString(wire)


PEER = up_log.TlsPropertiesCertificateProperties(
    subject=SUBJECT, issuer=ISSUER, subject_alt_name=[
        up_log.TlsPropertiesCertificatePropertiesSubjectAltName(dns=SAN),
        up_log.TlsPropertiesCertificatePropertiesSubjectAltName(uri="spiffe://acme/client")])


def test_envoys_tls_properties_become_tls_facts() -> None:
    facts = final_facts(upstream_entry(
        tls_version=up_log.TlsPropertiesTlsVersion.TLSv1_3, tls_cipher_suite=0x1302,
        tls_sni_hostname="api.example.com", tls_session_id="ab12", ja3_fingerprint="f00",
        local_certificate_properties=up_log.TlsPropertiesCertificateProperties(subject="CN=gw"),
        peer_certificate_properties=PEER))
    assert facts is not None
    assert facts.tls == TlsFacts("1.3", "TLS_AES_256_GCM_SHA384", "api.example.com", IDENTITY)


def test_a_plaintext_entry_has_no_tls_facts() -> None:
    entry = log_pb.HTTPAccessLogEntry()
    entry.request.request_id = "r1"
    entry.common_properties.access_log_type = log_pb.DownstreamEnd
    facts = final_facts(entry)
    assert facts is not None and facts.tls is None


VERSION = up_log.TlsPropertiesTlsVersion


@pytest.mark.parametrize(("version", "text"), [
    (VERSION.TLSv1, "1"), (VERSION.TLSv1_1, "1.1"), (VERSION.TLSv1_2, "1.2"),
    (VERSION.TLSv1_3, "1.3"), (VERSION.VERSION_UNSPECIFIED, None),
])
def test_versions_are_the_numeric_part(version: up_log.TlsPropertiesTlsVersion,
                                       text: str | None) -> None:
    """semconv tls.protocol.version: the numeric part of OpenSSL's 'TLSv1.2'."""
    tls = tls_facts(upstream_entry(tls_version=version, tls_sni_hostname="h").common_properties)
    assert tls is not None and tls.version == text


@pytest.mark.parametrize(("number", "name"), [
    (0x1301, "TLS_AES_128_GCM_SHA256"), (0x1303, "TLS_CHACHA20_POLY1305_SHA256"),
    (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    (0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    (0x009C, "TLS_RSA_WITH_AES_128_GCM_SHA256"),  # Envoy's doc example: 009C
    (0xC0AC, "0xC0AC"), (0x0001, "0x0001"),  # not BoringSSL's: the IANA hex code
])
def test_cipher_suites_by_iana_number(number: int, name: str) -> None:
    assert cipher_name(number) == name


def test_the_cipher_table_matches_openssls_numbering() -> None:
    """Each suite OpenSSL also knows has the same number there (its id is 0x0300XXXX)."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    openssl = {c["id"] & 0xFFFF: c["name"] for c in context.get_ciphers()}
    tls13 = {n: name for n, name in CIPHER_SUITES.items() if n >> 8 == 0x13}
    assert all(openssl.get(n) == name for n, name in tls13.items())  # same names for 1.3
    assert openssl.get(0xC02F) == "ECDHE-RSA-AES128-GCM-SHA256"
    assert openssl.get(0xCCA8) == "ECDHE-RSA-CHACHA20-POLY1305"


def test_absent_cipher_and_sni_are_left_out() -> None:
    tls = tls_facts(upstream_entry(
        tls_version=up_log.TlsPropertiesTlsVersion.TLSv1_2).common_properties)
    assert tls == TlsFacts("1.2", None, None, None)
    result = exchange_outcome(200, None, False, None, {}, _final(tls), False)
    assert {k: v for k, v in result.attributes.items() if k.startswith("tls.")} == {
        "tls.protocol.name": "tls", "tls.protocol.version": "1.2"}


def test_an_overlong_sni_is_cut() -> None:
    tls = tls_facts(upstream_entry(tls_sni_hostname="a" * 300).common_properties)
    assert tls is not None and tls.server_name == "a" * 255


def test_the_identity_never_shows_in_a_repr() -> None:
    tls = TlsFacts("1.3", None, None, IDENTITY)
    assert SUBJECT not in repr(tls) and SUBJECT not in repr(_final(tls))


def _final(tls: TlsFacts | None) -> FinalFacts:
    return FinalFacts("r1", 200, (), "via_upstream", 5, tls=tls)


FULL = TlsFacts("1.3", "TLS_AES_128_GCM_SHA256", "api.example.com", IDENTITY)


@pytest.mark.parametrize(("redactor", "hashed"), [
    (None, False), (Redactor(RedactionSettings()), False), (hashing(on=False), False),
    (hashing(), True),
])
def test_tls_attributes_and_the_certificate_hash_only_when_configured(
        redactor: Redactor | None, hashed: bool) -> None:
    attrs = exchange_outcome(200, None, False, None, {}, _final(FULL), False,
                             redactor=redactor).attributes
    assert attrs["tls.protocol.name"] == "tls"
    assert attrs["tls.protocol.version"] == "1.3"
    assert attrs["tls.cipher"] == "TLS_AES_128_GCM_SHA256"
    assert attrs["tls.client.server_name"] == "api.example.com"
    assert attrs.get("envoy.tls.peer_certificate_hash") == (expected_hash() if hashed else None)
    text = repr(attrs)
    assert all(part not in text for part in (SUBJECT, ISSUER, SAN, "spiffe"))


def test_an_aborted_exchange_keeps_its_tls_facts() -> None:
    attrs = exchange_outcome(None, None, False, None, {}, _final(FULL), False,
                             redactor=hashing()).attributes
    assert attrs["error.type"] == "client_aborted"
    assert attrs["tls.cipher"] == "TLS_AES_128_GCM_SHA256"
    assert attrs["envoy.tls.peer_certificate_hash"] == expected_hash()


def test_no_client_certificate_no_hash() -> None:
    plain = TlsFacts("1.3", "TLS_AES_128_GCM_SHA256", "h", None)
    attrs = exchange_outcome(200, None, False, None, {}, _final(plain), False,
                             redactor=hashing()).attributes
    assert "envoy.tls.peer_certificate_hash" not in attrs


def test_the_hash_is_apart_from_an_enduser_id_of_the_same_text() -> None:
    redactor = hashing()
    assert redactor.certificate_hash("alice") != hmac.new(
        SECRET.encode(), b"alice", hashlib.sha256).hexdigest()[:32]
    assert redactor.certificate_hash("alice") == expected_hash("alice")


def test_the_setting_is_off_by_default_and_needs_the_key() -> None:
    assert RedactionSettings().client_certificate_hash is False
    with pytest.raises(ValidationError, match="needs hmac_secret"):
        RedactionSettings(client_certificate_hash=True)


async def test_the_session_hashes_with_its_policys_redactor() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    join = AccessLogJoin(0.5, 0.5)
    join.service.connected = True
    deps = StreamDeps(
        tracer=provider.get_tracer("t"), attributes_namespace=NS,
        propagator=PropagatorCache(Rejections()).get(PropagationSettings()),
        metadata_namespace="extproc_otel", finalizer=join, policy=RequestPolicy(hashing()))
    session = StreamSession(deps)
    req = pb.ProcessingRequest()
    for key, value in ((":method", "GET"), (":path", "/x"), (":scheme", "https"),
                       (":authority", "gw"), ("x-request-id", "r1")):
        req.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    req.attributes[NS].fields["request.time"].string_value = "2026-11-26T17:06:31+00:00"
    session.handle(req)
    session.record()
    session.close()
    join.deliver(_final(FULL))
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["tls.protocol.version"] == "1.3"
    assert attrs["envoy.tls.peer_certificate_hash"] == expected_hash()
