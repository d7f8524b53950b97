"""Issue #9: a short run of the `make bench` harness, for its accounting (not its speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.echo import TRACE
from bench.hotpath import measure
from bench.run import BenchOptions, run_bench
from bench.soak import VARIANTS as SOAK_VARIANTS
from bench.soak import soak
from bench.variants import (
    ECHO,
    EXT_PROC_FILTER,
    PREFILTER_PARTS,
    SIDECAR_AB,
    VARIANTS,
    proxy_config,
    upstream_config,
)
from ext_proc.dev.devstack import Ports, envoy_binary, free_port, hcm_of
from ext_proc.dev.soak import SoakConfig
from ext_proc.envoy_config.embed import envoy_validate

pytestmark = pytest.mark.e2e


def test_bench_harness_counts_every_request_and_span(tmp_path: Path) -> None:
    options = BenchOptions(rounds=1, seconds=1, light_rate=50, light_seconds=1,
                           warmup_seconds=1, workers=2, connections=8, threads=1,
                           out=tmp_path / "results", baseline="HEAD",
                           variants=(*VARIANTS, "baseline"))
    result = run_bench(options, workdir=tmp_path / "work", progress=False)

    assert [row.variant for row in result.rows] == [*VARIANTS, "baseline"]
    for row in result.rows:
        assert row.rps > 0 and row.requests > 0, row
        assert row.light_p50_ms > 0 and row.errors == 0, row
        assert row.envoy_us is not None and row.envoy_us > 0, row
        assert f"| {row.label} |" in result.table
    by_variant = {row.variant: row for row in result.rows}
    assert by_variant["alone"].spans is None and by_variant["alone"].sidecar_us is None
    assert by_variant["echo"].spans is None  # answers only: the floor
    assert by_variant["echo"].sidecar_us is not None and by_variant["echo"].sidecar_us > 0
    for traced in ("native", "sidecar", "workers", "baseline"):
        row = by_variant[traced]
        assert row.spans == row.requests == row.expected_spans, row  # every request, a span
    # at 1 %: exactly the requests whose x-request-id the policy samples have spans ...
    for sampled in ("sidecar-1pct", "sidecar-1pct-prefilter"):
        row = by_variant[sampled]
        assert row.expected_spans is not None and row.spans == row.expected_spans, row
        assert 0 < row.spans < row.requests * 0.05, row
    # ... and with the prefilter Envoy asks about those only; without, about every request
    prefiltered = by_variant["sidecar-1pct-prefilter"]
    assert prefiltered.asked == prefiltered.expected_spans
    assert by_variant["sidecar-1pct"].asked == by_variant["sidecar-1pct"].requests
    native = by_variant["native-1pct"]
    assert native.spans is not None and native.spans < native.requests * 0.05
    for sidecar in ("sidecar", "workers", "baseline"):
        row = by_variant[sidecar]
        assert row.failed_open == 0 and row.sidecar_us is not None and row.sidecar_us > 0
    run = result.runs[0]
    # requests Envoy saw = warm-up + saturation + light: at least what the clients counted
    assert run.requests >= run.saturation.requests + run.light.requests

    out = options.out
    assert result.markdown.parent == out and result.markdown.exists()
    latest = (out / "latest.md").read_text()
    assert result.table in latest and "Machine: " in latest
    assert (out / "latest.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "latest.json").exists()


def test_the_phases_grpclib_and_prefilter_part_rows_serve_and_count(tmp_path: Path) -> None:
    """sidecar-phases (#19) counts one SERVER span per request, its phase spans aside;
    echo-grpclib (#20) answers every request on grpclib (none failed open); echo-traced
    (#20) answers in the sidecar's shape, and Envoy takes it (its access log has the
    ids); the prefilter's parts (#18) serve every request, ask about none and record
    no span, and their sidecar still works (it counts them from the access log)."""
    variants = ("sidecar-phases", "echo-grpclib", "echo-traced", *PREFILTER_PARTS)
    options = BenchOptions(rounds=1, seconds=1, light_rate=50, light_seconds=1,
                           warmup_seconds=1, workers=2, connections=8, threads=1,
                           out=tmp_path / "results", variants=variants)
    result = run_bench(options, workdir=tmp_path / "work", progress=False)
    rows = {row.variant: row for row in result.rows}
    phases, grpclib = rows["sidecar-phases"], rows["echo-grpclib"]
    assert phases.spans == phases.requests == phases.expected_spans, phases
    assert phases.failed_open == 0 and phases.errors == 0, phases
    assert grpclib.rps > 0 and grpclib.errors == 0 and grpclib.failed_open == 0, grpclib
    assert grpclib.sidecar_us is not None and grpclib.sidecar_us > 0, grpclib
    traced = rows["echo-traced"]
    assert traced.errors == 0 and traced.failed_open == 0 and traced.spans is None, traced
    logged = [json.loads(line) for log in (tmp_path / "work").glob("*echo-traced*/access.log")
              for line in log.read_text().splitlines()]
    assert len(logged) == traced.requests, traced
    # every request answered downstream carries the echo's ids; the only ones without a
    # response are those a load client cut as it stopped (one per connection at most:
    # 4 warming up, 8 saturating, 4 paced), some before the echo's answer came
    answered = [e for e in logged if str(e["status"]) != "0"]
    assert 0 <= len(logged) - len(answered) <= 4 + options.connections + 4, traced
    assert {(e["trace_id"], e["span_id"]) for e in answered} == {
        (f"{TRACE.trace_id:032x}", f"{TRACE.span_id:016x}")}
    for part in PREFILTER_PARTS:
        row = rows[part]
        assert row.requests > 0 and row.errors == 0 and row.asked == 0, row
        assert row.spans == row.expected_spans == 0, row
        assert row.sidecar_us is not None and row.sidecar_us > 0, row


@pytest.mark.parametrize("part", PREFILTER_PARTS)
def test_each_prefilter_part_is_valid_and_adds_its_piece(part: str, tmp_path: Path) -> None:
    config = proxy_config(part, Ports(), tmp_path / "access.log", receiver_port=free_port())
    result = envoy_validate(config, envoy_binary())
    assert result.ok, result.output[-3000:]
    hcm = hcm_of(config)
    assert "'cluster_name': 'extproc_otel'" in str(hcm["access_log"])  # counted
    filters = {f["name"]: f for f in hcm["http_filters"]}
    if part == "sidecar-1pct-alsonly":
        assert EXT_PROC_FILTER not in filters
        return
    matcher = filters[EXT_PROC_FILTER]["typed_config"]["xds_matcher"]
    assert matcher["on_no_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")
    assert ("matcher_list" in matcher) == (part == "sidecar-1pct-matched")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_bench_config_is_valid_and_differs_only_in_tracing(
        variant: str, tmp_path: Path) -> None:
    config = proxy_config(variant, Ports(), tmp_path / "access.log", receiver_port=free_port())
    result = envoy_validate(config, envoy_binary())
    assert result.ok, result.output[-3000:]
    hcm = hcm_of(config)
    filters = [f["name"] for f in hcm["http_filters"]]
    asks = ("sidecar", "workers", "echo", "sidecar-1pct", "sidecar-1pct-prefilter")
    assert (EXT_PROC_FILTER in filters) == (variant in asks)
    talks_to_sidecar = "'cluster_name': 'extproc_otel'" in str(hcm)
    assert talks_to_sidecar == (variant in asks)
    assert ("tracing" in hcm) == (variant in ("native", "native-1pct"))
    wrapped = "ExtensionWithMatcher" in str(hcm)
    assert wrapped == (variant == "sidecar-1pct-prefilter")
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["match"] == {"prefix": "/bench"}


@pytest.mark.parametrize("variant", [*SIDECAR_AB, *ECHO])
def test_every_opt_in_config_is_valid(variant: str, tmp_path: Path) -> None:
    config = proxy_config(variant, Ports(), tmp_path / "access.log", receiver_port=free_port())
    result = envoy_validate(config, envoy_binary())
    assert result.ok, result.output[-3000:]
    assert EXT_PROC_FILTER in [f["name"] for f in hcm_of(config)["http_filters"]]


def test_opt_in_rows_and_the_baseline_are_chosen_from_the_environment() -> None:
    options = BenchOptions.from_env({"BENCH_CONFIGS": "sidecar,echo-sync",
                                     "BENCH_BASELINE": "HEAD~1"})
    assert options.variants == ("sidecar", "echo-sync", "baseline")
    assert options.label("baseline") == "Envoy + extproc-otel @ HEAD~1 (1 process)"
    assert BenchOptions.from_env({"BENCH_BASELINE": "v1"}).variants == (*VARIANTS, "baseline")
    with pytest.raises(ValueError, match="unknown"):
        BenchOptions.from_env({"BENCH_CONFIGS": "sidecar,nope"})


@pytest.mark.parametrize("full", [False, True], ids=["lean", "full"])
def test_hotpath_drives_every_exchange_to_an_exported_span(full: bool) -> None:
    us, main_us, spans = measure(300, full=full)
    assert spans == 300
    assert 0 < main_us <= us


def test_the_fast_upstream_config_is_valid() -> None:
    result = envoy_validate(upstream_config(free_port()), envoy_binary())
    assert result.ok, result.output[-3000:]


@pytest.mark.parametrize("config", ["lean", "prefilter"])
def test_the_long_soak_reports_its_steady_state_and_the_state_sizes(config: str) -> None:
    """`make soak-long` (#21) for a few seconds: requests counted by Envoy, the steady
    state's window, the sidecar's extproc.state sizes at the end."""
    report, problems = soak(SoakConfig(seconds=6, connections=4, warmup_seconds=2),
                            SOAK_VARIANTS[config], interval_s=0.5)
    assert report["requests"] > 0 and report["errors"] == 0, report
    assert report["steady_requests"] > 0 and report["rss_start_kib"] > 0, report
    sizes = report["state_sizes_end"]
    assert 0 < sizes["server.closed_streams"] <= 8192, sizes
    if config == "prefilter":  # un-asked requests: counted from Envoy's access log
        assert sizes.get("join.recent", 0) > 0, sizes
    assert not [p for p in problems if "failed" in p], problems
