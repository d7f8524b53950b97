"""Aggregate the runs (medians over rounds) and write the markdown table and the chart."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadResult
from bench.procstat import Machine


@dataclass(frozen=True)
class RunResult:
    """One config in one round."""

    variant: str
    label: str
    round: int
    saturation: LoadResult
    light: LoadResult
    envoy_cpu_s: float  # over the saturation phase
    sidecar_cpu_s: float | None  # None: no sidecar in this config
    requests: int  # requests Envoy received in the whole run (warm-up, saturation, light)
    spans: int | None  # spans the receiver got for this run; None: nothing traces
    failed_open: int  # ext_proc streams Envoy let through untraced (failure_mode_allow)
    expected_spans: int | None = None  # what zero loss means: requests, or those sampled
    asked: int = 0  # ext_proc streams Envoy opened (the prefilter skips the rest)

    def cpu_us(self, seconds: float | None) -> float | None:
        if seconds is None or self.saturation.requests == 0:
            return None
        return seconds / self.saturation.requests * 1e6


@dataclass(frozen=True)
class Row:
    variant: str
    label: str
    rps: float
    sat_p50_ms: float
    sat_p99_ms: float
    light_p50_ms: float
    light_p99_ms: float
    envoy_us: float | None
    sidecar_us: float | None
    requests: int
    spans: int | None
    failed_open: int
    errors: int
    rounds: int
    expected_spans: int | None = None
    asked: int = 0


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(runs: Sequence[RunResult]) -> list[Row]:
    """One row per config, in first-seen order: medians over rounds, sums for counts."""
    rows = []
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == variant]
        spans = [r.spans for r in mine]
        expected = [r.expected_spans for r in mine]
        rows.append(Row(
            variant=variant, label=mine[0].label,
            rps=_median([r.saturation.rps for r in mine]) or 0.0,
            sat_p50_ms=_median([r.saturation.p50_ms for r in mine]) or 0.0,
            sat_p99_ms=_median([r.saturation.p99_ms for r in mine]) or 0.0,
            light_p50_ms=_median([r.light.p50_ms for r in mine]) or 0.0,
            light_p99_ms=_median([r.light.p99_ms for r in mine]) or 0.0,
            envoy_us=_median([r.cpu_us(r.envoy_cpu_s) for r in mine]),
            sidecar_us=_median([r.cpu_us(r.sidecar_cpu_s) for r in mine]),
            requests=sum(r.requests for r in mine),
            spans=None if any(s is None for s in spans) else sum(s or 0 for s in spans),
            failed_open=sum(r.failed_open for r in mine),
            expected_spans=None if any(e is None for e in expected)
            else sum(e or 0 for e in expected),
            asked=sum(r.asked for r in mine),
            errors=sum(r.saturation.errors + r.light.errors for r in mine),
            rounds=len(mine)))
    return rows


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(value: float, base: Row | None) -> str:
    if base is None or base.rps == 0:
        return "-"
    return f"{value / base.rps:.2f}x"


def table(rows: Sequence[Row]) -> str:
    by_variant = {r.variant: r for r in rows}
    alone = by_variant.get("alone")
    lines = [
        "| config | req/s | vs Envoy alone | vs native tracer | p50 / p99 saturated (ms) "
        "| light p50 / p99 (ms) | light p50 added (ms) | Envoy CPU µs/req "
        "| sidecar CPU µs/req | spans / expected / requests | failed open | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # a 1 % row is compared with the native tracer at 1 %
        native = by_variant.get("native-1pct" if "1pct" in r.variant else "native")
        added = "-" if alone is None else f"{r.light_p50_ms - alone.light_p50_ms:+.2f}"
        expected = "~" if r.expected_spans is None else f"{r.expected_spans:,}"
        spans = "-" if r.spans is None else f"{r.spans:,} / {expected} / {r.requests:,}"
        lines.append(
            f"| {r.label} | {r.rps:,.0f} | {_ratio(r.rps, alone)} | {_ratio(r.rps, native)} "
            f"| {r.sat_p50_ms:.2f} / {r.sat_p99_ms:.2f} "
            f"| {r.light_p50_ms:.2f} / {r.light_p99_ms:.2f} | {added} "
            f"| {_num(r.envoy_us)} | {_num(r.sidecar_us)} | {spans} | {r.failed_open:,} "
            f"| {r.errors:,} |")
    return "\n".join(lines)


def markdown(rows: Sequence[Row], machine: Machine, params: dict[str, Any]) -> str:
    described = ", ".join(f"{k}={v}" for k, v in params.items())
    return "\n".join([
        f"# extproc-otel bench, {machine.date}",
        "",
        f"Machine: {machine.line()}",
        "",
        f"Parameters: {described}",
        "",
        table(rows),
        "",
        "Medians over the rounds (configs interleaved, order rotated per round). Saturation: "
        "wrk closed loop; light: a paced client at a fixed rate over keep-alive connections. "
        "CPU per request: utime+stime from /proc over the saturation phase (process tree, "
        "workers included) divided by the requests wrk completed. Spans / expected / requests: "
        "summed over rounds, spans received after a flush, the spans zero loss means (every "
        "request; at 1 %, the requests whose x-request-id the policy samples; ~ for the "
        "native tracer's random 1 %), and the requests Envoy received (the phases row counts "
        "SERVER spans: its phase spans come on top). A 1 % row's 'vs "
        "native tracer' is against the native tracer at 1 %. Failed open: "
        "ext_proc streams Envoy gave up on (failure_mode_allow), i.e. untraced requests.",
        "",
    ])


def chart(rows: Sequence[Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label.replace("Envoy + ", "+ ").replace(" (", "\n(") for r in rows]
    xs = range(len(rows))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.8))
    ax1.bar(xs, [r.rps for r in rows], color="#4878a8")
    ax1.set_title("throughput, saturated (req/s)")
    ax2.bar([x - 0.2 for x in xs], [r.light_p50_ms for r in rows], 0.4, label="p50")
    ax2.bar([x + 0.2 for x in xs], [r.light_p99_ms for r in rows], 0.4, label="p99")
    ax2.set_title("latency at light load (ms)")
    ax2.legend()
    envoy = [r.envoy_us or 0 for r in rows]
    ax3.bar(xs, envoy, label="Envoy")
    ax3.bar(xs, [r.sidecar_us or 0 for r in rows], bottom=envoy, label="sidecar")
    ax3.set_title("CPU per request (µs)")
    ax3.legend()
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(list(xs), labels, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: Sequence[Row], runs: Sequence[RunResult], machine: Machine,
          params: dict[str, Any], out: Path, stamp: str, with_chart: bool = True) -> Path:
    """``bench-<stamp>.{md,json,png}`` plus ``latest.*`` copies in `out`; the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, machine, params)
    doc = json.dumps({"machine": asdict(machine), "params": params,
                      "rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in runs]},
                     indent=2)
    stamped = out / f"bench-{stamp}"
    stamped.with_suffix(".md").write_text(text)
    stamped.with_suffix(".json").write_text(doc)
    suffixes = [".md", ".json"]
    if with_chart:
        chart(rows, stamped.with_suffix(".png"), machine.line())
        suffixes.append(".png")
    for suffix in suffixes:
        shutil.copyfile(stamped.with_suffix(suffix), out / f"latest{suffix}")
    return stamped.with_suffix(".md")
