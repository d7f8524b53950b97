"""Settings for the server, the log output and per-stream behaviour."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value


class LogSettings(BaseModel):
    model_config = _FROZEN

    format: Literal["json", "console"] = Field(
        "json", description="json: one JSON object per line; console: human-readable.",
    )
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level written.",
    )
    access_log: bool = Field(True, description="Write one access line per request.")


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
    upstream_span: bool = Field(
        False,
        description=(
            "Also record a CLIENT span for the upstream call (from our answer to the request "
            "headers until the response headers); its id is what goes upstream. Per route: "
            "x-extproc-otel-upstream-span: on|off."
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
