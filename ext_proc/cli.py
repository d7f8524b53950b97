"""Command line: ``extproc-otel serve`` and ``extproc-otel check-config``.

Options map onto settings keys; their meaning and defaults live in
`ext_proc.config`, once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

import ext_proc
from ext_proc.config import ConfigError, Settings, load_settings

_config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None,
    envvar="EXTPROC_CONFIG_FILE", help="YAML settings file (env EXTPROC_CONFIG_FILE).",
)


def _load(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    from ext_proc.config.reference import unknown_env_vars

    for name in unknown_env_vars(os.environ):
        click.echo(f"warning: {name} names no setting; ignored "
                   "(see docs/configuration.md)", err=True)
    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        click.echo(f"invalid configuration:\n{exc}", err=True)
        sys.exit(2)


def _overrides(**sections: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: v for k, v in values.items() if v is not None}
            for name, values in sections.items()
            if any(v is not None for v in values.values())}


@click.group()
@click.version_option(ext_proc.__version__, prog_name="extproc-otel")
def main() -> None:
    """Envoy ext_proc sidecar that traces every request with OpenTelemetry."""


@main.command()
@_config_option
@click.option("--listen", default=None, help="gRPC listen address HOST:PORT (server.listen).")
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None,
              help="Log line format (log.format).")
@click.option("--log-level", default=None, help="Lowest log level written (log.level).")
@click.option("--admin", default=None,
              help="Admin endpoint HOST:PORT: /healthz /readyz /metrics /config (admin.listen).")
@click.option("--workers", type=int, default=None,
              help="Processes sharing the port under a supervisor (server.workers).")
def serve(config_file: Path | None, listen: str | None, log_format: str | None,
          log_level: str | None, admin: str | None, workers: int | None) -> None:
    """Run the ext_proc gRPC server until SIGTERM/SIGINT."""
    from ext_proc.app import run
    from ext_proc.telemetry.logs import configure_logging

    settings = _load(config_file, _overrides(
        server={"listen": listen, "workers": workers},
        log={"format": log_format, "level": log_level.upper() if log_level else None},
        admin={"listen": admin},
    ))
    from ext_proc.policy.sampling import RulesFileError
    from ext_proc.telemetry.otel_env import TelemetryConfigError

    configure_logging(settings.log)
    if settings.server.workers > 1:
        from ext_proc.workers import supervise

        sys.exit(supervise(settings))
    try:
        run(settings)
    except (TelemetryConfigError, RulesFileError, OSError) as exc:
        click.echo(f"cannot start: {exc}", err=True)
        sys.exit(2)


@main.command("check-config")
@_config_option
@click.option("--envoy-config", "envoy_file", type=click.Path(path_type=Path, exists=True),
              default=None, help="An Envoy config envoy-config printed: is its prefilter stale?")
def check_config(config_file: Path | None, envoy_file: Path | None) -> None:
    """Print the effective configuration (secrets masked), the sampling rules in force
    (with the rules file applied, and the prefilter's digest) and the OTEL_* variables
    (headers masked); exit 2 when `serve` would refuse any of it. With --envoy-config,
    warn when the prefilter that config carries is not the one these settings compile to."""
    from ext_proc.app import build_sampling_policy
    from ext_proc.policy.sampling import RulesFileError
    from ext_proc.telemetry.otel_env import TelemetryConfigError, otel_environment
    from ext_proc.telemetry.provider import check_exporters

    settings = _load(config_file, {})
    try:
        policy, _ = build_sampling_policy(settings)
    except RulesFileError as exc:
        click.echo(f"invalid configuration:\nsampling.rules_file: {exc}", err=True)
        sys.exit(2)
    try:
        check_exporters(settings.otlp_logs.enabled)
    except TelemetryConfigError as exc:
        click.echo(f"invalid configuration:\n{exc}", err=True)
        sys.exit(2)
    if envoy_file is not None:
        from ext_proc.policy.sampling.prefilter_watch import digest_in_envoy_config

        watch = policy.prefilter_watch
        watch.observe(digest_in_envoy_config(envoy_file.read_text()) or "")
        if watch.stale:
            carried = watch.envoy_digest or "none"
            click.echo(f"warning: the prefilter in {envoy_file} (digest {carried}) is not "
                       "the one these settings compile to; regenerate it with "
                       "`extproc-otel envoy-config`", err=True)
    shown = {**settings.model_dump(mode="json"), "sampling_active": policy.describe(),
             "otel_environment": otel_environment()}
    click.echo(json.dumps(shown, indent=2))


@main.command("envoy-config")
@_config_option
@click.option("--format", "fmt", type=click.Choice(["bootstrap", "snippet", "istio",
                                                     "envoy-gateway"]),
              default="snippet", show_default=True, help="What to print.")
@click.option("--sidecar-address", default=None,
              help="HOST:PORT Envoy dials (default: server.listen, wildcard -> 127.0.0.1).")
@click.option("--istio-context", type=click.Choice(["gateway", "sidecar"]), default="gateway",
              show_default=True, help="Istio variant: ingress gateway or app sidecar.")
def envoy_config(config_file: Path | None, fmt: str, sidecar_address: str | None,
                 istio_context: str) -> None:
    """Print the Envoy ext_proc filter + cluster for the current settings."""
    from ext_proc.envoy_config import options_for, render

    settings = _load(config_file, _overrides(server={"listen": sidecar_address}))
    click.echo(render(fmt, settings, options_for(settings, istio_context=istio_context)),  # type: ignore[arg-type]
               nl=False)
