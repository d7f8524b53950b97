"""A small, bounded HTTP/1.1 load generator for loopback tests and ``make soak``.

``python -m ext_proc.dev.loadgen --url http://127.0.0.1:PORT/echo --connections 8
--duration 5 --rate 100`` prints a JSON summary.

Each of N threads keeps one keep-alive connection to a loopback address and
sends GETs until the request budget (``count``) or the ``duration`` is used up,
or `Load.stop` is called; the pacing (``rate``, requests per second in total)
is an open-loop schedule per connection. Every request is recorded: sequence
number, start time, latency, status, error, and whether the body contained a
marker (the e2e tests use ``"traceparent"`` on the echo upstream to count the
requests the sidecar mutated) or the response a marker header. Stdlib only.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import itertools
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

LOOPBACK_NAMES: Final = frozenset({"localhost"})
SEQ_PLACEHOLDER: Final = "{n}"


@dataclass(frozen=True)
class Sample:
    """One request: `seq` numbers requests in the order they were started."""

    seq: int
    started: float  # time.monotonic() at send
    latency_s: float
    status: int | None  # None: no response (see `error`)
    error: str | None = None
    marked: bool = False  # the body contained the marker

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 400

    @property
    def finished(self) -> float:
        return self.started + self.latency_s


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LoadResult:
    samples: tuple[Sample, ...]
    elapsed_s: float

    def between(self, start: float, end: float) -> LoadResult:
        """The requests started in [start, end) (monotonic clock)."""
        return LoadResult(tuple(s for s in self.samples if start <= s.started < end),
                          end - start)

    @property
    def failed(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if not s.ok)

    def latency_ms(self, q: float) -> float:
        return percentile([s.latency_s * 1000 for s in self.samples if s.ok], q)

    def summary(self) -> dict[str, float | int]:
        count = len(self.samples)
        return {
            "requests": count, "failed": len(self.failed),
            "marked": sum(s.marked for s in self.samples),
            "rps": round(count / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
            "p50_ms": round(self.latency_ms(50), 2), "p99_ms": round(self.latency_ms(99), 2),
            "max_ms": round(self.latency_ms(100), 2),
        }


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Load:
    """Bounded load against `url` (loopback only); `start`, then `wait` or `stop`."""

    url: str
    connections: int = 4
    duration_s: float = 5.0
    count: int | None = None  # total request budget; None: until `duration_s`
    rate: float | None = None  # requests per second in total; None: closed loop
    timeout_s: float = 10.0
    marker: bytes | None = None
    marker_header: str | None = None  # or: the response carried this header
    _samples: list[Sample] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, repr=False)
    _started: float = 0.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None or not _loopback(parts.hostname):
            raise ValueError(f"load generator targets loopback http:// URLs only, not {self.url}")
        if self.connections < 1 or self.duration_s <= 0:
            raise ValueError("connections must be >= 1 and duration_s > 0")
        self._host, self._port = parts.hostname, parts.port or 80
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")

    def start(self) -> Load:
        self._started = time.monotonic()
        for index in range(self.connections):
            thread = threading.Thread(target=self._worker, args=(index,),
                                      name=f"load-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait(self) -> LoadResult:
        """Join every worker (bounded by duration + one request timeout) and return results."""
        deadline = self._started + self.duration_s + self.timeout_s + 5.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        return self.result()

    def run(self) -> LoadResult:
        return self.start().wait()

    def result(self) -> LoadResult:
        with self._lock:
            samples = tuple(sorted(self._samples, key=lambda s: s.seq))
        return LoadResult(samples, time.monotonic() - self._started)

    def sent(self) -> int:
        """Requests recorded so far."""
        with self._lock:
            return len(self._samples)

    def _next_seq(self) -> int | None:
        with self._lock:
            seq = next(self._seq)
        return None if self.count is not None and seq >= self.count else seq

    def _worker(self, index: int) -> None:
        end = self._started + self.duration_s
        interval = self.connections / self.rate if self.rate else 0.0
        next_at = self._started + interval * index / self.connections
        conn: http.client.HTTPConnection | None = None
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                if interval:
                    if self._stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                    next_at += interval
                if time.monotonic() >= end or (seq := self._next_seq()) is None:
                    break
                if conn is None:
                    conn = http.client.HTTPConnection(self._host, self._port,
                                                      timeout=self.timeout_s)
                sample, keep = self._one(conn, seq)
                with self._lock:
                    self._samples.append(sample)
                if not keep:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def _one(self, conn: http.client.HTTPConnection, seq: int) -> tuple[Sample, bool]:
        """One request on `conn`; (sample, whether the connection can be reused)."""
        started = time.monotonic()
        try:
            conn.request("GET", self._target.replace(SEQ_PLACEHOLDER, str(seq)))
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return Sample(seq, started, time.monotonic() - started, None,
                          f"{type(exc).__name__}: {exc}"), False
        marked = ((self.marker is not None and self.marker in body)
                  or (self.marker_header is not None
                      and resp.getheader(self.marker_header) is not None))
        return (Sample(seq, started, time.monotonic() - started, resp.status, marked=marked),
                not resp.will_close)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.dev.loadgen")
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path ({n}: seq)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--count", type=int, default=None, help="total request budget")
    parser.add_argument("--rate", type=float, default=None, help="requests/s in total")
    args = parser.parse_args(argv)
    result = Load(args.url, args.connections, args.duration, args.count, args.rate).run()
    print(json.dumps(result.summary()))
    return 0 if not result.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
