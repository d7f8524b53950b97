"""What the standard OTEL_* variables say: the resource, and which exporter each signal
(traces, metrics, logs) gets. Below the provider and the metrics and logs pipelines,
which all read it; it imports none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

import ext_proc

T = TypeVar("T")

DEFAULT_SERVICE_NAME: Final = "extproc-otel"


class TelemetryConfigError(ValueError):
    """An OTEL_* variable has a value we cannot use."""


def build_resource() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over our defaults: service.name
    `extproc-otel` and service.version the package's version."""
    resource = Resource({SERVICE_VERSION: ext_proc.__version__}).merge(Resource.create())
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def otlp_exporter(env: Mapping[str, str], signal: str, grpc: Callable[[], T],
                  http: Callable[[], T], error: type[TelemetryConfigError]) -> T:
    """The OTLP exporter for `signal` (TRACES, METRICS, LOGS) in the configured protocol."""
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol == "grpc":
        return grpc()
    if protocol == "http/protobuf":
        return http()
    raise error(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")


def chosen_exporter(env: Mapping[str, str], signal: str, console: Callable[[], T],
                    grpc: Callable[[], T], http: Callable[[], T],
                    error: type[TelemetryConfigError] = TelemetryConfigError) -> T | None:
    """The exporter OTEL_<signal>_EXPORTER names (otlp, console, none; default otlp)."""
    name = (env.get(f"OTEL_{signal}_EXPORTER") or "otlp").strip().lower()
    if name == "none":
        return None
    if name == "console":
        return console()
    if name != "otlp":
        raise error(f"OTEL_{signal}_EXPORTER={name!r}: use otlp, console or none")
    return otlp_exporter(env, signal, grpc, http, error)


def otel_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OTEL_* variables in force, header values masked (they carry credentials)."""
    env = os.environ if env is None else env
    return {key: ("**********" if "HEADERS" in key else value)
            for key, value in sorted(env.items()) if key.startswith("OTEL_")}
