"""Settings for RED metrics, the admin HTTP endpoint and OTLP log export.

Which exporters run is chosen by the standard ``OTEL_METRICS_EXPORTER`` /
``OTEL_LOGS_EXPORTER`` variables (read by `ext_proc.telemetry.metrics` and
`ext_proc.telemetry.otlp_logs`); these models hold what the OTel variables do not cover.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ext_proc.config.core import is_loopback, split_host_port

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class MetricsSettings(BaseModel):
    model_config = _FROZEN

    enabled: bool = Field(
        True, description="Record RED metrics (http.server.request.duration, active requests).",
    )
    cardinality_limit: int = Field(
        2000, ge=1, le=1_000_000,
        description=(
            "Distinct attribute sets kept per metric; further sets are folded into one "
            "point labelled otel.metric.overflow=true."
        ),
    )
    route_placeholder: str = Field(
        "_OTHER", min_length=1, max_length=64,
        description="http.route value used when the route template is unknown or absent.",
    )
    max_route_length: int = Field(
        128, ge=1, le=4096,
        description="Route templates longer than this are recorded as the placeholder.",
    )
    exemplars: bool = Field(
        True, description="Attach trace_id/span_id exemplars of sampled spans to measurements.",
    )
    tenant_attribute: bool = Field(
        False, description="Add tenant.id to the RED metrics (bounded by cardinality_limit).",
    )
    self_telemetry: bool = Field(
        True,
        description=(
            "Export the sidecar's own health: span pipeline (processed, dropped, exported, "
            "failed, queue size, export duration), active streams, per-phase time, rejected "
            "trace-context headers."
        ),
    )


class AdminSettings(BaseModel):
    model_config = _FROZEN

    listen: str | None = Field(
        None,
        description=(
            "HOST:PORT of the admin HTTP endpoint (/healthz, /readyz, /metrics, /config); "
            "off when unset. Port 0 picks a free port."
        ),
    )
    allow_non_loopback: bool = Field(
        False, description="Allow the admin endpoint on a non-loopback address.",
    )
    metrics: bool = Field(True, description="Serve the Prometheus scrape endpoint /metrics.")
    config: bool = Field(True, description="Serve the effective configuration at /config.")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @model_validator(mode="after")
    def _check_loopback(self) -> AdminSettings:
        if self.listen is not None and not self.allow_non_loopback:
            host, _ = split_host_port(self.listen)
            if not is_loopback(host):
                raise ValueError(
                    f"admin.listen {self.listen!r} is not loopback; "
                    "set admin.allow_non_loopback to expose it"
                )
        return self


class OtlpLogsSettings(BaseModel):
    model_config = _FROZEN

    enabled: bool = Field(
        False,
        description=(
            "Also send log records through the OpenTelemetry logs SDK (exporter from "
            "OTEL_LOGS_EXPORTER: otlp, console or none). stdout stays on."
        ),
    )
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level sent through OTLP.",
    )
