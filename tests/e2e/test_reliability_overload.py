"""Issue #8: more concurrent streams than the sidecar can serve, and a short soak.

Overload: 256 keep-alive connections without pacing against a route Envoy
answers itself (``direct_response``: the ext_proc filter still runs both
phases), so Envoy and the sidecar carry the whole load and the sidecar, one
Python event loop, is the bottleneck. Envoy's ``message_timeout`` keeps traffic
flowing; the sidecar must stay alive and trace again once load drops. The timeout
is 20 ms here, not the shipped 200 ms: the sidecar now answers 256 queued streams
within 200 ms on this box, so only the tighter bound shows an overload for sure,
while light load (answers in ~1 ms) stays within it. ``server.max_backlog`` is
scaled down with it (the default 512 suits 200 ms): the sidecar sheds what it
cannot serve in time, so its backlog, and memory, stay bounded (without shedding
its RSS peaked 190 MiB above the baseline and kept 87 MiB of it).
The sidecar answers with ``traceresponse``, so each sample says whether the
sidecar's response mutation arrived in time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from bench.variants import EXT_PROC_FILTER
from ext_proc.dev.devstack import Config, hcm_of, wait_until
from ext_proc.dev.loadgen import Load
from ext_proc.dev.soak import ACTIVE_REQUESTS, STREAMS_ACTIVE, SoakConfig, run_soak
from tests.e2e.reliability import (
    FAILURE_ALLOWED,
    MESSAGE_TIMEOUTS,
    STREAMS_FAILED,
    deltas,
    direct_route,
    record,
    rig,
)

pytestmark = pytest.mark.e2e

OVERLOAD_CONNECTIONS: Final = 256
OVERLOAD_S: Final = 8.0
# Stated bound: RSS after recovery at most this far above the pre-load baseline. The
# 20 ms flood pushes ~60,000 streams through in 8 s; CPython keeps the arenas of that
# peak (+26 to +37 MiB measured). Three floods in a row kept +37, +37, +45 MiB: a
# plateau, not a per-request leak (docs/reliability.md, section 5).
MAX_RSS_RETAINED_KIB: Final = 64 * 1024


def _peak(read: Callable[[], int], stop: threading.Event, out: list[int]) -> threading.Thread:
    def sample() -> None:
        while not stop.wait(0.25):  # a measurement cadence
            out.append(read())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


OVERLOAD_MESSAGE_TIMEOUT: Final = "0.02s"
OVERLOAD_BACKLOG: Final = "32"  # streams: ~20 ms of work at ~0.3 ms each, at most
SHED: Final = "extproc_stream_shed_total"


def _direct_route_tight_timeout(config: Config) -> None:
    direct_route(config)
    for http_filter in hcm_of(config)["http_filters"]:
        if http_filter["name"] == EXT_PROC_FILTER:
            http_filter["typed_config"]["message_timeout"] = OVERLOAD_MESSAGE_TIMEOUT


def test_overload_keeps_traffic_flowing_and_recovers(tmp_path: Path) -> None:
    env = {"EXTPROC_PROPAGATION__RESPONSE": "traceresponse",
           # response_wait_s stays at its default (300 s): an exchange that closes while
           # Envoy times out on the sidecar waits only the join's OVERLOAD_WAIT_S for an
           # entry Envoy may have dropped, so recovery is bounded without a shorter wait
           "EXTPROC_SERVER__MAX_BACKLOG": OVERLOAD_BACKLOG}
    with rig(tmp_path, sidecar_env=env, mutate_config=_direct_route_tight_timeout) as r:
        probe = r.probe
        warm = Load(r.url("/direct", f"warm{r.tag}"), 4, duration_s=2.0, rate=50.0,
                    marker_header="traceresponse").run()
        assert warm.failed == () and any(s.marked for s in warm.samples)
        baseline = probe.rss_kib()
        before = r.envoy_stats(MESSAGE_TIMEOUTS, FAILURE_ALLOWED, STREAMS_FAILED)
        stop, rss = threading.Event(), [baseline]
        sampler = _peak(probe.rss_kib, stop, rss)
        flood = Load(r.url("/direct"), OVERLOAD_CONNECTIONS, duration_s=OVERLOAD_S,
                     marker_header="traceresponse").run()
        stop.set()
        sampler.join(5)
        counted = deltas(before, r.envoy_stats(MESSAGE_TIMEOUTS, FAILURE_ALLOWED,
                                               STREAMS_FAILED))

        assert r.stack.sidecar.alive()
        assert flood.failed == (), flood.failed[:5]
        assert counted[MESSAGE_TIMEOUTS] + counted[STREAMS_FAILED] > 0  # could not keep up
        shed = probe.value(SHED)
        assert shed > 0  # it shed load: refused streams, counted
        traced = sum(s.marked for s in flood.samples)  # recorded: few, at 20 ms on 2 cores
        # recovery: per-stream state drains, light load is fully traced again
        wait_until(lambda: probe.value(STREAMS_ACTIVE) == 0
                   and probe.value(ACTIVE_REQUESTS, {"http_request_method": "GET"}) == 0,
                   20, "streams to drain after the flood")
        calm_tag = f"calm{r.tag}"
        calm = Load(r.url("/direct", calm_tag), 4, duration_s=2.0, rate=50.0,
                    marker_header="traceresponse").run()
        assert calm.failed == () and sum(s.marked for s in calm.samples) >= 0.95 * len(
            calm.samples)
        wanted = {s.seq for s in calm.samples if s.marked}
        assert r.receiver.wait_for(lambda: wanted <= set(r.spans(calm_tag)), 15)
        retained = probe.rss_kib() - baseline
        record("overload", connections=OVERLOAD_CONNECTIONS, seconds=OVERLOAD_S,
               requests=len(flood.samples), rps=flood.summary()["rps"],
               failed=len(flood.failed), traced=traced, shed=shed,
               envoy=counted, p50_ms=flood.latency_ms(50), p99_ms=flood.latency_ms(99),
               max_ms=flood.latency_ms(100), rss_baseline_kib=baseline,
               rss_peak_kib=max(rss), rss_after_kib=baseline + retained,
               calm_p50_ms=calm.latency_ms(50))
        assert retained <= MAX_RSS_RETAINED_KIB


def test_short_soak_leaves_no_stream_state(tmp_path: Path) -> None:
    """`make soak` in miniature: the report is complete and nothing per stream leaks."""
    config = SoakConfig(seconds=6.0, connections=4, rate=50.0, warmup_seconds=2.0)
    report = run_soak(config, tmp_path)
    assert report.requests >= 250 and report.failed == 0
    # the warm-up's plateau and the steady state's window (4-6 s) are reported apart
    assert report.rss_start_kib > 0 and report.rss_warm_kib > 0
    assert 0 < report.steady_requests < report.requests and report.steady_rps > 0
    assert report.traced >= 0.98 * report.requests  # sporadic message timeouts: see docs
    assert report.streams_active_end == 0 and report.active_requests_end == 0
    assert report.queue_size_end == 0 and report.spans_dropped == 0
    assert report.traced <= report.spans_exported <= report.requests
    assert report.rss_start_kib > 0 and report.rss_max_kib >= report.rss_start_kib
    record("soak_smoke", **{k: v for k, v in vars(report).items()})
