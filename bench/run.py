"""``make bench``: run every config in one go, interleaved over rounds, and report.

Environment knobs (defaults in brackets): BENCH_ROUNDS [3], BENCH_SECONDS [5]
(saturation per run), BENCH_LIGHT_RATE [100] req/s, BENCH_LIGHT_SECONDS [3],
BENCH_WORKERS [nproc], BENCH_CONNECTIONS [32], BENCH_THREADS [2],
BENCH_ENVOY_CONCURRENCY [nproc], BENCH_CONFIGS [alone,native,echo,sidecar,workers],
BENCH_OUT [results], BENCH_WORKERS_ENVOY [envoy/envoy-workers.yaml] (where the
"workers" row takes its processor cluster from), BENCH_BASELINE [none]: a git
revision whose sidecar runs as one more row, "baseline" (before/after in one run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench import report
from bench.load import run_paced, run_wrk, wrk_binary
from bench.procstat import cpu_seconds, machine
from bench.receiver import SpanCounter
from bench.variants import (
    BENCH_PATH,
    ECHO,
    ECHO_ENV,
    PREFILTER_PARTS,
    SAMPLED_ENV,
    SAMPLED_RATIO,
    SIDECAR_AB,
    VARIANTS,
    WORKERS_YAML,
    dump,
    proxy_config,
    upstream_config,
)
from ext_proc.dev.devstack import ROOT, Ports, Proc, envoy_binary, free_port, wait_until
from ext_proc.dev.procs import envoy_stat, http_ok
from ext_proc.policy.sampling.prefilter import root_sampled

_NPROC: Final = os.cpu_count() or 1
REQUESTS_STAT: Final = "http.ingress.downstream_rq_total"
ASKED_STAT: Final = "http.ingress.ext_proc.streams_started"
FAILED_OPEN_STAT: Final = "http.ingress.ext_proc.failure_mode_allowed"


@dataclass(frozen=True)
class BenchOptions:
    rounds: int = 3
    seconds: float = 5.0
    light_rate: float = 100.0
    light_seconds: float = 3.0
    warmup_seconds: float = 1.0
    workers: int = max(2, _NPROC)
    connections: int = 32
    threads: int = 2
    envoy_concurrency: int = _NPROC
    variants: tuple[str, ...] = VARIANTS
    out: Path = field(default=ROOT / "results")
    workers_envoy: Path = WORKERS_YAML
    baseline: str | None = None  # a git revision: its sidecar is the "baseline" row
    chart: bool = True
    sidecar_env: Mapping[str, str] = field(default_factory=dict)  # every sidecar row's

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BenchOptions:
        d = cls()
        names = tuple(v.strip() for v in env.get("BENCH_CONFIGS", "").split(",") if v.strip())
        baseline = env.get("BENCH_BASELINE") or None
        if baseline is not None and names and "baseline" not in names:
            names += ("baseline",)
        unknown = (set(names) - set(VARIANTS) - set(SIDECAR_AB) - set(ECHO)
                   - set(PREFILTER_PARTS) - {"baseline"})
        if unknown:
            raise ValueError(f"BENCH_CONFIGS: unknown {sorted(unknown)}; use "
                             f"{(*VARIANTS, *SIDECAR_AB, *ECHO, *PREFILTER_PARTS)}")
        return cls(
            rounds=int(env.get("BENCH_ROUNDS", d.rounds)),
            seconds=float(env.get("BENCH_SECONDS", d.seconds)),
            light_rate=float(env.get("BENCH_LIGHT_RATE", d.light_rate)),
            light_seconds=float(env.get("BENCH_LIGHT_SECONDS", d.light_seconds)),
            workers=int(env.get("BENCH_WORKERS", d.workers)),
            connections=int(env.get("BENCH_CONNECTIONS", d.connections)),
            threads=int(env.get("BENCH_THREADS", d.threads)),
            envoy_concurrency=int(env.get("BENCH_ENVOY_CONCURRENCY", d.envoy_concurrency)),
            variants=names or (d.variants + ("baseline",) * (baseline is not None)),
            baseline=baseline,
            out=Path(env.get("BENCH_OUT", str(d.out))),
            workers_envoy=Path(env.get("BENCH_WORKERS_ENVOY", str(d.workers_envoy))))

    def label(self, variant: str) -> str:
        return {
            "alone": "Envoy alone",
            "native": "Envoy + native OTel tracer (100%)",
            "native-1pct": "Envoy + native OTel tracer (1%)",
            "sidecar-1pct": "Envoy + extproc-otel (1%, Envoy asks about every request)",
            "sidecar-1pct-prefilter": "Envoy + extproc-otel (1%, prefilter)",
            **{name: f"Envoy + extproc-otel (1%, {part})"
               for name, part in PREFILTER_PARTS.items()},
            "sidecar": "Envoy + extproc-otel (1 process)",
            "workers": f"Envoy + extproc-otel ({self.workers} processes)"
                       if self.workers > 1 else "Envoy + extproc-otel (1 process, workers.yaml)",
            **{name: f"Envoy + extproc-otel (1 process, {name.removeprefix('sidecar-')})"
               for name in SIDECAR_AB},
            "echo": "Envoy + echo server, no tracing (floor)",
            **{name: f"Envoy + echo ({name.removeprefix('echo-')}), no tracing"
               for name in ECHO if name != "echo"},
            "echo-traced": "Envoy + echo server answering in the sidecar's shape, no tracing",
            "baseline": f"Envoy + extproc-otel @ {self.baseline} (1 process)",
        }[variant]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EXTPROC_"))}


def _pid(proc: Proc) -> int:
    assert proc.popen is not None
    return proc.popen.pid


class Bench:
    """The shared pieces (fast upstream, span receiver) and one `run` per config/round."""

    def __init__(self, options: BenchOptions, workdir: Path) -> None:
        self.options, self.workdir = options, workdir
        self.envoy = envoy_binary()
        self.receiver = SpanCounter()
        self.upstream_port = free_port()
        self.upstream = Proc("upstream", [
            self.envoy, "-c", str(dump(upstream_config(self.upstream_port),
                                       workdir / "upstream.yaml")),
            "--disable-hot-restart", "--log-level", "warn", "--concurrency", "1"],
            workdir / "upstream.log")

    def __enter__(self) -> Bench:
        self.receiver.start()
        self.upstream.start()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.upstream_port}/"), 30,
                   "the bench upstream")
        return self

    def __exit__(self, *exc: object) -> None:
        self.upstream.stop()
        self.receiver.stop()

    def _baseline_tree(self) -> Path:
        """The baseline revision's files (protos generated as now), extracted once."""
        rev = self.options.baseline
        assert rev is not None
        tree = self.workdir / "baseline"
        if not tree.exists():
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            shutil.copytree(ROOT / "ext_proc" / "_gen", tree / "ext_proc" / "_gen")
        return tree

    def _sidecar(self, variant: str, port: int, rundir: Path) -> Proc | None:
        if variant in ECHO:
            return Proc("echo", [sys.executable, "-m", "bench.echo", str(port),
                                 ECHO[variant]], rundir / "echo.log",
                        {**_clean_env(), **ECHO_ENV.get(variant, {})})
        sampled = variant.startswith("sidecar-1pct")  # the prefilter's parts too
        if variant not in ("sidecar", "workers", "baseline", *SIDECAR_AB) and not sampled:
            return None
        env = {**_clean_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": self.receiver.endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", **self.options.sidecar_env,
               **SIDECAR_AB.get(variant, {}),
               **(SAMPLED_ENV if sampled else {})}
        workers = self.options.workers if variant == "workers" else 1
        return Proc("sidecar", [sys.executable, "-m", "ext_proc", "serve", "--listen",
                                f"127.0.0.1:{port}", "--workers", str(workers)],
                    rundir / "sidecar.log", env,
                    cwd=self._baseline_tree() if variant == "baseline" else None)

    @contextmanager
    def started(self, variant: str, rundir: Path) -> Iterator[Running]:
        """Envoy for `variant` (and its sidecar or echo server), ready; stopped after."""
        opts = self.options
        ports = Ports(users=self.upstream_port)
        config = proxy_config(variant, ports, rundir / "access.log", self.receiver.port,
                              workers_source=opts.workers_envoy)
        envoy = Proc("envoy", [self.envoy, "-c", str(dump(config, rundir / "envoy.yaml")),
                               "--disable-hot-restart", "--log-level", "warn",
                               "--concurrency", str(opts.envoy_concurrency)],
                     rundir / "envoy.log", _clean_env())
        sidecar = self._sidecar(variant, ports.sidecar, rundir)
        try:
            if sidecar is not None:
                sidecar.start()
                expected = opts.workers if variant == "workers" else 1
                wait_until(lambda: _started(sidecar) >= expected, 30, "the sidecar")
            envoy.start()
            admin = f"http://127.0.0.1:{ports.admin}/ready"
            wait_until(lambda: _alive(envoy) and http_ok(admin), 30, "envoy")
            yield Running(ports, envoy, sidecar,
                          f"http://127.0.0.1:{ports.listener}{BENCH_PATH}")
        finally:
            envoy.stop()
            if sidecar is not None:
                sidecar.stop()

    def run(self, variant: str, round_no: int, attempt: int = 0) -> report.RunResult:
        opts = self.options
        rundir = self.workdir / f"round{round_no}-{variant}-{attempt}"
        rundir.mkdir()
        spans_before, servers_before = self.receiver.spans, self.receiver.server_spans
        with self.started(variant, rundir) as running:
            envoy, sidecar, url, ports = running.envoy, running.sidecar, running.url, running.ports
            run_wrk(url, opts.warmup_seconds, rundir, threads=1, connections=4)
            cpu0 = (cpu_seconds(_pid(envoy)),
                    cpu_seconds(_pid(sidecar)) if sidecar is not None else 0.0)
            saturation = run_wrk(url, opts.seconds, rundir, opts.threads, opts.connections)
            cpu1 = (cpu_seconds(_pid(envoy)),
                    cpu_seconds(_pid(sidecar)) if sidecar is not None else 0.0)
            light = run_paced("127.0.0.1", ports.listener, BENCH_PATH, opts.light_rate,
                              opts.light_seconds)
            requests = envoy_stat(ports.admin, REQUESTS_STAT)
            failed_open = envoy_stat(ports.admin, FAILED_OPEN_STAT)
            asked = envoy_stat(ports.admin, ASKED_STAT)
            spans: int | None = None
            expected: int | None = requests
            if sidecar is not None and variant not in ECHO:
                code = sidecar.stop(timeout=30)  # SIGTERM: drain, flush, exit
                if code != 0:
                    raise RuntimeError(f"sidecar exited {code}:\n{sidecar.output()[-2000:]}")
                if variant == "sidecar-phases":  # up to 3 phase spans each: count SERVER
                    self.receiver.wait_for(spans_before + 4 * requests, 5, settle=1)
                    spans = self.receiver.server_spans - servers_before
                elif not variant.startswith("sidecar-1pct"):  # counted once Envoy has flushed
                    spans = self.receiver.wait_for(spans_before + requests, 5, settle=1) \
                        - spans_before
            elif variant == "native":
                spans = self.receiver.wait_for(spans_before + requests, 15) - spans_before
            elif variant == "native-1pct":  # random: no exact count to wait for
                expected = None
                spans = self.receiver.wait_for(spans_before + requests, 15, settle=2) \
                    - spans_before
        if variant.startswith("sidecar-1pct"):
            # Envoy has stopped, so its access log holds every request's id
            expected = (0 if variant in PREFILTER_PARTS  # nothing asked: no span
                        else sampled_requests(rundir / "access.log"))
            spans = self.receiver.wait_for(spans_before + expected, 5, settle=1) - spans_before
        return report.RunResult(
            variant=variant, label=opts.label(variant), round=round_no,
            saturation=saturation, light=light, envoy_cpu_s=cpu1[0] - cpu0[0],
            sidecar_cpu_s=None if sidecar is None else cpu1[1] - cpu0[1],
            requests=requests, spans=spans, failed_open=failed_open,
            expected_spans=expected if spans is not None else None, asked=asked)


@dataclass(frozen=True)
class Running:
    """One started config: its ports, Envoy, sidecar (or echo server) and /bench URL."""

    ports: Ports
    envoy: Proc
    sidecar: Proc | None
    url: str


class StartupError(RuntimeError):
    """A process of the run exited while starting (e.g. a free port taken meanwhile)."""


def sampled_requests(access_log: Path) -> int:
    """Requests of a run the sidecar samples at 1 %: those whose x-request-id bucket is
    under the threshold (Envoy's file access log has every request's id)."""
    count = 0
    with access_log.open() as lines:
        for line in lines:
            start = line.find('"request_id":"')
            if start >= 0 and root_sampled(line[start + 14:start + 17], SAMPLED_RATIO):
                count += 1
    return count


def _alive(proc: Proc) -> bool:
    if not proc.alive():
        raise StartupError(f"{proc.name} exited early:\n{proc.output()[-3000:]}")
    return True


def _started(sidecar: Proc) -> int:
    _alive(sidecar)
    return sum(1 for line in sidecar.json_lines() if line.get("msg") == "started")


@dataclass(frozen=True)
class BenchReport:
    rows: list[report.Row]
    runs: list[report.RunResult]
    markdown: Path
    table: str


def run_bench(options: BenchOptions, workdir: Path | None = None,
              progress: bool = True) -> BenchReport:
    """Every config of `options`, interleaved over the rounds; writes the results."""
    wrk_binary()  # fail before starting anything
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs: list[report.RunResult] = []
        with Bench(options, work) as bench:
            for round_no in range(options.rounds):
                shift = round_no % len(options.variants)
                for variant in options.variants[shift:] + options.variants[:shift]:
                    started = time.monotonic()
                    try:
                        result = bench.run(variant, round_no)
                    except StartupError as exc:  # one retry, on fresh ports
                        print(f"retrying {variant}: {exc}", file=sys.stderr, flush=True)
                        result = bench.run(variant, round_no, attempt=1)
                    runs.append(result)
                    if progress:
                        print(f"round {round_no + 1}/{options.rounds} {variant:8} "
                              f"{result.saturation.rps:9,.0f} req/s  light p50 "
                              f"{result.light.p50_ms:.2f} ms  spans {result.spans} / "
                              f"{result.requests}  failed open {result.failed_open}  "
                              f"({time.monotonic() - started:.1f} s)",
                              flush=True)
        rows = report.aggregate(runs)
        params = {k: v for k, v in asdict(options).items()
                  if k not in ("out", "chart", "workers_envoy")}
        params["variants"] = ",".join(options.variants)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = report.write(rows, runs, machine(bench.envoy), params, options.out, stamp,
                            with_chart=options.chart)
        return BenchReport(rows, runs, path, report.table(rows))


def main() -> None:
    options = BenchOptions.from_env(os.environ)
    result = run_bench(options)
    print()
    print(result.markdown.read_text())
    print(f"written: {result.markdown} (+ .json, .png) and {options.out / 'latest.md'}")


if __name__ == "__main__":
    main()
