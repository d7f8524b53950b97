"""Configuration: one pydantic model per concern, composed into `Settings`.

Precedence (highest first): explicit init values (CLI flags), ``EXTPROC_*``
environment variables (nested with ``__``), the YAML file, defaults. The
standard ``OTEL_*`` variables are read by the OpenTelemetry SDK itself.
Models are frozen and do no I/O; `load_settings` is the one place that reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ext_proc.config.core import LogSettings, ServerSettings, StreamSettings
from ext_proc.config.propagation import PropagationSettings
from ext_proc.config.redaction import RedactionSettings
from ext_proc.config.sampling import SamplingSettings, TenantSettings
from ext_proc.config.telemetry import AdminSettings, MetricsSettings, OtlpLogsSettings

ENV_PREFIX = "EXTPROC_"
ENV_DELIMITER = "__"

__all__ = [
    "ENV_PREFIX",
    "AdminSettings",
    "ConfigError",
    "LogSettings",
    "MetricsSettings",
    "OtlpLogsSettings",
    "PropagationSettings",
    "RedactionSettings",
    "SamplingSettings",
    "ServerSettings",
    "Settings",
    "StreamSettings",
    "TenantSettings",
    "load_settings",
]


class Settings(BaseSettings):
    """Everything the sidecar can be told. Each section maps to a YAML key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        frozen=True,
        extra="forbid",
        yaml_file=None,
        hide_input_in_errors=True,  # a bad secret must not be echoed back
    )

    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    stream: StreamSettings = StreamSettings()
    propagation: PropagationSettings = PropagationSettings()
    sampling: SamplingSettings = SamplingSettings()
    tenants: TenantSettings = TenantSettings()
    redaction: RedactionSettings = RedactionSettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings = AdminSettings()
    otlp_logs: OtlpLogsSettings = OtlpLogsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


class ConfigError(Exception):
    """A configuration that cannot be used; the message names every bad key."""


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the setting at `loc`."""
    return ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in loc)


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(part) for part in loc) or "<root>"
        lines.append(f"{key} (env {env_name(loc)}): {err['msg']}")
    return "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build `Settings` from defaults, an optional YAML file, env vars and `overrides`.

    `overrides` uses nested dicts, e.g. ``server={"listen": "0.0.0.0:50051"}``.
    Raises `ConfigError` with a message naming each bad key.
    """
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file}: not a readable file")
        try:
            top = yaml.safe_load(config_file.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        if top is not None and not isinstance(top, dict):
            raise ConfigError(f"config file {config_file}: the top level must be a mapping "
                              "of sections (server:, log:, ...)")
        config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})
        cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:  # unreadable or unparsable YAML
        raise ConfigError(f"config file {config_file}: {exc}") from None
