"""CLI and configuration: precedence, check-config, clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ext_proc.cli import main
from ext_proc.config import ConfigError, load_settings
from ext_proc.config.core import ServerSettings, is_loopback, split_host_port
from ext_proc.dev.devstack import free_port


def test_defaults_listen_on_loopback() -> None:
    settings = load_settings()
    assert settings.server.listen == ServerSettings.model_fields["listen"].default
    host, port = split_host_port(settings.server.listen)
    assert is_loopback(host) and port > 0


def test_precedence_init_over_env_over_yaml(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    from_yaml, from_env, from_init = (f"127.0.0.1:{free_port()}" for _ in range(3))
    config.write_text(f"server:\n  listen: {from_yaml}\n  grace_s: 3\nlog:\n  level: DEBUG\n")
    assert load_settings(config).server.listen == from_yaml
    monkeypatch.setenv("EXTPROC_SERVER__LISTEN", from_env)
    settings = load_settings(config)
    assert settings.server.listen == from_env
    assert settings.server.grace_s == 3  # the rest of the file still applies
    assert settings.log.level == "DEBUG"
    assert load_settings(config, server={"listen": from_init}).server.listen == from_init


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("server:\n  listen: nowhere\n", "server.listen (env EXTPROC_SERVER__LISTEN)"),
    ("server:\n  grace_s: -1\n", "server.grace_s"),
    ("server:\n  bogus: 1\n", "server.bogus"),
    ("log:\n  format: xml\n", "log.format"),
])
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert needle in str(err.value)


def test_unparsable_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings(tmp_path / "missing.yaml")


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    listen = f"127.0.0.1:{free_port()}"
    config.write_text(f"server:\n  listen: {listen}\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)],
                                env={"EXTPROC_LOG__LEVEL": "WARNING"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["server"]["listen"] == listen
    assert shown["log"]["level"] == "WARNING"


def test_check_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  listen: localhost\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code == 2
    assert "server.listen" in result.output and "HOST:PORT" in result.output


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "ext_proc", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "serve" in out and "check-config" in out


def test_serve_refuses_an_address_it_cannot_bind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc", "serve", "--listen", "203.0.113.1:1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_check_config_masks_secrets() -> None:
    secret = "canary-hmac-secret-0123456789"
    result = CliRunner().invoke(main, ["check-config"],
                                env={"EXTPROC_REDACTION__HMAC_SECRET": secret})
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    assert json.loads(result.output)["redaction"]["hmac_secret"] == "**********"


def test_a_bad_secret_is_not_echoed_in_the_error() -> None:
    result = CliRunner().invoke(main, ["check-config"],
                                env={"EXTPROC_REDACTION__HMAC_SECRET": "tiny-canary"})
    assert result.exit_code == 2  # too short for an HMAC key
    assert "redaction.hmac_secret" in result.output and "tiny-canary" not in result.output


@pytest.mark.parametrize("env", [
    {"OTEL_TRACES_EXPORTER": "bogus"},
    {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    {"OTEL_METRICS_EXPORTER": "statsd"},
])
def test_check_config_refuses_what_serve_would_refuse(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["check-config"], env=env)
    assert result.exit_code == 2
    assert next(iter(env)) in result.output or "OTEL_EXPORTER_OTLP_PROTOCOL" in result.output


def test_check_config_shows_otel_variables_with_headers_masked() -> None:
    result = CliRunner().invoke(main, ["check-config"], env={
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20canary-token",
        "OTEL_SERVICE_NAME": "edge"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["otel_environment"]
    assert shown["OTEL_SERVICE_NAME"] == "edge"
    assert "canary-token" not in result.output


def test_misspelt_variables_are_reported_not_silently_ignored() -> None:
    from ext_proc.config.reference import unknown_env_vars

    env = {"EXTPROC_SERVR__LISTEN": "x", "EXTPROC_SERVER__LISTEN": "127.0.0.1:1",
           "EXTPROC_SAMPLING__TENANTS__ACME__RATIO": "0.5", "EXTPROC_CONFIG_FILE": "f",
           "HOME": "/root"}
    assert unknown_env_vars(env) == ["EXTPROC_SERVR__LISTEN"]
    result = CliRunner().invoke(main, ["check-config"], env={"EXTPROC_SERVR__LISTEN": "x"})
    assert result.exit_code == 0  # an unknown section: warned about
    assert "EXTPROC_SERVR__LISTEN names no setting" in result.output
    nested = CliRunner().invoke(main, ["check-config"], env={"EXTPROC_LOG__LEVL": "DEBUG"})
    assert nested.exit_code == 2 and "log.levl" in nested.output  # a known section: an error


def test_top_level_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "list.yaml"
    config.write_text("- server\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(config)


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_LOG__LEVEL", "debug")
    assert load_settings().log.level == "DEBUG"
