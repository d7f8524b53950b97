"""StreamSession behind the lean envoy.yaml: when it asks Envoy for the response
phase (mode_override), and how an exchange ends with or without its access-log entry."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc.config import PropagationSettings
from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.answers import RESPONSE_PHASE
from ext_proc.exchange.join import AccessLogJoin
from ext_proc.exchange.session import StreamDeps, StreamSession
from ext_proc.policy.propagation import PropagatorCache, Rejections

NS = "envoy.filters.http.ext_proc"
START = "2026-11-26T17:06:31.000000+00:00"


def request(request_id: str = "r1") -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    for key, value in ((":method", "GET"), (":path", "/x"), (":scheme", "http"),
                       (":authority", "gw"), ("x-request-id", request_id)):
        req.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    req.attributes[NS].fields["request.time"].string_value = START
    return req


class Rig:
    def __init__(self, *, join: bool = True, connected: bool = True,
                 response_phase: bool = False, response: tuple[str, ...] = ()) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.join = AccessLogJoin(0.01, 0.01) if join else None
        if self.join is not None:
            self.join.service.connected = connected
        propagator = PropagatorCache(Rejections()).get(
            PropagationSettings(response=response))  # type: ignore[arg-type]
        self.deps = StreamDeps(tracer=provider.get_tracer("t"), propagator=propagator,
                               attributes_namespace=NS, metadata_namespace="extproc_otel",
                               finalizer=self.join, response_phase=response_phase)

    def answer(self, session: StreamSession, request_id: str = "r1") -> pb.ProcessingResponse:
        answer = session.handle(request(request_id))
        session.record()
        return answer

    def span(self) -> ReadableSpan:
        (span,) = self.exporter.get_finished_spans()
        return span


@pytest.mark.parametrize(("rig", "asks"), [
    (dict(), False),  # lean, access log flowing: one message per request
    (dict(connected=False), True),  # no access-log stream yet: nothing would say how it ended
    (dict(join=False), True),  # no join at all
    (dict(response_phase=True), True),  # --workers N
    (dict(response=("traceresponse",)), True),  # response headers to set
], ids=["lean", "not-connected", "no-join", "workers", "traceresponse"])
async def test_when_the_response_phase_is_asked_for(rig: dict[str, object], asks: bool) -> None:
    built = Rig(**rig)  # type: ignore[arg-type]
    answer = built.answer(StreamSession(built.deps))
    assert answer.HasField("mode_override") == asks
    if asks:
        assert answer.mode_override == RESPONSE_PHASE


async def test_a_lean_exchange_without_its_entry_is_not_called_an_error() -> None:
    rig = Rig()
    session = StreamSession(rig.deps)
    rig.answer(session)
    session.close()  # Envoy closed the stream right after the answer (lean)
    assert rig.join is not None
    rig.join.flush()  # its entry never came
    span = rig.span()
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in (span.attributes or {})


async def test_an_exchange_that_expected_a_response_and_got_none_was_aborted() -> None:
    rig = Rig(connected=False)  # asks for the response phase
    session = StreamSession(rig.deps)
    rig.answer(session)
    session.close()  # closed before any response: the client left
    assert rig.join is not None
    rig.join.flush()
    span = rig.span()
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "client_aborted"


async def test_the_access_log_gives_an_aborted_lean_request_its_real_duration() -> None:
    rig = Rig()
    session = StreamSession(rig.deps)
    rig.answer(session)
    session.close()
    assert rig.join is not None
    rig.join.deliver(FinalFacts("r1", None, ("DC",), None, 0, duration_ns=30_000_000_000))
    span = rig.span()
    assert span.start_time is not None and span.end_time is not None
    assert span.end_time - span.start_time == 30_000_000_000  # not the stream's close
    assert (span.attributes or {})["error.type"] == "client_aborted"


async def test_a_stream_envoy_reset_waits_only_the_join_timeout() -> None:
    """Envoy reset it (message_timeout, client abort): its entry comes when the request
    ends, which is now; it must not wait response_wait_s (Envoy may have dropped the
    entry under the very overload that made it give up)."""
    rig = Rig()
    assert rig.join is not None
    lean, reset = StreamSession(rig.deps), StreamSession(rig.deps)
    rig.answer(lean, "lean")
    rig.answer(reset, "reset")
    lean.close()
    reset.cancelled = True
    reset.close()
    assert rig.join.awaiting.pending() == 1  # the lean one: its request runs on
    assert rig.join.finalizer.pending() == 1  # the reset one: join_timeout_s
    assert rig.join.finalizer.is_parked("reset") and rig.join.awaiting.is_parked("lean")


async def test_a_stream_envoy_abandoned_waits_briefly_and_claims_no_outcome() -> None:
    """Envoy closed the stream before our answer reached it (message_timeout, as the
    h2 engine sees it under overload): the request went on untraced. Its entry comes
    when the request ends; without it, nothing says how it ended."""
    rig = Rig(connected=False)  # asked for the response phase, which never came
    assert rig.join is not None
    abandoned = StreamSession(rig.deps)
    rig.answer(abandoned, "gone")
    abandoned.abandoned = True
    abandoned.close()
    assert rig.join.finalizer.is_parked("gone")  # join_timeout_s, not response_wait_s
    rig.join.flush()
    span = rig.span()
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in (span.attributes or {})


async def test_the_answer_is_a_request_headers_answer_even_with_nothing_to_change() -> None:
    rig = Rig()
    quiet = PropagatorCache(Rejections()).get(PropagationSettings(inject=[]))  # type: ignore[arg-type]
    answer = rig.answer(StreamSession(dataclasses.replace(rig.deps, propagator=quiet)))
    assert answer.WhichOneof("response") == "request_headers"
    assert not answer.request_headers.response.header_mutation.set_headers
    assert answer.dynamic_metadata.fields["extproc_otel"].struct_value.fields["trace_id"]


class FailingPolicy:
    """A policy whose request attributes fail (a bug, a hostile header)."""

    wants_response = False

    def tenant(self, carrier: object, options: object) -> None:
        return None

    def sampling_context(self, parent: object, carrier: object, **facts: object) -> object:
        return parent

    def request_attributes(self, *args: object) -> dict[str, object]:
        raise RuntimeError("boom")


async def test_a_failure_while_recording_leaves_no_raw_path_behind() -> None:
    rig = Rig(join=False)
    deps = dataclasses.replace(rig.deps, policy=FailingPolicy())  # type: ignore[arg-type]
    session = StreamSession(deps)
    session.handle(request())
    session.record()
    session.close()
    assert rig.span().attributes is not None
    assert rig.span().attributes["url.path"] == "REDACTED"
