"""Issue #21: every cache and waiting set the sidecar keeps between messages has a bound
and reports its size (``extproc.state.size`` / ``extproc.state.capacity``).

Each structure `build_sidecar` lists is driven past its capacity through its own API,
and must hold at most its capacity (and something: a size that reads 0 would say
nothing). A structure added to the sidecar without a case here fails
`test_every_structure_the_sidecar_keeps_is_bounded_here`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import h2.config
import h2.connection
import hpack
import pytest
from hpack import NeverIndexedHeaderTuple
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2
from ext_proc.app import build_sidecar
from ext_proc.config import PropagationSettings, load_settings
from ext_proc.config.sampling import SamplingSettings
from ext_proc.config.telemetry import MetricsSettings
from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.unasked import CachedPaths, RouteTemplates
from ext_proc.h2grpc import Server
from ext_proc.h2grpc.connection import Connection
from ext_proc.h2grpc.h2state import CLOSED_STREAMS_KEPT, KEPT_HEADER_BLOCKS
from ext_proc.policy.propagation import PropagatorCache, Rejections
from ext_proc.policy.sampling import build_sampling
from ext_proc.policy.sampling.directive import RequestFacts
from ext_proc.request.route_options import RouteOptionsCache
from ext_proc.request.seams import Bounded, ExchangeRecord
from ext_proc.telemetry.metrics.pipeline import build_metrics
from ext_proc.telemetry.metrics.red import STATE, STATE_CAPACITY, STATE_SIZE
from ext_proc.telemetry.metrics.tables import HistogramTable
from ext_proc.telemetry.otlp_encode import SpanEncoder

NS: Final = "extproc_otel"
OVER: Final = 10  # entries pushed past each capacity


def by_name(bounded: tuple[Bounded, ...], name: str) -> Bounded:
    (found,) = [b for b in bounded if b.name == name]
    return found


def fill_propagators() -> tuple[Bounded, ...]:
    cache = PropagatorCache(Rejections())
    for i in range(cache.MAX_ENTRIES + OVER):
        cache.get(PropagationSettings(clear=[f"x-clear-{i}"]))
    return cache.bounded()


def fill_route_options() -> tuple[Bounded, ...]:
    cache = RouteOptionsCache(PropagationSettings())
    for i in range(cache.MAX_ENTRIES + OVER):
        # one distinct set of our keys, and one distinct whole metadata, each
        cache.get((("x-extproc-otel-http-route", f"/r{i}"), ("other", str(i))))
    return cache.bounded()


def fill_route_templates() -> tuple[Bounded, ...]:
    routes = RouteTemplates()
    for i in range(routes.MAX_ROUTES + OVER):
        routes.stream_finished(ExchangeRecord("GET", f"/r{i}", 200, None, 0.0,
                                              SpanContext(1, 1, False), route_name=f"n{i}"))
    return routes.bounded()


def fill_paths() -> tuple[Bounded, ...]:
    paths = CachedPaths(lambda raw: raw, size=64)
    for i in range(64 + OVER):
        paths(f"/p{i}?token=secret")
    return paths.bounded()


def connected_join() -> AccessLogJoin:
    join = AccessLogJoin(10.0, 10.0, unasked=lambda entries: None, namespace=NS)
    join.service.connected = True
    return join


def fill_open() -> tuple[Bounded, ...]:
    join = connected_join()
    for i in range(join.MAX_OPEN + OVER):
        join.opened(f"r{i}")  # streams that never close cleanly
    return join.bounded()


def fill_recent() -> tuple[Bounded, ...]:
    join = connected_join()
    message = als_pb2.StreamAccessLogsMessage()
    for i in range(join.MAX_RECENT + OVER):  # un-asked entries: no exchange opened
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = f"u{i}"
        entry.common_properties.access_log_type = log_pb.DownstreamEnd
    join.service.handle(message)
    return join.bounded()


def _parked(responded: bool, overloaded: bool) -> tuple[Bounded, ...]:
    async def fill() -> tuple[Bounded, ...]:
        join = connected_join()
        if overloaded:  # an entry came without our answer's metadata: Envoy timed out
            join.service.answers_dropped += 1
        for i in range(join.finalizer.MAX_PARKED + OVER):
            join.defer(f"r{i}", lambda facts: None, responded=responded)
        return join.bounded()
    return asyncio.run(fill())


def fill_kept() -> tuple[Bounded, ...]:
    join = connected_join()
    for i in range(join.finalizer.MAX_KEPT + OVER):  # entries whose exchange never came
        join.deliver(FinalFacts(f"r{i}", 200, (), None, None))
    return join.bounded()


def fill_tenants() -> tuple[Bounded, ...]:
    policy = build_sampling(SamplingSettings(tenant_budget={"traces_per_second": 1},
                                             max_tenants=8))
    for i in range(8 + OVER):
        policy.directive(RequestFacts(None, "/", "GET", {}, f"tenant-{i}", None))
    return policy.bounded()


def fill_encoder() -> tuple[Bounded, ...]:
    encoder = SpanEncoder()
    context = SpanContext(1, 2, False, TraceFlags(1))
    for batch in range(3):  # new keys, and new values of one key, past the caches
        attributes = {f"k{batch}-{i}": i for i in range(encoder.MAX_CACHE // 2 + OVER)}
        encoder.encode([ReadableSpan("s", context, attributes=attributes,
                                     resource=Resource.create({}))])
    return encoder.bounded()


def fill_header_blocks() -> tuple[Bounded, ...]:
    async def fill() -> tuple[Bounded, ...]:
        server = Server()
        connection = Connection(server)  # not connected: its cache alone
        server.connections.add(connection)
        for i in range(200):  # one distinct header block per stream
            connection.metadata([(b"x-route", str(i).encode())])
        return tuple(Bounded(*b) for b in server.bounded())
    return asyncio.run(fill())


def fill_hpack_blocks() -> tuple[Bounded, ...]:
    """Distinct header blocks that leave the dynamic tables alone (literals never
    indexed), each remembered by the connection's HPACK decoder (received) or encoder
    (sent; a header list whose encoding no longer changes the table)."""
    async def fill() -> tuple[Bounded, ...]:
        server = Server()
        connection = Connection(server)
        server.connections.add(connection)
        encoder = hpack.Encoder()
        for i in range(KEPT_HEADER_BLOCKS + OVER):
            block = encoder.encode([NeverIndexedHeaderTuple(b"x-route", str(i).encode())])
            connection._h2.decoder.decode(block, raw=True)
        connection._h2.encoder.header_table_size = 0  # nothing is ever added to it
        for i in range(KEPT_HEADER_BLOCKS + OVER):
            connection._h2.encoder.encode([(b"x-sent", str(i).encode())])
        return tuple(Bounded(*b) for b in server.bounded())
    return asyncio.run(fill())


def fill_closed_streams() -> tuple[Bounded, ...]:
    """Streams opened and ended through the connection's h2 state, in memory: h2 would
    remember 65,536 closed ones (~10 MB a connection)."""
    async def fill() -> tuple[Bounded, ...]:
        server = Server()
        connection = Connection(server)
        server.connections.add(connection)
        ours = connection._h2
        ours.initiate_connection()
        peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        peer.initiate_connection()
        ours.receive_data(peer.data_to_send())
        peer.receive_data(ours.data_to_send())
        request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.S/M"),
                   (b":authority", b"sidecar")]
        for _ in range(CLOSED_STREAMS_KEPT + OVER):
            stream = peer.get_next_available_stream_id()
            peer.send_headers(stream, request, end_stream=True)
            ours.receive_data(peer.data_to_send())
            ours.send_headers(stream, [(b":status", b"200")], end_stream=True)
            peer.receive_data(ours.data_to_send())
        return tuple(Bounded(*b) for b in server.bounded())
    return asyncio.run(fill())


def fill_table() -> tuple[Bounded, ...]:
    table = HistogramTable("t", "s", "", (1.0,), limit=5)
    for i in range(5 + OVER):
        table.record(("GET", f"/r{i}"), 0.5, lambda: {"k": "v"})
    return (table.bounded(),)


# name -> how to push it past its capacity (the structure built on its own)
FILLERS: Final[dict[str, Callable[[], tuple[Bounded, ...]]]] = {
    "propagators": fill_propagators,
    "route_options": fill_route_options,
    "route_options.metadata": fill_route_options,
    "unasked.routes": fill_route_templates,
    "unasked.paths": fill_paths,
    "join.open": fill_open,
    "join.recent": fill_recent,
    "join.parked": lambda: _parked(responded=True, overloaded=False),
    "join.kept": fill_kept,
    "join.awaiting.parked": lambda: _parked(responded=False, overloaded=False),
    "join.hurried.parked": lambda: _parked(responded=False, overloaded=True),
    "sampling.tenants": fill_tenants,
    "export.attribute_keys": fill_encoder,
    "export.attributes": fill_encoder,
    "server.header_blocks": fill_header_blocks,
    "server.hpack_blocks": fill_hpack_blocks,
    "server.closed_streams": fill_closed_streams,
    "metrics.t": fill_table,
}
# Bounded by tests of their own: calls past server.max_backlog are shed (UNAVAILABLE).
ELSEWHERE: Final = {
    "server.backlog": "tests/unit/h2grpc/test_h2grpc_direct.py::"
                      "test_streams_one_read_opens_past_the_backlog_are_shed",
}
TABLES: Final = ("metrics.http.server.request.duration",
                 "metrics.http.server.response.body.size",
                 "metrics.extproc.gateway.added_duration", "metrics.extproc.phase.duration")


@pytest.mark.parametrize("name", sorted(FILLERS))
def test_each_structure_stays_within_its_capacity(name: str) -> None:
    bound = by_name(FILLERS[name](), name)
    assert 0 < bound.size() <= bound.capacity, (name, bound.size(), bound.capacity)


def _sidecar_names() -> Iterator[str]:
    async def built() -> tuple[Bounded, ...]:
        settings = load_settings(server={"listen": "127.0.0.1:0"})
        return build_sidecar(settings).bounded
    for bound in asyncio.run(built()):
        yield bound.name


def test_every_structure_the_sidecar_keeps_is_bounded_here() -> None:
    names = set(_sidecar_names())
    assert set(TABLES) <= names  # every metric table is bounded by its cardinality limit
    assert names - set(TABLES) == (set(FILLERS) | set(ELSEWHERE)) - {"metrics.t"}
    for where in ELSEWHERE.values():
        path, _, test = where.partition("::")
        assert f"def {test}(" in Path(path).read_text(), where


def test_sizes_and_capacities_are_metrics() -> None:
    reader = InMemoryMetricReader()
    metrics = build_metrics(MetricsSettings(), readers=(reader,))
    assert metrics.runtime is not None
    routes = RouteTemplates()
    routes.stream_finished(ExchangeRecord("GET", "/a", 200, None, 0.0, SpanContext(1, 1, False),
                                          route_name="a"))
    metrics.runtime.observe_state(routes.bounded())
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, dict[object, float]] = {}
    for m in (m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name in (STATE_SIZE, STATE_CAPACITY)):
        points = [p for p in m.data.data_points if isinstance(p, NumberDataPoint)]
        found[m.name] = {(p.attributes or {})[STATE]: p.value for p in points}
    assert found == {STATE_SIZE: {"unasked.routes": 1},
                     STATE_CAPACITY: {"unasked.routes": RouteTemplates.MAX_ROUTES}}


def test_a_connection_remembers_fewer_closed_streams_than_h2_would() -> None:
    bound = by_name(fill_closed_streams(), "server.closed_streams")
    assert bound.size() == bound.capacity == CLOSED_STREAMS_KEPT
    assert CLOSED_STREAMS_KEPT < h2.connection.H2Connection.MAX_CLOSED_STREAMS


def _seconds_per_entry(join: AccessLogJoin, batches: list[list[log_pb.HTTPAccessLogEntry]]
                       ) -> float:
    start = time.perf_counter()
    for batch in batches:
        join._count_unasked(batch)
    return (time.perf_counter() - start) / sum(map(len, batches))


def test_at_its_bound_the_recent_set_forgets_in_constant_time() -> None:
    """At 1 % with the prefilter, `join.recent` sits at its bound from the first seconds:
    forgetting its oldest entry must not cost more as entries come and go. (A plain
    dict's `next(iter(d))` walks every slot deleted since its last resize: there,
    counting an entry at the bound cost 4.0-4.3x what it cost below it; 1.8-2.0x
    with an OrderedDict.)"""
    def batches(prefix: str, count: int) -> list[list[log_pb.HTTPAccessLogEntry]]:
        out = []
        for b in range(count):
            batch = []
            for i in range(500):
                entry = log_pb.HTTPAccessLogEntry()
                entry.request.request_id = f"{prefix}{b}-{i}"
                batch.append(entry)
            out.append(batch)
        return out

    below = min(_seconds_per_entry(connected_join(), batches(f"b{r}-", 20))
                for r in range(5))
    join = connected_join()
    _seconds_per_entry(join, batches("fill-", join.MAX_RECENT // 500 + 1))  # at its bound
    at_bound = min(_seconds_per_entry(join, batches(f"a{r}-", 20)) for r in range(5))
    assert by_name(join.bounded(), "join.recent").size() == join.MAX_RECENT
    assert at_bound < 3 * below, (at_bound, below)
