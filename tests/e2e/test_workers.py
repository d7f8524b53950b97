"""Issue #9: ``serve --workers N`` on real processes (and behind a real Envoy)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import ROOT, Proc, Stack, free_port, wait_until
from ext_proc.dev.procs import grpc_health
from tests.conftest import http_request
from tests.e2e.conftest import SIDECAR_SERVICE

pytestmark = pytest.mark.e2e


def _health_of(port: int) -> str:
    return grpc_health(f"127.0.0.1:{port}", timeout=2)

WORKERS = 2
QUIET = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
         "OTEL_LOGS_EXPORTER": "none"}


def _lines(proc: Proc, msg: str) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if line.get("msg") == msg]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EXTPROC_"))}
    proc = Proc("supervisor", [sys.executable, "-m", "ext_proc", "serve", "--listen",
                               f"127.0.0.1:{port}", "--workers", str(WORKERS)],
                tmp_path / "supervisor.log", {**env, **QUIET})
    proc.start()
    try:
        wait_until(lambda: len(_lines(proc, "started")) >= WORKERS, 30, "both workers")
        yield proc, port
    finally:
        proc.stop(timeout=15, sig=signal.SIGKILL)


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
        supervisor: tuple[Proc, int]) -> None:
    proc, port = supervisor
    first = {line["worker"]: line["pid"] for line in _lines(proc, "worker started")}
    assert sorted(first) == list(range(WORKERS))
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: bool(_lines(proc, "worker died; restarting")), 10, "the death noticed")
    # One worker still listens while the other restarts: the port never stops serving.
    assert [_health_of(port) for _ in range(10)] == ["SERVING"] * 10
    wait_until(lambda: len(_lines(proc, "started")) >= WORKERS + 1, 30, "the restarted worker")
    restarted = [line for line in _lines(proc, "worker started") if line["worker"] == 0]
    assert len(restarted) == 2 and restarted[1]["pid"] != first[0]
    assert _lines(proc, "worker died; restarting")[0]["exit_code"] == -signal.SIGKILL
    assert [_health_of(port) for _ in range(10)] == ["SERVING"] * 10
    assert proc.alive()


def test_sigterm_to_the_supervisor_drains_every_worker_and_exits_zero(
        supervisor: tuple[Proc, int]) -> None:
    proc, port = supervisor
    pids = [line["pid"] for line in _lines(proc, "worker started")]
    assert len(pids) == WORKERS and not any(_gone(pid) for pid in pids)
    assert proc.stop(timeout=20) == 0
    assert all(_gone(pid) for pid in pids)
    stopped = {line["worker"] for line in _lines(proc, "stopped")}
    assert stopped == set(range(WORKERS))  # each worker drained and stopped itself
    assert _health_of(port) == "UNAVAILABLE"


def test_spans_from_every_worker_arrive(tmp_path: Path) -> None:
    """Behind Envoy with envoy-workers.yaml, concurrent requests spread over the
    workers' connections, and each worker exports its own spans."""
    receiver = OtlpReceiver()
    receiver.start()
    stack = Stack(tmp_path, receiver.endpoint, sidecar_args=["--workers", str(WORKERS)],
                  envoy_source=ROOT / "envoy" / "envoy-workers.yaml")
    requests = 48  # about 24 concurrent streams per Envoy worker: several connections each
    try:
        stack.start()
        wait_until(lambda: len(_lines(stack.sidecar, "started")) >= WORKERS, 30, "workers")
        with ThreadPoolExecutor(requests) as pool:
            replies = list(pool.map(
                lambda i: http_request(stack.base_url, f"/slow?ms=300&n={i}"), range(requests)))
        # The demo upstream's listen backlog is small: under this burst Envoy may answer
        # some requests itself (503, connect failure). Those are traced too.
        assert len(replies) == requests and {r.status for r in replies} <= {200, 503}
        assert sum(r.status == 200 for r in replies) > requests // 2
        codes = stack.stop()
        assert codes["sidecar"] == 0  # SIGTERM: every worker flushed and exited 0
        spans = [s for s in receiver.spans() if s.resource.get("service.name") == SIDECAR_SERVICE
                 and s.attributes.get("url.path") == "/slow"]
        assert len(spans) == requests
        assert sorted(s.attributes.get("url.query") for s in spans) == \
            sorted(f"ms=300&n={i}" for i in range(requests))
        instances = {s.resource.get("service.instance.id") for s in spans}
        assert len(instances) == WORKERS
    finally:
        stack.stop()
        receiver.stop()
