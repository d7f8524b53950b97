"""Issue #8: the sidecar killed, stalled and stopped under load; the gateway never pays.

Envoy runs the shipped config (``failure_mode_allow: true``, ``message_timeout:
0.2s``); `ext_proc.dev.loadgen` keeps bounded keep-alive load on the echo upstream,
which lists the headers it received, so each sample says whether the sidecar's
traceparent reached the upstream.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ext_proc.dev.devstack import wait_until
from ext_proc.dev.loadgen import Load
from ext_proc.dev.soak import EXPORTED, STREAMS_ACTIVE
from tests.e2e.reliability import (
    FAILURE_ALLOWED,
    MESSAGE_TIMEOUTS,
    STREAMS_FAILED,
    TRACEPARENT_IN_BODY,
    deltas,
    record,
    rig,
)

pytestmark = pytest.mark.e2e

RATE: float = 100.0  # requests/s in total: steady, well below what the stack can serve
CONNECTIONS: int = 8


def test_sigkill_under_load_fails_no_request_and_spans_resume(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        load = Load(r.url(), CONNECTIONS, duration_s=20.0, rate=RATE,
                    marker=TRACEPARENT_IN_BODY).start()
        wait_until(lambda: load.sent() >= 100, 10, "load to be running")
        before = r.envoy_stats(FAILURE_ALLOWED, STREAMS_FAILED)
        r.signal(signal.SIGKILL)
        assert r.stack.sidecar.popen is not None
        r.stack.sidecar.popen.wait(5)
        killed = time.monotonic()
        # Envoy lets requests through untraced while nobody listens
        wait_until(lambda: r.stack.envoy_stat(FAILURE_ALLOWED) >= before[FAILURE_ALLOWED] + 50,
                   10, "requests to pass while the sidecar is down")
        restarting = time.monotonic()
        r.stack.sidecar.start()  # same port, Envoy untouched
        r.stack.wait_sidecar_ready(15)
        restarted = time.monotonic()
        wait_until(lambda: len(load.result().between(restarted + 0.5, float("inf")).samples)
                   >= 100, 10, "load after the restart")
        load.stop()
        result = load.wait()
        counted = deltas(before, r.envoy_stats(FAILURE_ALLOWED, STREAMS_FAILED))

        assert result.failed == (), result.failed[:5]
        down = result.between(killed, restarting)
        after = result.between(restarted + 0.5, float("inf"))
        assert down.samples and not any(s.marked for s in down.samples)
        assert after.samples and sum(s.marked for s in after.samples) >= 0.98 * len(
            after.samples)
        # new spans arrive for requests sent after the restart, without restarting Envoy
        wanted = {s.seq for s in after.samples if s.marked}
        assert r.receiver.wait_for(lambda: wanted <= set(r.spans()), 10), \
            f"{len(wanted - set(r.spans()))} of {len(wanted)} spans missing after restart"
        first = next(s for s in result.samples if s.started >= restarted and s.marked)
        record("sigkill", requests=len(result.samples), failed=len(result.failed),
               down_s=round(restarting - killed, 2), restart_s=round(restarted - restarting, 2),
               untraced_while_down=len(down.samples),
               envoy=counted, first_traced_after_restart_ms=round(
                   (first.started - restarted) * 1000, 1),
               p50_ms=result.latency_ms(50), p99_ms=result.latency_ms(99),
               spans_after_restart=len(wanted))


def test_stalled_sidecar_costs_one_message_timeout_and_no_request(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        load = Load(r.url(), CONNECTIONS, duration_s=20.0, rate=RATE / 2,
                    marker=TRACEPARENT_IN_BODY).start()
        wait_until(lambda: load.sent() >= 50, 10, "load to be running")
        healthy = time.monotonic()
        before = r.envoy_stats(MESSAGE_TIMEOUTS, FAILURE_ALLOWED, STREAMS_FAILED)
        r.signal(signal.SIGSTOP)  # alive, connected, silent: slower than any timeout
        stopped = time.monotonic()
        try:
            wait_until(lambda: r.stack.envoy_stat(MESSAGE_TIMEOUTS)
                       >= before[MESSAGE_TIMEOUTS] + 40, 15, "Envoy to time out on the sidecar")
        finally:
            r.signal(signal.SIGCONT)
        resumed = time.monotonic()
        def traced_again() -> bool:  # the last 50 requests all reached the upstream traced
            recent = load.result().between(resumed, float("inf")).samples[-50:]
            return len(recent) == 50 and all(s.marked for s in recent)
        wait_until(traced_again, 15, "tracing to resume after SIGCONT")
        load.stop()
        result = load.wait()
        wait_until(lambda: r.probe.value(STREAMS_ACTIVE) == 0, 10, "streams to drain")
        counted = deltas(before, r.envoy_stats(MESSAGE_TIMEOUTS, FAILURE_ALLOWED,
                                               STREAMS_FAILED))

        assert result.failed == (), result.failed[:5]
        normal = result.between(0.0, healthy)
        stalled = result.between(stopped + 0.05, resumed - 0.25)  # sent and answered while stopped
        after = result.between(resumed, float("inf"))
        last_untraced = max((s.finished for s in after.samples if not s.marked), default=resumed)
        assert stalled.samples and not any(s.marked for s in stalled.samples)
        # a stalled request waits one message_timeout (200 ms; Envoy's timer is ms-rounded)
        # and then its normal time upstream
        assert min(s.latency_s for s in stalled.samples) >= 0.19
        assert 0.19 <= stalled.latency_ms(50) / 1000 < 0.2 + 0.1
        assert stalled.latency_ms(100) / 1000 < 1.0
        assert counted[MESSAGE_TIMEOUTS] >= len(stalled.samples)
        wanted = {s.seq for s in after.samples[-50:]}
        assert r.receiver.wait_for(lambda: wanted <= set(r.spans()), 10)
        wait_until(lambda: r.probe.value(EXPORTED) >= len(r.spans()), 10, "exports to settle")
        timed_out = {s.seq for s in result.samples if not s.marked}
        spans = r.spans()
        record("stall", requests=len(result.samples), stalled_s=round(resumed - stopped, 2),
               untraced=len(timed_out), envoy=counted,
               spans_of_untraced=len(timed_out & set(spans)),
               untraced_after_resume=sum(not s.marked for s in after.samples),
               traced_again_after_s=round(last_untraced - resumed, 2),
               max_after_resume_ms=after.latency_ms(100),
               p50_normal_ms=normal.latency_ms(50), p50_stalled_ms=stalled.latency_ms(50),
               max_stalled_ms=stalled.latency_ms(100))


def test_sigterm_under_load_drains_streams_and_exports_every_span(tmp_path: Path) -> None:
    grace_s = 5.0
    env = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}  # nothing leaves before the shutdown flush
    with rig(tmp_path, sidecar_env=env) as r:
        slow_tag = f"slow{r.tag}"
        slow = Load(r.url("/slow", slow_tag).replace("?", "?ms=3000&"), 4,
                    duration_s=5.0, count=4).start()
        wait_until(lambda: r.stack.envoy_stat("cluster.users.upstream_rq_active") >= 4, 10,
                   "slow requests to be in flight")
        steady = Load(r.url(), CONNECTIONS, duration_s=4.0, rate=RATE,
                      marker=TRACEPARENT_IN_BODY).start()
        wait_until(lambda: steady.sent() >= 50, 10, "load to be running")
        assert r.stack.sidecar.popen is not None
        signalled = time.monotonic()
        r.signal(signal.SIGTERM)
        code = r.stack.sidecar.popen.wait(grace_s + 5)
        exited = time.monotonic()
        in_flight, steady_result = slow.wait(), steady.wait()

        assert code == 0
        assert exited - signalled < grace_s + 2.0  # grace, plus the final flush
        # the streams in flight at SIGTERM finished normally, traced
        assert len(in_flight.samples) == 4 and in_flight.failed == ()
        assert all(s.finished > signalled for s in in_flight.samples)  # (/slow echoes nothing)
        assert steady_result.failed == (), steady_result.failed[:5]
        # every request the sidecar answered and that completed before it exited has its span
        done = {s.seq for s in steady_result.samples if s.marked and s.finished < exited}
        spans, slow_spans = r.spans(), r.spans(slow_tag)
        assert done <= set(spans), f"{len(done - set(spans))} of {len(done)} spans lost"
        assert {s.seq for s in in_flight.samples} == set(slow_spans)
        assert all(span.attributes["http.response.status_code"] == 200
                   for span in slow_spans.values())
        record("sigterm", exit_s=round(exited - signalled, 2), exit_code=code,
               in_flight_at_signal=len(in_flight.samples),
               requests=len(steady_result.samples), traced_and_done=len(done) + 4,
               spans_exported=len(done & set(spans)) + len(slow_spans),
               untraced_after_signal=sum(not s.marked for s in steady_result.samples))
