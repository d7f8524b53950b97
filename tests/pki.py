"""A throwaway PKI generated per test run (no key is ever committed).

One CA signs a server certificate (SANs ``extproc-otel``, ``localhost``,
``127.0.0.1``) and a client certificate (``envoy``); a second, untrusted CA
signs a rogue client certificate. EC P-256 keys keep generation fast.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME: Final = "extproc-otel"
CLIENT_NAME: Final = "envoy"


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca(self) -> Path:
        return self.path("ca.crt")

    @property
    def server_cert(self) -> Path:
        return self.path("server.crt")

    @property
    def server_key(self) -> Path:
        return self.path("server.key")

    @property
    def client_cert(self) -> Path:
        return self.path("envoy.crt")

    @property
    def client_key(self) -> Path:
        return self.path("envoy.key")

    @property
    def rogue_cert(self) -> Path:
        return self.path("rogue.crt")

    @property
    def rogue_key(self) -> Path:
        return self.path("rogue.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
          sans: list[x509.GeneralName] | None = None,
          usage: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           key_path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)


def make_pki(directory: Path) -> Pki:
    """Write ca.crt, server.{crt,key}, envoy.{crt,key}, rogue.{crt,key} into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("extproc-otel test CA", ca_key, _name("extproc-otel test CA"), ca_key, ca=True)
    _write(pki.ca, ca, ca_key, _ca_key_path(pki))  # the key: for make_client_certificate
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(SERVER_NAME, server_key, ca.subject, ca_key, ca=False, sans=[
        x509.DNSName(SERVER_NAME), x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    _write(pki.server_cert, server, server_key, pki.server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(CLIENT_NAME, client_key, ca.subject, ca_key, ca=False,
                   sans=[x509.DNSName(CLIENT_NAME)], usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    _write(pki.client_cert, client, client_key, pki.client_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _cert(CLIENT_NAME, rogue_key, _name("rogue CA"), rogue_ca_key, ca=False,
                  sans=[x509.DNSName(CLIENT_NAME)], usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    _write(pki.rogue_cert, rogue, rogue_key, pki.rogue_key)
    return pki


def make_client_certificate(pki: Pki, common_name: str, dns_name: str,
                            uri: str) -> tuple[Path, Path]:
    """A client certificate (and key) for `common_name` with a DNS and a URI SAN, signed by
    `pki`'s CA: (cert, key)."""
    ca_key = serialization.load_pem_private_key(
        _ca_key_path(pki).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(dns_name), x509.UniformResourceIdentifier(uri)]
    cert = _cert(common_name, key, ca.subject, ca_key, ca=False, sans=sans,
                 usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    cert_path, key_path = pki.path(f"{common_name}.crt"), pki.path(f"{common_name}.key")
    _write(cert_path, cert, key, key_path)
    return cert_path, key_path


def _ca_key_path(pki: Pki) -> Path:
    return pki.path("ca.key")
