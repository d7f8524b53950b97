"""Settings for the server, the log output and per-stream behaviour."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); raise ValueError when malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return host.removeprefix("[").removesuffix("]"), port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseModel):
    model_config = _FROZEN

    listen: str = Field("127.0.0.1:50051", description="gRPC listen address, HOST:PORT.")
    grace_s: float = Field(
        5.0, ge=0, le=300,
        description="Seconds in-flight streams get to finish on SIGTERM/SIGINT.",
    )
    max_concurrent_streams: int = Field(
        10_000, ge=1, description="HTTP/2 streams the gRPC server accepts per connection.",
    )
    workers: int = Field(
        1, ge=1, le=256,
        description=(
            "Sidecar processes sharing the listen port (SO_REUSEPORT) under a supervisor "
            "that restarts a dead one; use with envoy/envoy-workers.yaml's cluster settings "
            "so Envoy spreads its streams over several connections."
        ),
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="Event loop: auto (uvloop when installed), asyncio, or uvloop (required).",
    )
    engine: Literal["h2", "grpcio"] = Field(
        "h2",
        description=(
            "gRPC server: h2 (HTTP/2 on the event loop, ext_proc.h2grpc: ~50 % less CPU "
            "per request, 2x the throughput; see bench/README.md) or grpcio "
            "(grpc.aio)."
        ),
    )
    http2_layer: Literal["builtin", "h2"] = Field(
        "builtin",
        description=(
            "h2 engine: the HTTP/2 protocol layer under it: builtin (ext_proc.h2grpc.http2, "
            "written for a gRPC server: 0.10-0.12x the h2 library's CPU per stream, 24-42 % "
            "less sidecar CPU per request behind Envoy; see bench/README.md) or h2 (the h2 "
            "library, the layer of every release before 0.2.0: a fallback)."
        ),
    )
    max_backlog: int = Field(
        512, ge=1,
        description=(
            "h2 engine: ext_proc streams waiting to be served (those one read from Envoy "
            "brings in together wait for the ones before them) beyond which new ones are "
            "answered UNAVAILABLE at once (Envoy lets those requests through untraced), so "
            "an overloaded sidecar serves fresh streams within Envoy's message_timeout, not "
            "stale ones, and its memory stays bounded. Counted in extproc.stream.shed."
        ),
    )
    max_receive_message_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024,
        description=(
            "Largest ext_proc message accepted (grpc.max_receive_message_length); a larger "
            "one fails that stream with RESOURCE_EXHAUSTED, others continue."
        ),
    )
    tls_cert_file: Path | None = Field(
        None,
        description=(
            "PEM certificate chain of the gRPC listener. With tls_key_file it turns on TLS; "
            "read once at startup."
        ),
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key matching tls_cert_file.",
    )
    tls_client_ca_file: Path | None = Field(
        None,
        description=(
            "PEM CA bundle that client (Envoy) certificates are verified against: mTLS. "
            "Needs tls_cert_file and tls_key_file."
        ),
    )
    require_client_cert: bool = Field(
        True,
        description=(
            "With tls_client_ca_file: refuse clients without a valid certificate. False "
            "verifies a certificate only when one is presented."
        ),
    )
    allow_insecure_non_loopback: bool = Field(
        False,
        description=(
            "Allow a plaintext listener on a non-loopback address (a warning is logged). "
            "Without it the sidecar refuses to start there unless TLS is configured."
        ),
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("server.tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


class LogSettings(BaseModel):
    model_config = _FROZEN

    format: Literal["json", "console"] = Field(
        "json", description="json: one JSON object per line; console: human-readable.",
    )
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level written.",
    )
    access_log: bool = Field(True, description="Write one access line per request.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class StreamSettings(BaseModel):
    model_config = _FROZEN

    graceful_close: bool = Field(
        True,
        description=(
            "Envoy runs with the runtime flag envoy.reloadable_features."
            "ext_proc_graceful_grpc_close (our configs do), so a normal exchange ends with a "
            "clean stream close and a reset after the response started means the response "
            "was cut short (span marked error.type=response_incomplete). Set false for an "
            "Envoy without the flag, where every stream ends with a reset."
        ),
    )
    join_access_log: bool = Field(
        True,
        description=(
            "Serve Envoy's gRPC access log (envoy.access_loggers.http_grpc to this sidecar, "
            "as envoy/envoy.yaml does) and end each span only once Envoy's own entry for the "
            "request arrived: its final flags reveal a response cut short after its headers "
            "(UR/UC/UPE/DC), and give http.response.body.size. Without an access-log stream "
            "from Envoy, spans end at once. With the lean envoy/envoy.yaml the access log "
            "is where the response comes from: the sidecar asks Envoy for the response "
            "phase (mode_override) whenever no join is possible (this off, or no stream)."
        ),
    )
    join_timeout_s: float = Field(
        1.0, gt=0, le=30,
        description="How long a closed exchange whose response was seen waits for Envoy's "
                    "access-log entry.",
    )
    response_wait_s: float = Field(
        300.0, gt=0, le=86_400,
        description=(
            "How long an exchange whose stream closed before any response waits for "
            "Envoy's access-log entry, which comes when the request ends: with an Envoy "
            "that skips the response phase (the lean envoy/envoy.yaml) that is every request, "
            "so set it above your longest request."
        ),
    )
    upstream_span: bool = Field(
        False,
        description=(
            "Also record a CLIENT span for the upstream call (from our answer to the request "
            "headers until the response headers); its id is what goes upstream. Per route: "
            "x-extproc-otel-upstream-span: on|off."
        ),
    )
    phase_spans: bool = Field(
        False,
        description=(
            "Give the SERVER span children from Envoy's own timings in its access log "
            "(needs join_access_log and Envoy's gRPC access log): filters (INTERNAL, request "
            "start to first byte sent upstream), upstream (CLIENT, first byte sent to last "
            "byte received; its id is what goes upstream, so it replaces upstream_span) and "
            "response (INTERNAL, first to last byte sent to the client); see docs/tracing.md. "
            "Per route: x-extproc-otel-phase-spans: on|off."
        ),
    )
    attributes_namespace: str = Field(
        "envoy.filters.http.ext_proc",
        description="Key of ProcessingRequest.attributes that holds Envoy's attributes.",
    )
    metadata_namespace: str = Field(
        "extproc_otel",
        description=(
            "Our dynamic-metadata namespace: per-route settings are read from it "
            "(metadata_options.forwarding_namespaces) and trace ids are written to it "
            "(receiving_namespaces) for Envoy's access log."
        ),
    )
