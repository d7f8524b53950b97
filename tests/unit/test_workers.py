"""`serve --workers N`: the supervisor's pure parts, and SO_REUSEPORT only with workers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from ext_proc.app import build_sidecar
from ext_proc.cli import main
from ext_proc.config import Settings, load_settings
from ext_proc.dev.devstack import free_port
from ext_proc.telemetry.provider import build_telemetry
from ext_proc.workers import RestartPolicy, format_listen, reserve_port, worker_settings


@pytest.fixture(autouse=True)
def _no_exporters(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"):
        monkeypatch.setenv(name, "none")
    yield


def test_backoff_doubles_for_quick_deaths_up_to_the_cap() -> None:
    policy = RestartPolicy(initial_s=0.1, max_s=1.0, stable_s=10.0)
    delays = [0.0]
    for _ in range(6):
        delays.append(policy.delay(delays[-1], uptime_s=0.5))
    assert delays[1:] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_resets_after_a_worker_stayed_up() -> None:
    policy = RestartPolicy(initial_s=0.1, max_s=5.0, stable_s=10.0)
    assert policy.delay(4.0, uptime_s=10.0) == 0.1
    assert policy.delay(4.0, uptime_s=9.9) == 5.0


def test_format_listen_brackets_ipv6() -> None:
    assert format_listen("127.0.0.1", 5) == "127.0.0.1:5"
    assert format_listen("::1", 5) == "[::1]:5"


def test_reservation_resolves_port_zero_and_holds_the_port_for_reuseport_only() -> None:
    held, listen = reserve_port("127.0.0.1:0")
    with held:
        port = int(listen.rpartition(":")[2])
        assert port > 0 and listen == f"127.0.0.1:{port}"
        with socket.socket() as sharer:  # a worker binds with SO_REUSEPORT: allowed
            sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharer.bind(("127.0.0.1", port))
            sharer.listen()
        with socket.socket() as stranger, pytest.raises(OSError):
            stranger.bind(("127.0.0.1", port))  # anyone else: the port is taken


def test_reservation_of_a_taken_port_fails() -> None:
    with socket.socket() as owner:
        owner.bind(("127.0.0.1", 0))
        owner.listen()
        with pytest.raises(OSError):
            reserve_port(f"127.0.0.1:{owner.getsockname()[1]}")


def test_worker_settings_round_trip_with_the_resolved_port_and_offset_admin_port() -> None:
    admin, resolved = free_port(), free_port()
    settings = load_settings(
        server={"listen": "127.0.0.1:0", "workers": 3}, admin={"listen": f"127.0.0.1:{admin}"},
        redaction={"hmac_secret": "s3cret-s3cret-s3cret-s3cret-s3cret"})
    dump = worker_settings(settings, f"127.0.0.1:{resolved}", index=2)
    rebuilt = Settings(**dump)
    assert rebuilt.server.listen == f"127.0.0.1:{resolved}"
    assert rebuilt.admin.listen == f"127.0.0.1:{admin + 2}"
    assert rebuilt.server.workers == 3
    secret = rebuilt.redaction.hmac_secret
    assert isinstance(secret, SecretStr)
    assert secret.get_secret_value() == "s3cret-s3cret-s3cret-s3cret-s3cret"
    assert rebuilt.model_dump(exclude={"server", "admin"}) == \
        settings.model_dump(exclude={"server", "admin"})


def test_worker_settings_keep_admin_port_zero() -> None:
    settings = load_settings(server={"workers": 2}, admin={"listen": "127.0.0.1:0"})
    assert worker_settings(settings, "127.0.0.1:1", 1)["admin"]["listen"] == "127.0.0.1:0"


def test_cli_rejects_zero_workers_naming_the_setting() -> None:
    result = CliRunner().invoke(main, ["serve", "--workers", "0"])
    assert result.exit_code == 2
    assert "server.workers" in result.output


@pytest.mark.parametrize(("workers", "shared"), [(1, False), (2, True)])
async def test_port_is_shared_only_with_several_workers(workers: int, shared: bool) -> None:
    settings = load_settings(server={"listen": f"127.0.0.1:{free_port()}", "workers": workers})
    first = build_sidecar(settings, build_telemetry(from_env=False))
    second = build_sidecar(settings, build_telemetry(from_env=False))
    await first.start()
    try:
        if shared:
            assert await second.start() == first.port
            await second.stop()
        else:
            with pytest.raises(OSError):
                await second.start()
    finally:
        await first.stop()


def test_envoy_workers_yaml_is_envoy_full_yaml_with_only_the_processor_cluster_changed(
) -> None:
    """The scale-out bootstrap is generated, so it cannot drift from the reference one;
    it sends every response phase (a request's access-log entry may reach another
    worker than its stream)."""
    import yaml

    from bench.variants import WORKERS_STREAMS, WORKERS_YAML, render_workers_yaml
    from ext_proc.dev.devstack import FULL_YAML

    assert WORKERS_YAML.read_text() == render_workers_yaml(FULL_YAML.read_text()), \
        "envoy/envoy-workers.yaml is stale: run `.venv/bin/python -m bench.variants`"
    base = yaml.safe_load(FULL_YAML.read_text())
    spread = yaml.safe_load(WORKERS_YAML.read_text())

    def h2(config: Any) -> Any:
        cluster = next(c for c in config["static_resources"]["clusters"]
                       if c["name"] == "extproc_otel")
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        return options.pop("http2_protocol_options")

    assert h2(spread) == {"max_concurrent_streams": WORKERS_STREAMS}
    assert h2(base) == {}
    assert spread == base


def test_workers_yaml_render_needs_the_processor_cluster() -> None:
    from bench.variants import render_workers_yaml

    assert render_workers_yaml("admin: {}\nstatic_resources: {}\n") is None
