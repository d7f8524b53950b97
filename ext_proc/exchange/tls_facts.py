"""TLS facts of the downstream connection, from Envoy's access-log entry (issue #19, item 3).

Envoy fills ``AccessLogCommon.tls_properties`` when the request came over TLS: the
negotiated version (an enum), the cipher suite (its IANA number in a UInt32Value), the
SNI and the client certificate's subject, issuer and SANs. They become the semconv
``tls.*`` attributes of the SERVER span. The client certificate's fields are never
recorded: only, when ``redaction.client_certificate_hash`` is on, a keyed hash of them
through the redaction engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc.policy.redaction import Redactor
from ext_proc.telemetry import semconv as sc

# TLSProperties.TLSVersion -> the numeric part of OpenSSL's version string (semconv).
TLS_VERSIONS: Final = {
    log_pb.TLSProperties.TLSv1: "1",
    log_pb.TLSProperties.TLSv1_1: "1.1",
    log_pb.TLSProperties.TLSv1_2: "1.2",
    log_pb.TLSProperties.TLSv1_3: "1.3",
}

# IANA TLS Cipher Suite registry names of the suites BoringSSL (Envoy's TLS) implements;
# any other number is recorded as its hex code (0xC0AC).
CIPHER_SUITES: Final = {
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0x008C: "TLS_PSK_WITH_AES_128_CBC_SHA",
    0x008D: "TLS_PSK_WITH_AES_256_CBC_SHA",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
    0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xC035: "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA",
    0xC036: "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAC: "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
}
MAX_SERVER_NAME: Final = 255  # RFC 6066: a HostName is at most 2^8 - 1 bytes


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """What Envoy's access log says of the downstream TLS connection."""

    version: str | None  # "1.3"; None when Envoy did not say
    cipher: str | None  # IANA name, or the hex code of a suite not in CIPHER_SUITES
    server_name: str | None  # the SNI the client sent
    # The client certificate's subject, issuer and SANs, one per line. Only ever
    # recorded as a keyed hash (Redactor.certificate_hash): never as such.
    peer_identity: str | None = field(default=None, repr=False)


def cipher_name(number: int) -> str:
    return CIPHER_SUITES.get(number) or f"0x{number:04X}"


def _identity(peer: log_pb.TLSProperties.CertificateProperties) -> str | None:
    lines = [f"subject={peer.subject}", f"issuer={peer.issuer}"]
    for san in peer.subject_alt_name:
        kind = san.WhichOneof("san")
        if kind is not None:
            lines.append(f"{kind}={getattr(san, kind)}")
    return "\n".join(lines) if peer.subject or peer.issuer or len(lines) > 2 else None


def tls_facts(common: log_pb.AccessLogCommon) -> TlsFacts | None:
    """The TLS facts of an entry; None for a plaintext downstream connection."""
    if not common.HasField("tls_properties"):
        return None
    tls = common.tls_properties
    cipher = (cipher_name(tls.tls_cipher_suite.value)
              if tls.HasField("tls_cipher_suite") else None)
    return TlsFacts(
        version=TLS_VERSIONS.get(tls.tls_version),
        cipher=cipher,
        server_name=tls.tls_sni_hostname[:MAX_SERVER_NAME] or None,
        peer_identity=(_identity(tls.peer_certificate_properties)
                       if tls.HasField("peer_certificate_properties") else None),
    )


def tls_attributes(tls: TlsFacts, redactor: Redactor | None) -> dict[str, Any]:
    """The SERVER span's ``tls.*`` attributes, and the certificate's keyed hash if asked."""
    attrs: dict[str, Any] = {sc.TLS_PROTOCOL_NAME: "tls"}
    if tls.version is not None:
        attrs[sc.TLS_PROTOCOL_VERSION] = tls.version
    if tls.cipher is not None:
        attrs[sc.TLS_CIPHER] = tls.cipher
    if tls.server_name is not None:
        attrs[sc.TLS_CLIENT_SERVER_NAME] = tls.server_name
    if tls.peer_identity is not None and redactor is not None:
        digest = redactor.certificate_hash(tls.peer_identity)
        if digest is not None:
            attrs[sc.ENVOY_TLS_PEER_CERTIFICATE_HASH] = digest
    return attrs
