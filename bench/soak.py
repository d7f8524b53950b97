"""A soak of millions of requests: ``python -m bench.soak`` (issue #21).

`make soak` paces a Python client through the demo upstream at a few hundred
requests a second; millions of requests need more. This drives a bench row with wrk,
closed loop, through the bench's fast upstream, for ``SOAK_SECONDS`` (default 1200):
``SOAK_CONFIG`` ``lean`` (default: the sidecar row, envoy.yaml), ``full``
(envoy-full.yaml) or ``prefilter`` (1 % sampled, Envoy asks about those only; the
others are counted from its access log). Every 5 s it samples the sidecar's RSS and
the requests Envoy received, and at the end the sidecar's ``extproc.state.size``
(admin /metrics). The verdict is `make soak`'s: the
warm-up (``SOAK_WARMUP_SECONDS``, default 120) is reported; the steady state's second
half must grow at most 64 KiB/min, at a rate where a 10-byte-per-request leak would
not. Writes ``results/soak-<UTC stamp>.json``; exits 1 on a violation.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import run_wrk
from bench.run import Bench, BenchOptions
from ext_proc.dev.devstack import ROOT, free_port
from ext_proc.dev.procs import envoy_stat
from ext_proc.dev.soak import SoakConfig, parse_exposition, rss_kib
from ext_proc.dev.steady import memory_problems, steady_state

STATE_SIZE = "extproc_state_size"
REQUESTS = "http.ingress.downstream_rq_total"
INTERVAL_S = 5.0
VARIANTS = {"lean": "sidecar", "full": "sidecar-full", "prefilter": "sidecar-1pct-prefilter"}


def state_sizes(url: str) -> dict[str, float]:
    """The sidecar's non-empty caches and waiting sets, by name."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        scrape = parse_exposition(resp.read().decode())
    return {dict(labels).get("extproc_state", "?"): value
            for (name, labels), value in scrape.items() if name == STATE_SIZE and value}


def soak(config: SoakConfig, variant: str, interval_s: float = INTERVAL_S,
         ) -> tuple[dict[str, Any], list[str]]:
    """Run `variant` (a bench row) under wrk for `config.seconds`: the report, and what
    `make soak`'s verdict finds wrong with it."""
    admin = free_port()
    options = BenchOptions(rounds=1, seconds=config.seconds, workers=1,
                           connections=config.connections, threads=1, variants=(variant,),
                           sidecar_env={"EXTPROC_ADMIN__LISTEN": f"127.0.0.1:{admin}"})
    metrics = f"http://127.0.0.1:{admin}/metrics"
    points: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, Bench(options, Path(tmp)) as bench:
        with bench.started(variant, Path(tmp)) as running:
            assert running.sidecar is not None and running.sidecar.popen is not None
            pid, admin_port = running.sidecar.popen.pid, running.ports.admin
            done = threading.Event()

            def sample() -> None:
                started = time.monotonic()
                while not done.wait(interval_s):
                    rss = rss_kib(pid)
                    if rss is not None:
                        points.append((time.monotonic() - started, float(rss),
                                       envoy_stat(admin_port, REQUESTS)))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            load = run_wrk(running.url, config.seconds, Path(tmp), threads=1,
                           connections=config.connections)
            done.set()
            sampler.join()
            sizes = state_sizes(metrics)
    steady = steady_state(points, config.warmup_seconds)
    warm = next((rss for t, rss, _ in points if t >= config.warmup_seconds), points[-1][1])
    report = {
        "config": variant, "seconds": config.seconds, "requests": load.requests,
        "errors": load.errors, "rps": round(load.rps, 1),
        "rss_start_kib": points[0][1], "rss_warm_kib": warm, "rss_end_kib": points[-1][1],
        "rss_max_kib": max(p[1] for p in points),
        "slope_kib_per_min": round(steady.slope_kib_per_min, 1),
        "steady_requests": steady.requests, "steady_rps": round(steady.rps, 1),
        "bytes_per_request": round(steady.per_request(steady.slope_kib_per_min), 3),
        "detectable_bytes_per_request": round(
            steady.per_request(config.max_slope_kib_per_min), 3),
        "state_sizes_end": sizes,
        "rss_every_minute": [(round(t), rss, n) for t, rss, n in points[::12]],
    }
    problems = [f"{load.errors} requests failed"] if load.errors else []
    problems += memory_problems(steady, config.max_slope_kib_per_min,
                                config.leak_bytes_per_request)
    return report, problems


def main() -> int:
    config = replace(SoakConfig.from_env(), seconds=float(os.environ.get("SOAK_SECONDS", 1200)),
                     warmup_seconds=float(os.environ.get("SOAK_WARMUP_SECONDS", 120)))
    report, problems = soak(config, VARIANTS[os.environ.get("SOAK_CONFIG") or "lean"])
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"soak-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    for problem in problems:
        print(f"SOAK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
