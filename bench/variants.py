"""The Envoy configs under test, all derived in code from the shipped ``envoy/envoy.yaml``.

Every variant serves ``/bench`` from the same fast upstream (a second Envoy with a
``direct_response``), keeps the shipped access log (to a file), and differs only in
what traces the request:

- ``alone``: everything that talks to the sidecar removed (the ext_proc filter and
  the gRPC access log);
- ``native``: the same, plus Envoy's own OpenTelemetry tracer on at
  100 % sampling, exporting OTLP/gRPC to the bench's receiver;
- ``sidecar``: the shipped config, one sidecar process;
- ``workers``: the shipped config with ``envoy/envoy-workers.yaml``'s processor
  cluster settings, N sidecar processes;
- ``echo``: the shipped config, with ``bench/echo.py`` instead of the sidecar: an
  ext_proc server that only answers, on the sidecar's own gRPC server
  (``ext_proc.h2grpc``). The floor under the sidecar.
- at 1 % sampling (issue #18): ``native-1pct``, Envoy's tracer sampling 1 %;
  ``sidecar-1pct``, the shipped config (Envoy asks about every request) and a sidecar
  sampling 1 %; ``sidecar-1pct-prefilter``, the same with the ext_proc filter wrapped in
  the prefilter ``envoy-config`` compiles for 1 % (Envoy asks only about ~1 %);
  opt-in, the prefilter taken apart (`PREFILTER_PARTS`): each row adds one piece, and
  none asks about any request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from ext_proc.dev.devstack import (
    ENVOY_YAML,
    FULL_YAML,
    ROOT,
    Config,
    Ports,
    hcm_of,
    render_envoy_config,
    static_cluster,
)

EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"
SIDECAR_CLUSTER: Final = "extproc_otel"
WORKERS_YAML: Final = ROOT / "envoy" / "envoy-workers.yaml"
BENCH_PATH: Final = "/bench"
NATIVE_SERVICE: Final = "envoy-native-tracer"
# The native tracer buffers spans and sends them every flush interval (default 5 s)
# or every min_flush_spans; a shorter interval only makes the end-of-run flush quick.
_NATIVE_RUNTIME: Final = {"tracing.opentelemetry.flush_interval_ms": 1000}
_HTTP2: Final = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def upstream_config(port: int) -> Config:
    """A second Envoy answering every request with a small 200: a fast upstream, so the
    proxy and the tracing are what gets measured."""
    return {"static_resources": {"listeners": [{
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "upstream",
                "route_config": {"virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {
                        "status": 200, "body": {"inline_string": "ok\n"}}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}],
            }}]}],
    }]}}


def _to_sidecar(access_log: Config) -> bool:
    """An access logger that streams to the sidecar (envoy.yaml's gRPC access log)."""
    common = access_log.get("typed_config", {}).get("common_config", {})
    cluster = common.get("grpc_service", {}).get("envoy_grpc", {}).get("cluster_name")
    return bool(cluster == SIDECAR_CLUSTER)


def _without_ext_proc(config: Config) -> None:
    """Drop everything that talks to the sidecar: the filter, its per-route overrides
    and the gRPC access log."""
    hcm = hcm_of(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != EXT_PROC_FILTER]
    hcm["access_log"] = [a for a in hcm.get("access_log", []) if not _to_sidecar(a)]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            per_filter = route.get("typed_per_filter_config", {})
            per_filter.pop(EXT_PROC_FILTER, None)
            if not per_filter:
                route.pop("typed_per_filter_config", None)


def _native_tracer(config: Config, receiver_port: int, percent: float = 100) -> None:
    hcm_of(config)["tracing"] = {
        "random_sampling": {"value": percent},
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"},
            "service_name": NATIVE_SERVICE}}}
    config["static_resources"]["clusters"].append(
        static_cluster("otlp", receiver_port, http2=True))
    layers = config.setdefault("layered_runtime", {"layers": []})["layers"]
    layers.append({"name": "bench_native_tracer", "static_layer": dict(_NATIVE_RUNTIME)})


def _with_prefilter(config: Config, ratio: float) -> None:
    """The shipped ext_proc filter behind the prefilter `envoy-config` compiles for
    `ratio` (its matcher around the composite filter, and its digest as the stream's
    initial metadata)."""
    from ext_proc.config import Settings
    from ext_proc.envoy_config import options_for, render, unwrap

    settings = Settings.model_validate({"sampling": {"ratio": ratio}})
    printed = yaml.safe_load(render("snippet", settings, options_for(settings)))
    (wrapped,) = [f for f in printed["http_filters"] if f["name"] == EXT_PROC_FILTER]
    inner = unwrap(wrapped)  # the ext_proc config inside the wrapper, changed in place
    digest = inner["grpc_service"]["initial_metadata"]
    hcm = hcm_of(config)
    index = next(i for i, f in enumerate(hcm["http_filters"]) if f["name"] == EXT_PROC_FILTER)
    shipped = dict(hcm["http_filters"][index]["typed_config"])
    shipped["grpc_service"] = {**shipped["grpc_service"], "initial_metadata": digest}
    inner.clear()
    inner.update(shipped)
    hcm["http_filters"][index] = wrapped


_SKIP: Final = {"action": {"name": "skip", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}


def _prefilter_part(config: Config, variant: str) -> None:
    """One of `PREFILTER_PARTS`: the shipped config less the ext_proc filter, or with it
    wrapped as the prefilter wraps it and skipped for every request."""
    hcm = hcm_of(config)
    if variant == "sidecar-1pct-alsonly":
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != EXT_PROC_FILTER]
        return
    _with_prefilter(config, SAMPLED_RATIO)
    (wrapped,) = [f for f in hcm["http_filters"] if f["name"] == EXT_PROC_FILTER]
    matcher = wrapped["typed_config"]["xds_matcher"]
    if variant == "sidecar-1pct-wrapped":  # no matcher to evaluate
        wrapped["typed_config"]["xds_matcher"] = {"on_no_match": _SKIP}
    else:  # the compiled matcher runs in full; what it does not skip is skipped anyway
        matcher["on_no_match"] = _SKIP


def workers_cluster(source: Path = WORKERS_YAML) -> Config:
    """The ``extproc_otel`` cluster of the scale-out variant file."""
    config = yaml.safe_load(source.read_text())
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == SIDECAR_CLUSTER:
            return dict(cluster)
    raise ValueError(f"{source}: no extproc_otel cluster")


def proxy_config(variant: str, ports: Ports, access_log: Path, receiver_port: int,
                 source: Path = ENVOY_YAML, workers_source: Path = WORKERS_YAML) -> Config:
    """The proxy Envoy's config for `variant` (alone | native | sidecar | workers);
    ``ports.users`` is the fast upstream."""
    if variant.endswith("-full"):  # envoy-full.yaml: every response phase too
        source = FULL_YAML
    config = render_envoy_config(ports, access_log, source)
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"name": "bench", "match": {"prefix": BENCH_PATH},
                      "route": {"cluster": "users"}})
    if variant in ("alone", "native", "native-1pct"):
        _without_ext_proc(config)
    if variant in ALS_BUFFER:  # the access log's batches to the sidecar, resized
        for log in hcm_of(config)["access_log"]:
            if _to_sidecar(log):
                log["typed_config"]["common_config"]["buffer_size_bytes"] = ALS_BUFFER[variant]
    if variant == "native":
        _native_tracer(config, receiver_port)
    if variant == "native-1pct":
        _native_tracer(config, receiver_port, SAMPLED_RATIO * 100)
    if variant in ("sidecar-1pct-prefilter", "sidecar-1pct-prefilter-als64k"):
        _with_prefilter(config, SAMPLED_RATIO)
    if variant in PREFILTER_PARTS:
        _prefilter_part(config, variant)
    if variant == "workers":
        clusters = config["static_resources"]["clusters"]
        index = next(i for i, c in enumerate(clusters) if c["name"] == SIDECAR_CLUSTER)
        spread = workers_cluster(workers_source)
        spread["load_assignment"] = clusters[index]["load_assignment"]  # keep our port
        clusters[index] = spread
    if variant not in (*VARIANTS, *SIDECAR_AB, *ECHO, *PREFILTER_PARTS, "baseline"):
        raise ValueError(f"unknown variant {variant!r}")
    return config


VARIANTS: Final = ("alone", "native", "echo", "sidecar", "workers", "native-1pct",
                    "sidecar-1pct", "sidecar-1pct-prefilter")
SAMPLED_RATIO: Final = 0.01  # the *-1pct rows
# The sidecar rows at 1 %: the sidecar's sampling settings (the same for both).
SAMPLED_ENV: Final = {"EXTPROC_SAMPLING__RATIO": str(SAMPLED_RATIO)}
# Opt-in rows (BENCH_CONFIGS) for A/B measurements of the sidecar itself: Envoy as
# for "sidecar", the sidecar with these extra environment variables.
SIDECAR_AB: Final = {
    "sidecar-asyncio": {"EXTPROC_SERVER__EVENT_LOOP": "asyncio"},
    "sidecar-nojoin": {"EXTPROC_STREAM__JOIN_ACCESS_LOG": "false"},
    "sidecar-nolog": {"EXTPROC_LOG__ACCESS_LOG": "false"},
    "sidecar-nometrics": {"EXTPROC_METRICS__ENABLED": "false"},
    "sidecar-full": {},
    "sidecar-noexport": {"OTEL_TRACES_EXPORTER": "none"},
    "sidecar-als0": {},
    "sidecar-grpcio": {"EXTPROC_SERVER__ENGINE": "grpcio"},
    "sidecar-phases": {"EXTPROC_STREAM__PHASE_SPANS": "true"},
    "sidecar-h2lib": {"EXTPROC_SERVER__HTTP2_LAYER": "h2"},  # the h2 library's HTTP/2
    "sidecar-1pct-prefilter-als64k": {},  # the prefilter row, access log in 64 KiB batches
}
# Access-log buffer sizes (bytes) of rows that change envoy.yaml's 16 KiB: 0 sends one
# message per entry (what batching saved), 64 KiB a quarter of the messages.
ALS_BUFFER: Final = {"sidecar-als0": 0, "sidecar-1pct-prefilter-als64k": 65536}
# Opt-in rows at 1 % that take the prefilter apart, one piece added per row, to show
# what each costs Envoy and the sidecar. No request is asked about in any of them (no
# span is expected); the sidecar counts every request from Envoy's access log.
PREFILTER_PARTS: Final = {
    "sidecar-1pct-alsonly": "access log only",  # no ext_proc filter at all
    "sidecar-1pct-wrapped": "match_delegate, no matcher, all skipped",
    "sidecar-1pct-matched": "the prefilter's matcher, all skipped",
}
# Opt-in rows: the floor, bench/echo.py (answers only) in a mode, behind the shipped
# config or, with "-full", envoy-full.yaml.
ECHO: Final = {"echo": "h2", "echo-full": "h2", "echo-task": "h2-task", "echo-grpcio": "aio",
               "echo-grpcio-full": "aio", "echo-rw": "aio-rw", "echo-sync": "sync",
               "echo-sync-full": "sync", "echo-busy75": "h2", "echo-grpclib": "grpclib",
               "echo-h2lib": "h2", "echo-traced": "h2"}
# echo-busy75: 75 us of CPU per answered message (150 per request), about what our
# own code costs per request (bench.hotpath): how much gRPC's share grows with it.
ECHO_ENV: Final = {"echo-busy75": {"ECHO_BUSY_US": "75"},
                   # the h2 engine on the h2 library's HTTP/2 layer (before 0.2.0)
                   "echo-h2lib": {"EXTPROC_SERVER__HTTP2_LAYER": "h2"},
                   # answers request headers as the sidecar does (a traceparent, ids as
                   # dynamic metadata), with no work: Envoy's side of the sidecar's answer
                   "echo-traced": {"ECHO_ANSWER": "traced"}}

WORKERS_STREAMS: Final = 4  # measured with make bench: see the README's Performance section
_WORKERS_HEADER: Final = """\
# Envoy bootstrap for `extproc-otel serve --workers N` (Envoy 1.40).
#
# GENERATED from envoy-full.yaml (itself from envoy.yaml) by `python -m bench.variants`:
# do not edit. Every response phase is sent, as in envoy-full.yaml: with N workers a
# request's access-log entry may reach another worker than its ext_proc stream, so
# the response phase is what tells each worker how its exchanges ended. The other
# change is in the extproc_otel cluster: see its http2_protocol_options.
"""
_H2_EMPTY: Final = "http2_protocol_options: {}"


def render_workers_yaml(reference: str) -> str | None:
    """envoy.yaml's text with a stream limit on the processor cluster's HTTP/2 options
    (and a header saying so); None when the cluster or its options are not found."""
    cluster_at = reference.find("- name: extproc_otel")
    h2_at = reference.find(_H2_EMPTY, cluster_at)
    admin_at = reference.find("\nadmin:")
    if min(cluster_at, h2_at, admin_at) < 0:
        return None
    indent = " " * (h2_at - reference.rfind("\n", 0, h2_at) - 1 + 2)
    limited = (
        "http2_protocol_options:\n"
        f"{indent}# With --workers N the workers share the port (SO_REUSEPORT) and the\n"
        f"{indent}# kernel spreads connections, not streams: a low stream limit makes\n"
        f"{indent}# each Envoy worker thread open several connections under load.\n"
        f"{indent}max_concurrent_streams: {WORKERS_STREAMS}")
    body = reference[admin_at + 1:h2_at] + limited + reference[h2_at + len(_H2_EMPTY):]
    return _WORKERS_HEADER + body


_FULL_HEADER: Final = """\
# GENERATED from envoy.yaml by `python -m bench.variants`: edit envoy.yaml, then rerun.
#
# The full variant: Envoy also sends every response's headers (and gRPC trailers)
# to the sidecar, two or three ext_proc messages per request instead of one. Use it
# when a filter ahead of ext_proc can deny requests (ext_proc never sees those in
# the lean envoy.yaml, so they get no span). Compare: BENCH_CONFIGS=sidecar,sidecar-full.
#
"""
_LEAN_MODES: Final = ("response_header_mode: SKIP", "response_trailer_mode: SKIP")
_LEAN_NOTE: Final = "# Lean: one ext_proc message per request."
_FULL_NOTE: Final = "# Full: every response's headers (and gRPC trailers) come to the sidecar too."


def render_full_yaml(reference: str) -> str | None:
    """envoy.yaml's text with the response phase sent; None if its modes are not found."""
    if any(reference.count(mode) != 1 for mode in (*_LEAN_MODES, _LEAN_NOTE)):
        return None
    body = reference[reference.find("\nadmin:") + 1:]
    for mode in _LEAN_MODES:
        body = body.replace(mode, mode.replace("SKIP", "SEND"))
    note_at = body.find(_LEAN_NOTE)
    indent = body[body.rfind("\n", 0, note_at) + 1:note_at]
    note_end = body.find("\n" + indent + "processing_mode:", note_at)
    return _FULL_HEADER + body[:note_at] + _FULL_NOTE + body[note_end:]


def dump(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


if __name__ == "__main__":
    full = render_full_yaml(ENVOY_YAML.read_text())
    workers = render_workers_yaml(full) if full is not None else None
    if full is None or workers is None:
        raise SystemExit(f"{ENVOY_YAML}: cannot derive {FULL_YAML.name} and {WORKERS_YAML.name}")
    for path, text in ((FULL_YAML, full), (WORKERS_YAML, workers)):
        path.write_text(text)
        print(f"wrote {path}")
