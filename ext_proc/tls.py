"""Transport security of the gRPC listener: credentials and the plaintext guard.

The sidecar sees every header Envoy forwards, credentials included, so its
listener is loopback-only unless it speaks TLS (optionally mTLS: Envoy presents
a client certificate signed by ``server.tls_client_ca_file``) or the operator
opts in to plaintext explicitly. Certificates are read once, at startup, here
and not in a constructor (the settings models do no I/O).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
from loguru import logger

from ext_proc.config.core import ServerSettings, is_loopback, split_host_port

if TYPE_CHECKING:
    from ext_proc.h2grpc import Server

_PEM_MARKER: Final = b"-----BEGIN "


class TransportSecurityError(OSError):
    """The listener cannot start as configured (the CLI reports it and exits 2)."""


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes read from the configured files."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None
    require_client_cert: bool = True
    certificate_file: Path | None = None  # where certificate_chain/private_key were read
    key_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None and self.require_client_cert,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same policy for the h2 engine: TLS 1.2+, ALPN h2, client CA when set."""
        if self.certificate_file is None or self.key_file is None:
            raise TransportSecurityError("TLS material without its files")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION  # RFC 9113 9.2
        try:
            context.load_cert_chain(self.certificate_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise TransportSecurityError(
                f"server.tls_cert_file/tls_key_file: not a matching pair ({exc})") from None
        context.set_alpn_protocols(["h2"])
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            context.verify_mode = (ssl.CERT_REQUIRED if self.require_client_cert
                                   else ssl.CERT_OPTIONAL)
        return context


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TransportSecurityError(
            f"server.{what} {str(path)!r}: cannot read ({exc.strerror or exc})") from None
    if _PEM_MARKER not in data:
        raise TransportSecurityError(f"server.{what} {str(path)!r}: not a PEM file")
    return data


def load_server_tls(settings: ServerSettings) -> ServerTls | None:
    """The listener's TLS material, or None when TLS is off.

    Raises `TransportSecurityError` naming the setting when a file is unreadable
    or not PEM (grpc itself would only say that the port failed to bind)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file
    return ServerTls(
        certificate_chain=_read_pem(settings.tls_cert_file, "tls_cert_file"),
        private_key=_read_pem(settings.tls_key_file, "tls_key_file"),
        client_ca=_read_pem(client_ca, "tls_client_ca_file") if client_ca else None,
        require_client_cert=settings.require_client_cert,
        certificate_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
    )


def check_listen_security(settings: ServerSettings) -> None:
    """Refuse a plaintext listener on a non-loopback address unless opted in.

    With ``server.allow_insecure_non_loopback`` it starts and logs a warning;
    without, `TransportSecurityError` says which settings fix it."""
    if settings.tls_enabled:
        return
    host, _ = split_host_port(settings.listen)
    if is_loopback(host):
        return
    if not settings.allow_insecure_non_loopback:
        raise TransportSecurityError(
            f"server.listen {settings.listen!r} is not loopback and TLS is off: set "
            "server.tls_cert_file and server.tls_key_file (EXTPROC_SERVER__TLS_CERT_FILE, "
            "EXTPROC_SERVER__TLS_KEY_FILE), or accept plaintext with "
            "server.allow_insecure_non_loopback=true (EXTPROC_SERVER__ALLOW_INSECURE_NON_LOOPBACK)"
        )
    logger.warning(
        "plaintext gRPC listener on a non-loopback address: request headers, credentials "
        "included, cross the network unencrypted", listen=settings.listen)


def bind(server: grpc.aio.Server | Server, settings: ServerSettings) -> int:
    """Add the listening port (secure when TLS is configured); returns the bound port."""
    check_listen_security(settings)
    tls = load_server_tls(settings)
    try:
        if tls is None:
            return server.add_insecure_port(settings.listen)
        if isinstance(server, grpc.aio.Server):
            port = server.add_secure_port(settings.listen, tls.credentials())
        else:
            port = server.add_secure_port(settings.listen, tls.ssl_context())
    except RuntimeError as exc:  # grpc reports bind failures (and bad key pairs) this way
        raise OSError(f"cannot listen on {settings.listen}") from exc
    except OSError as exc:  # the h2 engine binds itself
        if isinstance(exc, TransportSecurityError):
            raise
        raise OSError(f"cannot listen on {settings.listen}: {exc.strerror or exc}") from exc
    logger.info("TLS listener", mutual=tls.client_ca is not None,
                client_cert_required=tls.client_ca is not None and tls.require_client_cert)
    return port
