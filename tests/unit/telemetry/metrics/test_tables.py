"""HistogramTable against the SDK's own histogram: the same measurements give the same
points (attributes, counts, sum, min/max, buckets, exemplars) for every temporality,
exemplar filter and cardinality overflow, collection after collection (one documented
difference: overflow under delta temporality)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from ext_proc.telemetry.metrics.tables import HistogramTable, attach, histogram_temporality

BOUNDS = (0.005, 0.01, 0.1, 1.0)
FILTERS = {"trace_based": TraceBasedExemplarFilter(), "always_on": AlwaysOnExemplarFilter(),
           "always_off": AlwaysOffExemplarFilter()}


def contexts(rng: random.Random) -> SpanContext:
    kind = rng.choice(("sampled", "unsampled", "none"))
    if kind == "none":
        return INVALID_SPAN_CONTEXT
    return SpanContext(rng.getrandbits(128) | 1, rng.getrandbits(64) | 1, is_remote=False,
                       trace_flags=TraceFlags(1 if kind == "sampled" else 0))


def points(data: MetricsData | None, name: str) -> list[dict[str, Any]]:
    found = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                for p in metric.data.data_points:
                    found.append({
                        "attributes": dict(p.attributes), "count": p.count,
                        "sum": round(p.sum, 9), "buckets": tuple(p.bucket_counts),
                        "bounds": tuple(p.explicit_bounds), "min": p.min, "max": p.max,
                        "temporality": metric.data.aggregation_temporality,
                        "exemplars": sorted((e.value, e.trace_id, e.span_id,
                                             dict(e.filtered_attributes or {}))
                                            for e in p.exemplars),
                    })
    return sorted(found, key=lambda p: sorted(p["attributes"].items()))


def pair(temporality: AggregationTemporality, exemplars: str, limit: int):
    """An SDK histogram and a table, each with its own provider and reader."""
    prefer = {Histogram: temporality}
    sdk_reader = InMemoryMetricReader(preferred_temporality=prefer)
    sdk = MeterProvider(metric_readers=[sdk_reader], exemplar_filter=FILTERS[exemplars],
                        views=[View(instrument_name="*", aggregation_cardinality_limit=limit)])
    instrument = sdk.get_meter("ext_proc").create_histogram(
        "d", unit="s", explicit_bucket_boundaries_advisory=BOUNDS)
    ours_reader = InMemoryMetricReader(preferred_temporality=prefer)
    resource = Resource.create({"service.name": "t"})
    MeterProvider(metric_readers=[ours_reader], resource=resource)
    table = HistogramTable("d", "s", "", BOUNDS, limit=limit, exemplars=exemplars)
    attach([ours_reader], [table], resource, InstrumentationScope("ext_proc", "1"))
    return instrument, sdk_reader, table, ours_reader


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE,
                                         AggregationTemporality.DELTA])
@pytest.mark.parametrize("exemplars", sorted(FILTERS))
@pytest.mark.parametrize("limit", [3, 2000])
def test_table_matches_the_sdk_histogram(temporality: AggregationTemporality,
                                         exemplars: str, limit: int) -> None:
    instrument, sdk_reader, table, ours_reader = pair(temporality, exemplars, limit)
    rng = random.Random(7)
    for collection in range(3):
        for _ in range(400 if collection != 1 else 0):  # the second interval is empty
            route = rng.choice(("/a", "/b", "/c", "/d", "/e"))
            value = rng.choice((0.0, 0.005, 0.0051, 0.5, 3.0, rng.random()))
            context = contexts(rng)
            attrs = {"http.route": route}
            instrument.record(value, attrs, set_span_in_context(
                NonRecordingSpan(context) if context.is_valid else INVALID_SPAN))
            table.record(route, value, lambda a=attrs: a, context)
        want = points(sdk_reader.get_metrics_data(), "d")
        got = points(ours_reader.get_metrics_data(), "d")
        assert sum(p["count"] for p in got) == sum(p["count"] for p in want)
        if limit == 3 and temporality is AggregationTemporality.DELTA:
            # The SDK forgets a delta reader's attribute sets at each collection, so its
            # overflow depends on the interval; a table keeps its first `limit` sets.
            assert {tuple(p["attributes"]) for p in got} <= \
                {("http.route",), ("otel.metric.overflow",)}
            continue
        if exemplars == "always_on":
            # The SDK's bucket keeps the ids of an earlier exemplar when a later one
            # without a span replaces it; a table reports no ids then. Values agree.
            for p in (*got, *want):
                p["exemplars"] = [e[0] for e in p["exemplars"]]
        assert got == want, f"collection {collection}"
        if collection != 1:
            assert got, "measurements were recorded"
    if limit == 3:
        assert {"otel.metric.overflow": True} in [p["attributes"] for p in want]


def test_exemplars_are_reported_once_per_reader() -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    resource = Resource.create({})
    MeterProvider(metric_readers=[first, second], resource=resource)
    table = HistogramTable("d", "s", "", BOUNDS)
    attach([first, second], [table], resource, InstrumentationScope("ext_proc"))
    sampled = SpanContext(5, 6, False, TraceFlags(1))
    table.record("k", 0.2, lambda: {"k": "v"}, sampled)
    for reader in (first, second):
        (p,) = points(reader.get_metrics_data(), "d")
        assert [(e[1], e[2]) for e in p["exemplars"]] == [(5, 6)]
        (p,) = points(reader.get_metrics_data(), "d")
        assert p["exemplars"] == [] and p["count"] == 1


def test_temporality_is_read_from_the_reader() -> None:
    delta = InMemoryMetricReader(preferred_temporality={
        Histogram: AggregationTemporality.DELTA})
    assert histogram_temporality(delta) is AggregationTemporality.DELTA
    assert histogram_temporality(InMemoryMetricReader()) is AggregationTemporality.CUMULATIVE


def test_unknown_exemplar_filter_is_refused() -> None:
    with pytest.raises(ValueError, match="exemplar filter"):
        HistogramTable("d", "s", "", exemplars="sometimes")


def test_a_table_without_measurements_adds_nothing() -> None:
    reader = InMemoryMetricReader()
    resource = Resource.create({})
    MeterProvider(metric_readers=[reader], resource=resource)
    attach([reader], [HistogramTable("d", "s", "")], resource, InstrumentationScope("x"))
    assert points(reader.get_metrics_data(), "d") == []


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE,
                                         AggregationTemporality.DELTA])
@pytest.mark.parametrize("exemplars", sorted(FILTERS))
@pytest.mark.parametrize("limit", [3, 2000])
def test_record_many_is_record_for_each_value(temporality: AggregationTemporality,
                                              exemplars: str, limit: int) -> None:
    """A batch of span-less measurements grouped by key gives the points one `record`
    each gives: the same counts, buckets, min/max, sums to the last bit, exemplars."""
    one = pair(temporality, exemplars, limit)
    many = pair(temporality, exemplars, limit)
    rng = random.Random(11)
    for collection in range(3):
        batch = [(rng.choice(("/a", "/b", "/c", "/d", "/e")),
                  rng.choice((0.0, 0.005, 0.0051, 0.5, 3.0, rng.random() / 3)))
                 for _ in range(300 if collection != 1 else 0)]
        groups: dict[str, list[float]] = {}
        for route, value in batch:
            one[2].record(route, value, lambda r=route: {"http.route": r}, INVALID_SPAN_CONTEXT)
            groups.setdefault(route, []).append(value)
        for route, values in groups.items():
            many[2].record_many(route, values, lambda r=route: {"http.route": r})
        many[2].record_many("/a", [], lambda: {"http.route": "/a"})  # nothing: no point
        want = points(one[3].get_metrics_data(), "d")
        got = points(many[3].get_metrics_data(), "d")
        for p in (*got, *want):
            if p["attributes"] == {"otel.metric.overflow": True}:
                # the overflow bucket keeps its latest exemplar: a batch offers its
                # sets one after the other, so which set's is latest may differ
                p["exemplars"] = len(p["exemplars"])
        assert got == want, f"collection {collection}"
        # to the bit, but for the overflow point (its sets' values interleave)
        assert [(p.total, p.low, p.high) for p in many[2]._points.values() if not p.overflow] \
            == [(p.total, p.low, p.high) for p in one[2]._points.values() if not p.overflow]
        if collection != 1:
            assert got, "measurements were recorded"
        if exemplars != "always_on":
            assert not any(p["exemplars"] for p in got)  # no span, no exemplar
        elif collection != 1:
            assert any(p["exemplars"] for p in got)
