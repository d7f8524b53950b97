"""ext_proc.h2grpc.direct: streams served by plain calls from the connection, driven
by a raw HTTP/2 client. Each message is answered, then recorded (``answered``);
every stream ends exactly once, in its own context, however it ends."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.errors
import h2.events

from ext_proc import h2grpc
from ext_proc.h2grpc.direct import DirectMethod, Metadata
from tests.unit.h2grpc.test_h2grpc_wire import RawClient, message

LAST: contextvars.ContextVar[bytes] = contextvars.ContextVar("last")


def _parse(raw: bytes) -> bytes:
    if raw == b"garbage":
        raise ValueError("not a message")
    return raw


class Recorder:
    """A DirectMethod's streams, logging every callback with what the stream's own
    context holds."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.metadata: list[Metadata] = []
        self.refuse = False
        self.ended = asyncio.Event()
        self.unanswered: list[bool] = []  # per end, in order

    def open(self, metadata: Metadata) -> Stream | None:
        self.metadata.append(metadata)
        return None if self.refuse else Stream(self)


class Stream:
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def message(self, request: bytes) -> bytes | None:
        LAST.set(request)
        self._recorder.log.append(("message", request))
        if request == b"raise":
            raise RuntimeError("boom")
        return None if request == b"silent" else request.upper()

    def answered(self) -> None:
        self._recorder.log.append(("answered", LAST.get()))

    def end(self, cancelled: bool, unanswered: bool) -> None:
        self._recorder.log.append(("end", cancelled, LAST.get(None)))
        self._recorder.unanswered.append(unanswered)
        self._recorder.ended.set()


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[Recorder, h2grpc.Server, RawClient]]:
    recorder = Recorder()
    server = h2grpc.Server(**options)
    server.add_direct_method("/t.S/D", DirectMethod(recorder.open, _parse, bytes, "closing"))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RawClient()
    await client.connect(port)
    try:
        yield recorder, server, client
    finally:
        client.close()
        await server.stop(0)


def trailer(client: RawClient, sid: int, name: bytes) -> bytes | None:
    for event in client.of(sid, h2.events.TrailersReceived) + client.of(
            sid, h2.events.ResponseReceived):
        found = dict(event.headers).get(name)
        if found is not None:
            return bytes(found)
    return None


async def test_each_message_is_answered_then_recorded_and_the_stream_ends_once() -> None:
    async with serving() as (recorder, _, client):
        client.open(1, "D")
        client.send(1, b"a")
        await client.until(lambda: client.received(1) == len(message(b"A")))
        client.send(1, b"b", end=True)
        await client.until(lambda: client.status(1) is not None)
        await asyncio.wait_for(recorder.ended.wait(), 5)
        assert client.status(1) == b"0"
        assert client.received(1) == len(message(b"A")) + len(message(b"B"))
        assert recorder.log == [("message", b"a"), ("answered", b"a"), ("message", b"b"),
                                ("answered", b"b"), ("end", False, b"b")]
        # "b" and the end came in one write: closed before our answer to "b" was out
        assert recorder.unanswered == [True]
        assert ("content-type", "application/grpc") in recorder.metadata[0]


async def test_two_messages_in_one_frame_are_each_recorded_before_the_next() -> None:
    async with serving() as (recorder, _, client):
        client.open(1, "D")
        client.h2.send_data(1, message(b"a") + message(b"silent"), end_stream=True)
        client.flush()
        await client.until(lambda: client.status(1) is not None)
        await asyncio.wait_for(recorder.ended.wait(), 5)
        assert client.received(1) == len(message(b"A"))  # "silent" has no answer
        assert recorder.log == [("message", b"a"), ("answered", b"a"),
                                ("message", b"silent"), ("answered", b"silent"),
                                ("end", False, b"silent")]
        # the end came with "silent", which has no answer to wait for (observability
        # mode): not an abandoned stream
        assert recorder.unanswered == [False]


async def test_each_stream_runs_in_a_context_of_its_own() -> None:
    async with serving() as (recorder, _, client):
        client.open(1, "D")
        client.open(3, "D")
        client.send(1, b"one")
        client.send(3, b"three")
        await client.until(lambda: client.received(1) > 0 and client.received(3) > 0)
        client.send(1, b"", end=True)  # an empty message, then the end
        client.h2.end_stream(3)
        client.flush()
        await client.until(lambda: client.status(1) is not None
                           and client.status(3) is not None)
    ends = {entry for entry in recorder.log if entry[0] == "end"}
    assert ends == {("end", False, b""), ("end", False, b"three")}
    # the same header block, decoded once per connection: one metadata object
    assert recorder.metadata[0] is recorder.metadata[1]
    assert recorder.unanswered.count(False) == 1  # stream 3 closed after its answer


async def test_a_reset_stream_ends_cancelled_and_its_neighbour_goes_on() -> None:
    async with serving() as (recorder, _, client):
        client.open(1, "D")
        client.open(3, "D")
        client.send(1, b"a")
        await client.until(lambda: client.received(1) > 0)
        client.h2.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        await asyncio.wait_for(recorder.ended.wait(), 5)
        assert recorder.log[-1] == ("end", True, b"a")
        client.send(3, b"b", end=True)
        await client.until(lambda: client.status(3) is not None)
        assert client.status(3) == b"0"


async def test_refused_failing_and_unparsable_streams_get_a_status_others_go_on() -> None:
    async with serving() as (recorder, _, client):
        recorder.refuse = True
        client.open(1, "D")
        await client.until(lambda: client.status(1) is not None)
        assert (client.status(1), trailer(client, 1, b"grpc-message")) == (b"14", b"closing")
        recorder.refuse = False
        for sid, payload, status in ((3, b"raise", b"2"), (5, b"garbage", b"13")):
            client.open(sid, "D")
            client.send(sid, payload)
            await client.until(lambda sid=sid: client.status(sid) is not None)
            assert client.status(sid) == status, payload
        client.open(7, "D")
        client.send(7, b"fine", end=True)
        await client.until(lambda: client.status(7) is not None)
        assert client.status(7) == b"0" and not client.eof
    # the failing stream ended once (not cancelled); the unparsable one too
    assert [e for e in recorder.log if e[0] == "end"] == [
        ("end", False, b"raise"), ("end", False, None), ("end", False, b"fine")]


async def test_stop_and_a_lost_connection_end_open_streams_cancelled() -> None:
    async with serving() as (recorder, server, client):
        client.open(1, "D")
        client.send(1, b"a")
        await client.until(lambda: client.received(1) > 0)
        await server.stop(0)
        await asyncio.wait_for(recorder.ended.wait(), 5)
        assert recorder.log[-1] == ("end", True, b"a")
    async with serving() as (recorder, _, client):
        client.open(1, "D")
        client.send(1, b"b")
        await client.until(lambda: client.received(1) > 0)
        client.close()
        await asyncio.wait_for(recorder.ended.wait(), 5)
        assert recorder.log[-1] == ("end", True, b"b")


async def test_streams_one_read_opens_past_the_backlog_are_shed() -> None:
    """They would wait for every stream before them in that read (overload)."""
    async with serving(max_backlog=2, sheddable=["/t.S/D"]) as (recorder, server, client):
        for sid in (1, 3, 5):
            client.open(sid, "D", flush=False)
        client.flush()  # one write: three streams
        await client.until(lambda: client.status(5) is not None)
        assert (client.status(5), trailer(client, 5, b"grpc-message")) == (b"14", b"overloaded")
        assert server.shed == 1 and len(recorder.metadata) == 2
        client.open(7, "D")  # a later read: served
        client.send(7, b"x", end=True)
        await client.until(lambda: client.status(7) is not None)
        assert client.status(7) == b"0" and server.shed == 1


async def test_stop_gives_open_streams_the_grace_to_finish() -> None:
    async with serving() as (recorder, server, client):
        client.open(1, "D")
        client.send(1, b"a")
        await client.until(lambda: client.received(1) > 0)
        stopping = asyncio.ensure_future(server.stop(30))
        await client.until(lambda: any(isinstance(e, h2.events.ConnectionTerminated)
                                       for e in client.events))
        assert not stopping.done()  # GOAWAY sent, the open stream may finish
        client.send(1, b"b", end=True)
        await asyncio.wait_for(stopping, 5)  # well within the 30 s grace
        assert client.status(1) == b"0"
        assert recorder.log[-1] == ("end", False, b"b")
