"""`Throttle`: at most one log line per interval, saying how many were held back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

DEFAULT_INTERVAL_S: Final = 10.0


class Throttle:
    """Lets one event through per `interval_s` and counts the ones held back between.

    Not thread-safe by itself: callers on several threads hold their own lock."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def ready(self) -> int | None:
        """None: hold this one back (counted). Otherwise go ahead: the number held back
        since the last one that went."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            self._held += 1
            return None
        self._last, held, self._held = now, self._held, 0
        return held
