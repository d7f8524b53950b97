"""`make soak`'s verdict (#21): the warm-up is reported, not judged; the steady state's
second half is judged, and only when the run could have seen a 10-byte-per-request leak."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ext_proc.dev.soak import SoakConfig, SoakReport
from ext_proc.dev.steady import lower_envelope, steady_state

RATE = 400.0  # requests/s


def run(seconds: int, rss: float, leak_bytes: float = 0.0, rate: float = RATE,
        warmup_kib: float = 20_000.0, warmup_s: int = 60,
        ) -> list[tuple[float, float, int]]:
    """(t, RSS KiB, requests sent) each second: RSS climbs `warmup_kib` over the warm-up,
    then grows `leak_bytes` per request."""
    points = []
    for t in range(seconds + 1):
        sent = int(t * rate)
        warm = warmup_kib * min(t, warmup_s) / warmup_s
        after = max(0, t - warmup_s) * rate * leak_bytes / 1024
        points.append((float(t), rss + warm + after, sent))
    return points


def report(points: list[tuple[float, float, int]], config: SoakConfig) -> SoakReport:
    steady = steady_state(points, config.warmup_seconds)
    return SoakReport(
        seconds=config.seconds, requests=points[-1][2], failed=0, traced=points[-1][2],
        rps=RATE, p50_ms=1.0, p99_ms=2.0, rss_start_kib=int(points[0][1]),
        rss_warm_kib=int(points[int(config.warmup_seconds)][1]),
        rss_end_kib=int(points[-1][1]), rss_max_kib=int(max(p[1] for p in points)),
        slope_kib_per_min=round(steady.slope_kib_per_min, 1),
        steady_requests=steady.requests, steady_rps=round(steady.rps, 1),
        bytes_per_request=steady.per_request(steady.slope_kib_per_min),
        detectable_bytes_per_request=steady.per_request(config.max_slope_kib_per_min),
        streams_active_end=0, active_requests_end=0, queue_size_end=0, spans_dropped=0,
        spans_exported=points[-1][2])


def test_a_warm_up_plateau_passes_and_is_reported() -> None:
    config = SoakConfig()
    result = report(run(300, 70_000.0), config)
    assert result.violations(config) == []
    assert result.rss_warm_kib - result.rss_start_kib == pytest.approx(20_000, abs=1)
    assert result.slope_kib_per_min == 0.0
    # judged: the second half after the warm-up, 180-300 s
    assert result.steady_requests == pytest.approx(120 * RATE)
    assert result.detectable_bytes_per_request < config.leak_bytes_per_request


def test_a_leak_of_ten_bytes_per_request_fails() -> None:
    config = SoakConfig()
    result = report(run(300, 70_000.0, leak_bytes=10.0), config)
    assert result.bytes_per_request == pytest.approx(10.0, rel=0.01)
    (problem,) = result.violations(config)
    assert "exceeds 64.0 KiB/min" in problem


def test_a_run_too_slow_to_see_such_a_leak_fails() -> None:
    config = replace(SoakConfig(), rate=100.0)
    result = report(run(300, 70_000.0, leak_bytes=10.0, rate=100.0), config)
    assert result.slope_kib_per_min < config.max_slope_kib_per_min  # it would pass unseen
    (problem,) = result.violations(config)
    assert "would pass unseen" in problem


def test_without_samples_after_the_warm_up_nothing_is_judged_as_flat() -> None:
    config = SoakConfig(seconds=6.0, warmup_seconds=60.0)
    steady = steady_state(run(6, 70_000.0), config.warmup_seconds)
    assert steady.requests == 0
    assert steady.per_request(config.max_slope_kib_per_min) == float("inf")


def test_transient_swings_do_not_read_as_growth_but_a_leak_under_them_does() -> None:
    """Buffers lift RSS for a few seconds at a time (here +1.5 MiB for the last 5 s of
    each minute): a least-squares line through the samples reads a trend from where
    the window cuts them; the lower envelope does not, and still sees a leak."""
    config = SoakConfig()

    def swinging(leak_bytes: float) -> list[tuple[float, float, int]]:
        return [(t, rss + (1536.0 if t % 60 >= 55 else 0.0), n)
                for t, rss, n in run(300, 70_000.0, leak_bytes=leak_bytes)]
    flat = steady_state(swinging(0.0), config.warmup_seconds)
    assert abs(flat.slope_kib_per_min) < 1.0
    raw = steady_state(swinging(0.0), config.warmup_seconds, envelope_s=1.0)
    assert raw.slope_kib_per_min > config.max_slope_kib_per_min  # what it would say
    leaking = steady_state(swinging(10.0), config.warmup_seconds)
    assert leaking.per_request(leaking.slope_kib_per_min) == pytest.approx(10.0, rel=0.05)
    assert lower_envelope([(0.0, 5.0), (3.0, 1.0), (10.0, 7.0), (12.0, 2.0)], 10.0) == [
        (3.0, 1.0), (12.0, 2.0)]
