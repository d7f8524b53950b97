"""Throttle: one event per interval through, the rest counted."""

from __future__ import annotations

from ext_proc.telemetry.throttle import Throttle


def test_one_per_interval_goes_and_reports_how_many_were_held() -> None:
    now = [100.0]
    throttle = Throttle(10.0, lambda: now[0])
    assert throttle.ready() == 0  # the first goes at once
    assert throttle.ready() is None and throttle.ready() is None  # held back, counted
    now[0] += 9.9
    assert throttle.ready() is None
    now[0] += 0.1
    assert throttle.ready() == 3  # goes, saying three were held back
    assert throttle.ready() is None
