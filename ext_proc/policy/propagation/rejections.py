"""Counting and rate-limited logging of rejected trace-context headers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from loguru import logger

from ext_proc.telemetry.throttle import DEFAULT_INTERVAL_S, Throttle


class Rejections:
    """Counts rejected headers per format; logs at DEBUG at most once per format per interval.

    Counters only grow; `snapshot` returns a copy for metrics. A log line carries the
    format, the reason, the raw value truncated to `VALUE_LIMIT` characters and how many
    rejections of that format were not logged since the previous line.
    """

    VALUE_LIMIT: Final = 64
    DEFAULT_INTERVAL_S: Final = DEFAULT_INTERVAL_S

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._throttles: dict[str, Throttle] = {}

    def reject(self, fmt: str, reason: str, value: str | None = None) -> None:
        self._counts[fmt] = self._counts.get(fmt, 0) + 1
        throttle = self._throttles.get(fmt)
        if throttle is None:
            throttle = self._throttles[fmt] = Throttle(self._interval_s, self._clock)
        suppressed = throttle.ready()
        if suppressed is None:
            return
        shown = None if value is None else value[: self.VALUE_LIMIT]
        logger.debug(
            "rejected trace-context header",
            format=fmt, reason=reason, value=shown, suppressed=suppressed,
        )

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)
