"""Phase spans (#19): the filters/upstream/response children of the SERVER span, from
Envoy's access-log timings; unit level (the e2e tests time them on a real Envoy)."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode

from ext_proc.config import PropagationSettings
from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.phases import PhaseSpans, split_address, upstream_seconds
from ext_proc.exchange.request_info import RequestInfo, request_info
from ext_proc.exchange.session import StreamDeps, StreamSession
from ext_proc.exchange.timings import Timings
from ext_proc.policy.propagation import PropagatorCache, Rejections
from ext_proc.request.route_options import route_options
from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry.lean_span import LeanTracer
from tests.unit.exchange.test_session_lean import NS, request

MS = 1_000_000
T0 = 1_796_515_647_000_000_000  # the request's start (epoch ns)


class Connected:
    connected = True


class Rig:
    def __init__(self, *, enabled: bool = True, connected: bool = True) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        sdk = provider.get_tracer("t")
        assert isinstance(sdk, SdkTracer)
        self.tracer = LeanTracer(sdk, InstrumentationScope("t"), None)
        source = Connected()
        source.connected = connected
        self.phases = PhaseSpans(self.tracer, enabled, source)

    def server(self) -> tuple[object, object]:
        server = self.tracer.start_span("GET", kind=SpanKind.SERVER, start_time=T0)
        upstream = self.phases.allocate(server, None)
        return server, upstream

    def by_phase(self) -> dict[str, ReadableSpan]:
        return {str((s.attributes or {}).get("envoy.phase")): s
                for s in self.exporter.get_finished_spans() if s.kind is not SpanKind.SERVER}


def facts(times: Timings | None, **kw: object) -> FinalFacts:
    fields: dict[str, object] = dict(request_id="r1", response_code=200, response_flags=(),
                                     response_code_details="via_upstream", body_bytes_sent=3,
                                     upstream_address="10.0.0.7:8080", upstream_attempts=1)
    fields.update(kw)
    return FinalFacts(timings=times, **fields)  # type: ignore[arg-type]


def info() -> RequestInfo:
    return request_info({":method": ["GET"], ":path": ["/x"]})


def record(rig: Rig, final: FinalFacts, end_ms: int = 500) -> dict[str, ReadableSpan]:
    server, upstream = rig.server()
    assert upstream is not None
    rig.phases.record(server, upstream, info(), (T0, T0 + end_ms * MS), final)  # type: ignore[arg-type]
    server.end(T0 + end_ms * MS)  # type: ignore[attr-defined]
    return rig.by_phase()


def bounds(span: ReadableSpan) -> tuple[float, float]:
    assert span.start_time is not None and span.end_time is not None
    return (span.start_time - T0) / MS, (span.end_time - T0) / MS


def test_a_whole_exchange_has_three_phases_in_order() -> None:
    rig = Rig()
    server, upstream = rig.server()
    assert upstream is not None
    times = Timings(T0, 150 * MS, 250 * MS, 450 * MS, 252 * MS, 460 * MS)
    rig.phases.record(server, upstream, info(), (T0, T0 + 470 * MS), facts(times))  # type: ignore[arg-type]
    phases = rig.by_phase()
    assert set(phases) == {"filters", "upstream", "response"}
    assert bounds(phases["filters"]) == (0, 150)
    assert bounds(phases["upstream"]) == (150, 450)
    assert bounds(phases["response"]) == (252, 460)
    kinds = {name: span.kind for name, span in phases.items()}
    assert kinds == {"filters": SpanKind.INTERNAL, "upstream": SpanKind.CLIENT,
                     "response": SpanKind.INTERNAL}
    server_ctx = server.get_span_context()  # type: ignore[attr-defined]
    for span in phases.values():
        assert span.parent is not None and span.parent.span_id == server_ctx.span_id
        assert span.context is not None and span.context.trace_id == server_ctx.trace_id
    client = phases["upstream"]
    assert client.context is not None
    assert client.context.span_id == upstream.get_span_context().span_id  # type: ignore[attr-defined]
    attrs = client.attributes or {}
    assert attrs["server.address"] == "10.0.0.7" and attrs["server.port"] == 8080
    assert "http.request.resend_count" not in attrs
    assert attrs["http.response.status_code"] == 200
    assert client.status.status_code is StatusCode.UNSET
    (event,) = client.events
    assert event.name == "first_byte_received" and event.timestamp == T0 + 250 * MS
    assert upstream_seconds(facts(times)) == 0.3


def test_phases_are_clamped_into_the_server_span() -> None:
    rig = Rig()
    times = Timings(T0 - 5 * MS, 10 * MS, 20 * MS, 800 * MS, 30 * MS, 900 * MS)
    phases = record(rig, facts(times), end_ms=500)
    assert bounds(phases["filters"]) == (0, 5)
    assert bounds(phases["upstream"]) == (5, 500)
    assert bounds(phases["response"]) == (25, 500)


def test_no_route_has_only_the_local_reply_sent() -> None:
    rig = Rig()
    times = Timings(T0, None, None, None, 1 * MS, 1 * MS)
    phases = record(rig, facts(times, response_code=404, response_flags=("NR",),
                               response_code_details="route_not_found", upstream_address=None))
    assert set(phases) == {"response"}


def test_a_connect_failure_never_sent_a_byte_upstream() -> None:
    rig = Rig()
    times = Timings(T0, None, None, None, 3 * MS, 3 * MS)
    phases = record(rig, facts(times, response_code=503, response_flags=("UF", "URX"),
                               response_code_details="upstream_reset_before_response_started"))
    assert set(phases) == {"response"}
    assert upstream_seconds(facts(times)) is None


def test_an_upstream_reset_mid_body_fails_the_upstream_phase() -> None:
    rig = Rig()
    times = Timings(T0, 2 * MS, 50 * MS, None, 51 * MS, None)
    phases = record(rig, facts(times, response_flags=("UR",)), end_ms=80)
    client = phases["upstream"]
    assert client.status.status_code is StatusCode.ERROR
    assert (client.attributes or {})["error.type"] == "upstream_remote_reset"
    assert bounds(client) == (2, 80)
    response = phases["response"]
    assert (response.attributes or {})["error.type"] == "response_incomplete"
    assert bounds(response) == (51, 80)


def test_an_upstream_timeout_ends_with_envoys_local_reply() -> None:
    rig = Rig()
    times = Timings(T0, 2 * MS, None, None, 202 * MS, 203 * MS)
    phases = record(rig, facts(times, response_code=504, response_flags=("UT",),
                               response_code_details="upstream_response_timeout"))
    client = phases["upstream"]
    assert bounds(client) == (2, 202)
    assert (client.attributes or {})["error.type"] == "upstream_request_timeout"
    assert "http.response.status_code" not in (client.attributes or {})  # Envoy's, not its
    assert not client.events


def test_a_retried_request_counts_its_resends_and_4xx_fails_a_client_span() -> None:
    rig = Rig()
    times = Timings(T0, 2 * MS, 20 * MS, 21 * MS, 22 * MS, 23 * MS)
    phases = record(rig, facts(times, response_code=404, upstream_attempts=2))
    assert set(phases) == {"upstream", "response"}  # the filters' end is not logged
    attrs = phases["upstream"].attributes or {}
    assert attrs["http.request.resend_count"] == 1 and attrs["error.type"] == "404"
    assert phases["upstream"].status.status_code is StatusCode.ERROR


def test_no_timings_no_phases() -> None:
    rig = Rig()
    assert record(rig, facts(None)) == {}


def test_allocate_only_when_on_sampled_and_joined() -> None:
    on, off, cut = Rig(), Rig(enabled=False), Rig(connected=False)
    assert on.server()[1] is not None
    assert off.server()[1] is None and cut.server()[1] is None
    server = off.tracer.start_span("GET", kind=SpanKind.SERVER)
    assert off.phases.allocate(server, True) is not None  # the route turns them on
    assert on.phases.allocate(server, False) is None  # or off


def test_split_address() -> None:
    assert split_address("[::1]:80") == ("::1", 80)
    assert split_address("h:x") == ("h", None)
    assert split_address(None) == (None, None)


def test_route_option() -> None:
    assert route_options([("x-extproc-otel-phase-spans", "on")]).phase_spans is True
    assert route_options([("x-extproc-otel-phase-spans", "off")]).phase_spans is False
    assert route_options([]).phase_spans is None


async def test_a_session_sends_the_upstream_phases_id_and_records_it() -> None:
    rig = Rig()
    join = AccessLogJoin(0.01, 0.01)
    join.service.connected = True
    records: list[ExchangeRecord] = []

    class Observer:
        def stream_started(self, method: str | None, route: str | None) -> None:
            pass

        def stream_finished(self, record: ExchangeRecord) -> None:
            records.append(record)

    deps = StreamDeps(tracer=rig.tracer, attributes_namespace=NS,
                      propagator=PropagatorCache(Rejections()).get(PropagationSettings()),
                      metadata_namespace="extproc_otel", finalizer=join,
                      phases=PhaseSpans(rig.tracer, True, join.service), observers=(Observer(),))
    session = StreamSession(deps)
    answer = session.handle(request())
    session.record()
    (header,) = answer.request_headers.response.header_mutation.set_headers
    sent_span_id = header.header.raw_value.decode().split("-")[2]
    assert not answer.HasField("mode_override")  # lean stays lean
    session.close()
    start = T0_OF_REQUEST
    join.deliver(facts(Timings(start, 5 * MS, 10 * MS, 20 * MS, 11 * MS, 21 * MS),
                       duration_ns=21 * MS))
    phases = rig.by_phase()
    assert set(phases) == {"filters", "upstream", "response"}
    assert phases["upstream"].context is not None
    assert f"{phases['upstream'].context.span_id:016x}" == sent_span_id
    (record_,) = records
    assert record_.upstream_s == 0.015 and record_.duration_s == 0.021
    assert f"{record_.span_context.span_id:016x}" != sent_span_id


T0_OF_REQUEST = 1_795_712_791_000_000_000  # test_session_lean.START, 2026-11-26T17:06:31Z
