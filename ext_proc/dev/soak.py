"""Soak: steady load through a real Envoy on loopback; flat memory, no leaked stream state.

``make soak`` runs ``python -m ext_proc.dev.soak``: the devstack (Envoy with the lean
envoy.yaml, sidecar, demo upstream, an in-process OTLP receiver), `ext_proc.dev.loadgen`
at a steady rate for ``SOAK_SECONDS`` (default 300; ``SOAK_RATE`` requests/s, default
400, ``SOAK_CONNECTIONS`` and ``SOAK_WARMUP_SECONDS``, default 60, tune it), the
sidecar's RSS read from ``/proc`` every second and its self-telemetry scraped from the
admin ``/metrics``.

The run has two parts, reported apart (issue #21):

- **warm-up** (the first ``SOAK_WARMUP_SECONDS``): caches fill to their bounds and the
  allocator takes its arenas; its growth is reported (start and plateau), not judged;
- **steady state** (the rest): the least-squares RSS slope over its second half is
  judged against 64 KiB/min, and so is the run itself: it must send enough requests
  per minute that a leak of 10 bytes per request would exceed that bound.

It fails (exit 1) when a client request failed, when the steady-state slope exceeds
the bound, when the rate was too low to see a 10-byte-per-request leak, or when
per-stream state outlives the load. `SidecarProbe` and the helpers are shared with
the reliability e2e tests.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ext_proc.dev.demo.receiver import OtlpReceiver
from ext_proc.dev.devstack import Config, Stack, free_port, wait_until
from ext_proc.dev.loadgen import Load
from ext_proc.dev.steady import SteadyState, memory_problems, steady_state

STREAMS_ACTIVE: Final = "extproc_stream_active"
ACTIVE_REQUESTS: Final = "http_server_active_requests"
QUEUE_SIZE: Final = "otel_sdk_processor_span_queue_size"
PROCESSED: Final = "otel_sdk_processor_span_processed_total"
EXPORTED: Final = "otel_sdk_exporter_span_exported_total"
EXPORT_CALLS: Final = "otel_sdk_exporter_operation_duration_seconds_count"
_SAMPLE_RE: Final = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?"
                               r" (?P<value>\S+)")
_LABEL_RE: Final = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_RSS_RE: Final = re.compile(r"^VmRSS:\s+(\d+) kB", re.MULTILINE)

Labels = frozenset[tuple[str, str]]
Scrape = dict[tuple[str, Labels], float]


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = _RSS_RE.search(text)
    return int(match.group(1)) if match else None


def parse_exposition(text: str) -> Scrape:
    """Prometheus text exposition -> {(name, labels): value}; unparsable lines skipped."""
    out: Scrape = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or (match := _SAMPLE_RE.match(line)) is None:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        labels = frozenset(_LABEL_RE.findall(match.group("labels") or ""))
        out[(match.group("name"), labels)] = value
    return out


def value_of(scrape: Scrape, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sample `name` with exactly `labels` (0 when absent)."""
    return scrape.get((name, frozenset((labels or {}).items())), 0.0)


class SidecarProbe:
    """The sidecar's admin /metrics and its RSS."""

    def __init__(self, admin_port: int, pid: int) -> None:
        self.url = f"http://127.0.0.1:{admin_port}/metrics"
        self.pid = pid

    def scrape(self) -> Scrape:
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            return parse_exposition(resp.read().decode())

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        return value_of(self.scrape(), name, labels)

    def rss_kib(self) -> int:
        rss = rss_kib(self.pid)
        if rss is None:
            raise ProcessLookupError(f"sidecar {self.pid} is gone")
        return rss


def observed_stack(workdir: Path, otlp_endpoint: str | None, admin_port: int, *,
                   sidecar_env: Mapping[str, str] | None = None,
                   mutate_config: Callable[[Config], None] | None = None) -> Stack:
    """A devstack whose sidecar serves the admin endpoint on `admin_port`."""
    env = {**(sidecar_env or {}), "EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin_port}"}
    return Stack(workdir, otlp_endpoint, sidecar_env=env, mutate_config=mutate_config)


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 300.0
    connections: int = 8
    rate: float = 400.0  # requests/s in total; 0: closed loop (as fast as it goes)
    warmup_seconds: float = 60.0  # reported, not judged
    max_slope_kib_per_min: float = 64.0  # RSS slope over the steady state's second half
    leak_bytes_per_request: float = 10.0  # a leak this size must exceed the bound
    sample_interval_s: float = 1.0
    settle_timeout_s: float = 15.0  # for per-stream state to drain after the load

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SoakConfig:
        env = os.environ if env is None else env
        return cls(seconds=float(env.get("SOAK_SECONDS", "300")),
                   connections=int(env.get("SOAK_CONNECTIONS", "8")),
                   rate=float(env.get("SOAK_RATE", "400")),
                   warmup_seconds=float(env.get("SOAK_WARMUP_SECONDS", "60")))


@dataclass(frozen=True)
class SoakReport:
    seconds: float
    requests: int
    failed: int
    traced: int  # requests whose upstream saw our traceparent
    rps: float
    p50_ms: float
    p99_ms: float
    rss_start_kib: int
    rss_warm_kib: int  # the warm-up's plateau: RSS as the steady state begins
    rss_end_kib: int
    rss_max_kib: int
    slope_kib_per_min: float  # least squares over the steady state's second half
    steady_requests: int  # requests sent in that window
    steady_rps: float
    bytes_per_request: float  # the slope per request sent in that window
    detectable_bytes_per_request: float  # the smallest leak the bound would catch
    streams_active_end: float
    active_requests_end: float
    queue_size_end: float
    spans_dropped: float
    spans_exported: float

    def violations(self, config: SoakConfig) -> list[str]:
        found = []
        if self.failed:
            found.append(f"{self.failed} client requests failed")
        window = self.steady_requests / self.steady_rps if self.steady_rps else 0.0
        found += memory_problems(
            SteadyState(self.slope_kib_per_min, self.steady_requests, window),
            config.max_slope_kib_per_min, config.leak_bytes_per_request)
        if self.streams_active_end or self.active_requests_end:
            found.append("per-stream state left after the load: "
                         f"{self.streams_active_end} streams, "
                         f"{self.active_requests_end} active requests")
        return found


def _sample_rss(probe: SidecarProbe, load: Load, interval: float,
                receiver: OtlpReceiver) -> list[tuple[float, float, int]]:
    """(seconds since start, RSS KiB, requests sent) every `interval` until the load
    ends."""
    points: list[tuple[float, float, int]] = []
    started = time.monotonic()
    done = threading.Event()

    def finish() -> None:
        load.wait()
        done.set()
    threading.Thread(target=finish, daemon=True).start()
    while not done.wait(interval):
        points.append((time.monotonic() - started, float(probe.rss_kib()), load.sent()))
        receiver.clear()  # keep the soak process itself bounded
    return points


def run_soak(config: SoakConfig, workdir: Path) -> SoakReport:
    receiver = OtlpReceiver()
    receiver.start()
    admin_port = free_port()
    try:
        with observed_stack(workdir, receiver.endpoint, admin_port) as stack:
            if stack.sidecar.popen is None:
                raise RuntimeError("the sidecar did not start")
            probe = SidecarProbe(admin_port, stack.sidecar.popen.pid)
            rss_start = probe.rss_kib()
            load = Load(stack.url("/echo?soak={n}"), config.connections, config.seconds,
                        rate=config.rate or None, marker=b'"traceparent"').start()
            points = _sample_rss(probe, load, config.sample_interval_s, receiver)
            result = load.result()
            wait_until(lambda: probe.value(STREAMS_ACTIVE) == 0
                       and probe.value(ACTIVE_REQUESTS, {"http_request_method": "GET"}) == 0
                       and probe.value(QUEUE_SIZE) == 0,
                       config.settle_timeout_s, "per-stream state to drain", interval=0.2)
            end = probe.scrape()
            rss_end = probe.rss_kib()
    finally:
        receiver.stop()
    summary = result.summary()
    steady = steady_state(points, config.warmup_seconds)
    warm = next((rss for t, rss, _ in points if t >= config.warmup_seconds), rss_end)
    return SoakReport(
        seconds=config.seconds, requests=len(result.samples), failed=len(result.failed),
        traced=int(summary["marked"]), rps=float(summary["rps"]),
        p50_ms=float(summary["p50_ms"]), p99_ms=float(summary["p99_ms"]),
        rss_start_kib=rss_start, rss_warm_kib=int(warm), rss_end_kib=rss_end,
        rss_max_kib=int(max((v for _, v, _ in points), default=rss_end)),
        slope_kib_per_min=round(steady.slope_kib_per_min, 1),
        steady_requests=steady.requests, steady_rps=round(steady.rps, 1),
        bytes_per_request=round(steady.per_request(steady.slope_kib_per_min), 2),
        detectable_bytes_per_request=round(
            steady.per_request(config.max_slope_kib_per_min), 2),
        streams_active_end=value_of(end, STREAMS_ACTIVE),
        active_requests_end=value_of(end, ACTIVE_REQUESTS, {"http_request_method": "GET"}),
        queue_size_end=value_of(end, QUEUE_SIZE),
        spans_dropped=value_of(end, PROCESSED, {"error_type": "queue_full"}),
        spans_exported=value_of(end, EXPORTED),
    )


def main() -> int:
    config = SoakConfig.from_env()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = run_soak(config, Path(tmp))
    print(json.dumps(asdict(report), indent=2))
    problems = report.violations(config)
    for problem in problems:
        print(f"SOAK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
