"""The soak's verdict on memory (#21): the steady state's RSS trend, and what it means
per request.

RSS on a busy CPython process is not a smooth line: transient buffers (export
batches, access-log batches, gRPC) lift it by up to ~1.5 MiB for a few seconds and
the allocator gives some back. A least-squares slope over raw samples of a few
minutes follows those swings; a leak lifts the floor. So the slope is fitted to the
**lower envelope**: the least RSS of each `ENVELOPE_S` of samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

ENVELOPE_S: Final = 10.0


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (0 for < 2 points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def lower_envelope(points: Sequence[tuple[float, float]],
                   every_s: float = ENVELOPE_S) -> list[tuple[float, float]]:
    """(time, least value) of each `every_s` of (time, value) points, from the first."""
    if not points:
        return []
    start = points[0][0]
    buckets: dict[int, list[tuple[float, float]]] = {}
    for t, v in points:
        buckets.setdefault(int((t - start) // every_s), []).append((t, v))
    return [min(group, key=lambda p: p[1]) for _, group in sorted(buckets.items())]


@dataclass(frozen=True)
class SteadyState:
    """The window the soak judges: the second half of what follows the warm-up."""

    slope_kib_per_min: float  # of the RSS's lower envelope
    requests: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def per_request(self, kib_per_min: float) -> float:
        """Bytes per request that a slope of `kib_per_min` means at this window's rate."""
        return kib_per_min * 1024 / (self.rps * 60) if self.rps else math.inf


def memory_problems(steady: SteadyState, max_slope_kib_per_min: float,
                    leak_bytes_per_request: float) -> list[str]:
    """What the soak's verdict finds wrong with a steady state: growth past the bound,
    or a rate too low for a leak of `leak_bytes_per_request` to show."""
    found = []
    if steady.slope_kib_per_min > max_slope_kib_per_min:
        found.append(f"RSS slope {steady.slope_kib_per_min:.1f} KiB/min over the steady "
                     f"state's second half exceeds {max_slope_kib_per_min} KiB/min "
                     f"({steady.per_request(steady.slope_kib_per_min):.1f} bytes per request)")
    detectable = steady.per_request(max_slope_kib_per_min)
    if detectable > leak_bytes_per_request:
        found.append(f"{steady.rps:.0f} req/s in the steady state: a leak under "
                     f"{detectable:.1f} bytes per request would pass unseen (needs "
                     f"{leak_bytes_per_request}); raise the rate")
    return found


def steady_state(points: Sequence[tuple[float, float, int]], warmup_s: float,
                 envelope_s: float = ENVELOPE_S) -> SteadyState:
    """The RSS slope and the requests sent over the second half of the samples taken
    after `warmup_s` (points: seconds, RSS KiB, requests sent so far)."""
    after = [p for p in points if p[0] >= warmup_s]
    if len(after) < 2:
        return SteadyState(0.0, 0, 0.0)
    middle = (after[0][0] + after[-1][0]) / 2
    half = [p for p in after if p[0] >= middle]
    if len(half) < 2:
        return SteadyState(0.0, 0, 0.0)
    envelope = lower_envelope([(t, rss) for t, rss, _ in half], envelope_s)
    return SteadyState(slope_per_min(envelope), half[-1][2] - half[0][2],
                       half[-1][0] - half[0][0])
