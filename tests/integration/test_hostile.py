"""Hostile ext_proc clients: garbage streams fail cleanly, alone; the limits hold.

A real in-process server (`running_server`) runs on its own event loop in a
thread, so hypothesis (synchronous) can drive one gRPC stream per example with
random message sequences: phases out of order or repeated, missing fields,
huge header maps, non-UTF-8 bytes, odd Envoy attributes and route options.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger
from opentelemetry.trace import SpanKind

from ext_proc._gen.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc.request.headers import carrier_from_headers
from tests.integration.test_servicer import (
    NS,
    Running,
    exchange,
    request_headers,
    response_headers,
    running_server,
)

pytestmark = pytest.mark.usefixtures("in_process_sidecar")

T = TypeVar("T")
PHASES = ("request_headers", "response_headers", "request_body", "response_body",
          "request_trailers", "response_trailers")
HEADER_PHASES = frozenset({"request_headers", "response_headers"})
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class ServerThread:
    """`running_server` on a private event loop; coroutines are run on it from tests."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.srv: Running | None = None
        self.errors: list[str] = []  # ERROR records logged by the server
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_server() as srv:
            self.srv = srv
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


@contextmanager
def server_thread() -> Iterator[ServerThread]:
    """A server for one test (grpc.aio wants one event loop at a time per process, so
    this one is gone before the next async test starts its own)."""
    thread = ServerThread()
    sink = logger.add(lambda m: thread.errors.append(str(m)), level="ERROR")
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OTEL_METRICS_EXPORTER", "none")
            with thread:
                yield thread
    finally:
        logger.remove(sink)


# -- strategies ---------------------------------------------------------------------------

KNOWN_HEADERS = (":path", ":method", ":status", ":authority", ":scheme", "host", "traceparent",
                 "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled",
                 "grpc-trace-bin", "grpc-status", "grpc-message", "content-type",
                 "authorization", "cookie", "set-cookie", "x-api-key", "user-agent",
                 "x-request-id", "server-timing", "x-forwarded-for")
header_names = st.one_of(st.sampled_from(KNOWN_HEADERS), st.text(max_size=20))
header_values = st.one_of(
    st.binary(max_size=64),  # non-UTF-8 included
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([TRACEPARENT.encode(), b"Bearer a.b.c", b"Basic !!!", b"200", b"abc",
                     b"/p?token=x&%zz", b"0", b"-1", b"99999999999999999999",
                     b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", b"\xff\xfe\x00"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6)
ATTRIBUTE_NAMES = ("request.time", "request.id", "request.protocol", "source.address",
                   "source.port", "destination.address", "connection.mtls", "xds.route_name",
                   "response.code", "response.code_details", "response.flags",
                   "upstream.address", "upstream.request_attempt_count")
attributes = st.dictionaries(st.one_of(st.sampled_from(ATTRIBUTE_NAMES), st.text(max_size=10)),
                             json_values, max_size=6)


@dataclass(frozen=True)
class Header:
    key: str
    value: bytes
    in_value_field: bool  # `value` (string) instead of `raw_value`


headers_strategy = st.lists(st.builds(Header, header_names, header_values, st.booleans()),
                            max_size=12)


def _header_map(headers: list[Header], flood: int) -> Any:
    msg = pb.HttpHeaders()
    for h in headers:
        header = msg.headers.headers.add()
        header.key = h.key
        if h.in_value_field:
            header.value = h.value.decode("utf-8", "replace")
        else:
            header.raw_value = h.value
    for i in range(flood):  # a huge header map, past the examined limits
        header = msg.headers.headers.add()
        header.key, header.raw_value = f"x-flood-{i % 7}", b"v" * 600
    return msg


@dataclass(frozen=True)
class Message:
    """A compact description of one ProcessingRequest (the proto is built when sent)."""

    phase: str | None
    headers: tuple[Header, ...] = ()
    flood: int = 0  # extra headers, past the examined limits
    end_of_stream: bool = False
    body: bytes = b""
    attributes: tuple[str, dict[str, Any]] | None = None  # (namespace, values)
    metadata: tuple[str, dict[str, Any]] | None = None

    def build(self, observability: bool) -> pb.ProcessingRequest:
        request = pb.ProcessingRequest(observability_mode=observability)
        phase = self.phase
        if phase in HEADER_PHASES:
            header_map = _header_map(list(self.headers), self.flood)
            header_map.end_of_stream = self.end_of_stream
            getattr(request, phase).CopyFrom(header_map)
        elif phase in ("request_trailers", "response_trailers"):
            getattr(request, phase).trailers.CopyFrom(
                _header_map(list(self.headers), self.flood).headers)
        elif phase is not None:
            getattr(request, phase).CopyFrom(pb.HttpBody(body=self.body,
                                                         end_of_stream=self.end_of_stream))
        if self.attributes is not None:
            struct = struct_pb2.Struct()
            struct.update(self.attributes[1])
            request.attributes[self.attributes[0]].CopyFrom(struct)
        if self.metadata is not None:
            struct = struct_pb2.Struct()
            struct.update(self.metadata[1])
            request.metadata_context.filter_metadata[self.metadata[0]].CopyFrom(struct)
        return request


messages = st.builds(
    Message,
    phase=st.one_of(st.none(), st.sampled_from(PHASES)),
    headers=headers_strategy.map(tuple),
    flood=st.sampled_from([0, 0, 0, 3000]),
    end_of_stream=st.booleans(),
    body=st.binary(max_size=64),
    attributes=st.none() | st.tuples(st.sampled_from([NS, NS, "other"]), attributes),
    metadata=st.none() | st.tuples(st.sampled_from(["extproc_otel", "x"]), st.dictionaries(
        st.text(max_size=8), json_values, max_size=3)),
)


ROUTE_KEYS = ("x-extproc-otel-http-route", "x-extproc-otel-attr-team", "x-extproc-otel-extract",
              "x-extproc-otel-inject", "x-extproc-otel-clear", "x-extproc-otel-tenant",
              "x-extproc-otel-attr-", "x-other")
metadata_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
route_metadata = st.lists(st.tuples(st.sampled_from(ROUTE_KEYS), metadata_values), max_size=4)


# Every stream carries its example's number as a span attribute, so a late span of an
# earlier example (a reset can beat its messages to the server) is never counted.
CASE_KEY = "x-extproc-otel-attr-case"
_cases = (str(n) for n in itertools.count())


@dataclass(frozen=True)
class Outcome:
    answers: list[pb.ProcessingResponse]
    code: grpc.StatusCode | None
    case: str


async def drive(srv: Running, sent: list[Message], metadata: list[tuple[str, str]],
                observability: bool, cancel: bool) -> Outcome:
    """One stream as Envoy would run it: each answer awaited before the next message
    (none in observability mode), then a clean close or a reset."""
    case = next(_cases)
    call = srv.stub.Process(metadata=(*metadata, (CASE_KEY, case)))
    answers = []
    for message in sent:
        await call.write(message.build(observability))
        if not observability:
            answers.append(await call.read())
    if cancel:
        call.cancel()
        return Outcome(answers, None, case)
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return Outcome(answers, await call.code(), case)


async def settled(srv: Running, within_s: float = 5.0) -> bool:
    """Whether every stream was released (closed and its span ended) in time."""
    try:
        await asyncio.wait_for(srv.sidecar.processor.drained(), within_s)
    except TimeoutError:
        return False
    return True


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def server_spans(srv: Running, case: str | None = None) -> list[Any]:
    return [s for s in srv.spans() if s.kind == SpanKind.SERVER
            and (case is None or attrs(s).get("case") == case)]


def assert_serves_a_normal_stream(server: ServerThread, srv: Running) -> None:
    answers = server.run(exchange(srv.stub, [request_headers("/after"), response_headers()]))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "response_headers"]
    after = [s for s in server_spans(srv) if attrs(s).get("url.path") == "/after"]
    assert len(after) == 1
    srv.exporter.clear()


# -- the property ---------------------------------------------------------------------------


def test_any_message_sequence_gets_a_clean_outcome() -> None:
    with server_thread() as server:
        srv = server.srv
        assert srv is not None

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(sent=st.lists(messages, max_size=6), metadata=route_metadata,
               observability=st.booleans(), cancel=st.booleans())
        def one_stream(sent: list[Message], metadata: list[tuple[str, str]],
                       observability: bool, cancel: bool) -> None:
            server.errors.clear()
            phases = [m.phase for m in sent]
            outcome = server.run(drive(srv, sent, metadata, observability, cancel))
            assert server.run(settled(srv)), "a stream was never released"
            # one answer per message, of its phase (no phase: a request_headers no-op)
            expected = [] if observability else [p or "request_headers" for p in phases]
            assert [a.WhichOneof("response") for a in outcome.answers] == expected
            if not cancel:
                assert outcome.code == grpc.StatusCode.OK
            # exactly one SERVER span once Envoy showed us headers, none otherwise; all
            # ended. (A reset right after unanswered observability-mode writes may beat
            # the messages to the server: then at most one.)
            spans = len(server_spans(srv, outcome.case))
            wanted = int(bool(HEADER_PHASES.intersection(phases)))
            assert spans <= wanted if observability and cancel else spans == wanted
            assert all(s.end_time is not None for s in srv.spans())
            assert server.errors == []  # nothing failed, not even behind the phase boundary
            assert_serves_a_normal_stream(server, srv)

        one_stream()


# -- the limits -----------------------------------------------------------------------------


def test_header_map_is_examined_up_to_its_limits() -> None:
    msg = pb.HttpHeaders()
    for i in range(50):
        h = msg.headers.headers.add()
        h.key, h.raw_value = f"x-{i}", b"v" * 10
    assert len(carrier_from_headers(msg.headers, max_headers=20)) == 20
    assert len(carrier_from_headers(msg.headers, max_bytes=13 * 5)) == 5
    assert len(carrier_from_headers(msg.headers)) == 50


async def test_oversized_message_fails_only_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_SERVER__MAX_RECEIVE_MESSAGE_BYTES", str(64 * 1024))
    async with running_server() as srv:
        normal = srv.stub.Process()
        await normal.write(request_headers("/normal"))
        assert (await normal.read()).WhichOneof("response") == "request_headers"
        huge = srv.stub.Process()
        await huge.write(request_headers("/huge", ("x-big", b"b" * 100_000)))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await huge.read()
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the other stream, opened before, carries on; a new one is served too
        await normal.write(response_headers())
        assert (await normal.read()).WhichOneof("response") == "response_headers"
        await normal.done_writing()
        assert await normal.code() == grpc.StatusCode.OK
        await exchange(srv.stub, [request_headers("/after"), response_headers()])
        assert sorted(str(attrs(s)["url.path"]) for s in srv.spans()) == ["/after", "/normal"]


async def test_concurrent_streams_are_capped_per_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_SERVER__MAX_CONCURRENT_STREAMS", "2")
    async with running_server() as srv:

        async def first_answer(call: Any, path: str) -> str | None:
            await call.write(request_headers(path))  # waits for a free stream slot
            return str((await call.read()).WhichOneof("response"))

        calls = []
        for i in range(2):
            calls.append(srv.stub.Process())
            assert await asyncio.wait_for(first_answer(calls[i], f"/{i}"), 5) == "request_headers"
        calls.append(srv.stub.Process())  # only now: streams take free slots in any order
        third = asyncio.ensure_future(first_answer(calls[2], "/third"))
        done, _ = await asyncio.wait({third}, timeout=0.5)
        assert not done, "a third concurrent stream was served beyond the cap"
        assert len(srv.sidecar.processor.active) == 2
        await asyncio.wait_for(calls[0].done_writing(), 5)
        assert await asyncio.wait_for(calls[0].code(), 5) == grpc.StatusCode.OK
        assert await asyncio.wait_for(third, 5) == "request_headers"
        for call in calls[1:]:
            await asyncio.wait_for(call.done_writing(), 5)
            assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK


async def test_attribute_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT caps every string attribute (the SDK applies it);
    captured headers are cut by redaction.max_value_length first."""
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "200")
    async with running_server(redaction={"capture_request_headers": ["x-big"],
                                         "max_value_length": 64}) as srv:
        await exchange(srv.stub, [
            request_headers("/p?" + "q" * 5000, ("user-agent", "u" * 5000),
                            ("x-big", "b" * 5000)),
            response_headers()])
        (span,) = srv.spans()
        assert len(attrs(span)["user_agent.original"]) == 200
        assert len(attrs(span)["url.query"]) <= 200
        (captured,) = attrs(span)["http.request.header.x-big"]
        assert len(captured) <= 64 and captured.endswith("[TRUNCATED]")
