"""Issue #9: a 4 s collector stall at saturation loses no span at the default queue.

The bench's pieces (fast upstream, span counter, shipped Envoy config, one sidecar
with no OTEL_BSP_* set): wrk drives the gateway closed-loop while the collector
hangs every trace export for 4 s; afterwards every request Envoy saw has its span.

How many spans a 4 s stall holds depends on the box: 2,700 req/s filled 10,700 of
the 16,384 slots in Nov, a CI box at 4,600 req/s overfilled them (18,476 requests,
1,770 spans dropped, as designed). The load is therefore capped at three quarters of
the queue, still six times the SDK's default queue: the test asserts that whatever
fits in the queue survives the stall, and the docs state the queue in seconds at
the measured rate.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.load import run_wrk
from bench.run import FAILED_OPEN_STAT, REQUESTS_STAT, Bench, BenchOptions
from ext_proc.dev.devstack import Proc, wait_until
from ext_proc.dev.procs import envoy_stat
from ext_proc.telemetry.metrics.spans import DEFAULT_QUEUE_SIZE

pytestmark = pytest.mark.e2e

STALL_S = 4.0
SDK_DEFAULT_QUEUE = 2048  # what the prototype lost 22 % of its spans with
STALL_LOAD = DEFAULT_QUEUE_SIZE * 3 // 4  # requests at most during the stall


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _exchanges(sidecar: Proc) -> int:
    return sum(1 for line in sidecar.json_lines() if line.get("msg") == "access")


def test_a_4s_collector_stall_at_saturation_loses_no_span(tmp_path: Path) -> None:
    with Bench(BenchOptions(), tmp_path) as bench, \
            bench.started("sidecar", tmp_path) as running:
        sidecar, admin, url = running.sidecar, running.ports.admin, running.url
        assert sidecar is not None and sidecar.popen is not None
        run_wrk(url, 1, tmp_path, threads=1, connections=4)  # warm up, exports flowing
        rss_before = _rss_kib(sidecar.popen.pid)

        bench.receiver.stall()
        stalled_at = time.monotonic()
        during = run_wrk(url, STALL_S, tmp_path, threads=2, connections=32,
                         max_requests=STALL_LOAD)
        wait_until(lambda: time.monotonic() - stalled_at >= STALL_S, STALL_S + 5,
                   "the stall's full length")
        rss_during = _rss_kib(sidecar.popen.pid)
        bench.receiver.resume()
        stalled_s = time.monotonic() - stalled_at

        # wrk's last requests (cut off as it stops) are done before anything is counted
        wait_until(lambda: envoy_stat(admin, "http.ingress.downstream_rq_active") == 0, 10,
                   "Envoy's requests to finish")
        requests = envoy_stat(admin, REQUESTS_STAT)
        failed_open = envoy_stat(admin, FAILED_OPEN_STAT)
        # and the sidecar has caught up with its backlog (the client aborts among
        # them included), so SIGTERM refuses no stream Envoy had already opened
        wait_until(lambda: _exchanges(sidecar) >= requests - failed_open, 15,
                   "the sidecar to finish every exchange")
        assert sidecar.stop(timeout=30) == 0  # SIGTERM: drain the queue, flush
        spans = bench.receiver.wait_for(requests, 30)
    # (wrk's rate is its count over the whole 4 s: below the box's when the cap held)
    print(f"\ncollector stalled {stalled_s:.1f} s: {during.requests} requests meanwhile "
          f"(cap {STALL_LOAD}, {during.rps:,.0f} req/s), queue {DEFAULT_QUEUE_SIZE}; spans "
          f"{spans} / requests {requests}, failed open {failed_open}; sidecar RSS "
          f"{rss_before} -> {rss_during} KiB")
    assert stalled_s >= STALL_S
    # the stall held more spans than the SDK's default queue: the test means something
    assert during.requests > SDK_DEFAULT_QUEUE
    assert during.requests < DEFAULT_QUEUE_SIZE  # the cap held: nothing had to drop
    assert during.errors == 0
    assert spans == requests - failed_open  # every traced request's span arrived
    assert failed_open <= requests // 1000
    assert rss_during - rss_before < 64 * 1024
