"""ext_proc.h2grpc at the frame level: a raw HTTP/2 client (the h2 library) sends what
grpcio's client never would (a stream opened and reset in one write, windows held
shut, SETTINGS changes, streams racing a GOAWAY), and the server must keep its
other streams and its promises (every answer and its trailers delivered)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from ext_proc import h2grpc


def _identity(raw: bytes) -> bytes:
    return raw


async def _echo(requests: Any, context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _big(request: bytes, context: Any) -> bytes:
    return b"x" * 200_000  # beyond the 65,535-byte default window


async def _first_only(requests: Any, context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        return  # done before the client half-closes


HANDLERS = grpc.method_handlers_generic_handler("t.S", {
    "Echo": grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=_identity, response_serializer=_identity),
    "Big": grpc.unary_unary_rpc_method_handler(
        _big, request_deserializer=_identity, response_serializer=_identity),
    "First": grpc.stream_stream_rpc_method_handler(
        _first_only, request_deserializer=_identity, response_serializer=_identity),
})


def message(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


_CONNECTION_STATES = h2.connection.H2ConnectionStateMachine


class _ClientStates(_CONNECTION_STATES):
    """h2's client states, reading on after a GOAWAY, as HTTP/2 allows (the server's
    own `_DrainingStateMachine` does the same on its side)."""

    _transitions = {  # noqa: RUF012
        **_CONNECTION_STATES._transitions,
        **{(h2.connection.ConnectionState.CLOSED, event): (None,
                                                            h2.connection.ConnectionState.CLOSED)
           for (state, event) in _CONNECTION_STATES._transitions
           if state is h2.connection.ConnectionState.CLIENT_OPEN},
    }


class RawClient:
    """An HTTP/2 client that acknowledges no data by itself (tests open windows)."""

    def __init__(self, initial_window: int | None = None) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.state_machine = _ClientStates()
        if initial_window is not None:
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.events: list[Any] = []
        self.eof = False
        self._changed = asyncio.Condition()

    async def connect(self, port: int) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self.h2.initiate_connection()
        self.flush()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while data := await self._reader.read(65536):
            events = self.h2.receive_data(data)
            self.flush()
            async with self._changed:
                self.events.extend(events)
                self._changed.notify_all()
        async with self._changed:
            self.eof = True
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (5 s at most) until `predicate` holds over what was received."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), 5)

    def flush(self) -> None:
        if data := self.h2.data_to_send():
            self._writer.write(data)

    def open(self, sid: int, method: str, end: bool = False, flush: bool = True) -> None:
        self.h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", f"/t.S/{method}".encode()),
            (b":authority", b"t"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ], end_stream=end)
        if flush:
            self.flush()

    def send(self, sid: int, payload: bytes, end: bool = False) -> None:
        """One gRPC message on `sid` (`end`: and END_STREAM)."""
        self.h2.send_data(sid, message(payload), end_stream=end)
        self.flush()

    def of(self, sid: int, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == sid]

    def status(self, sid: int) -> bytes | None:
        for event in self.of(sid, h2.events.TrailersReceived) + self.of(
                sid, h2.events.ResponseReceived):
            found = dict(event.headers).get(b"grpc-status")
            if found is not None:
                return bytes(found)
        return None

    def received(self, sid: int) -> int:
        return sum(len(e.data) for e in self.of(sid, h2.events.DataReceived))

    def close(self) -> None:
        self._task.cancel()
        self._writer.close()


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[h2grpc.Server, int]]:
    server = h2grpc.Server(**options)
    server.add_generic_rpc_handlers([HANDLERS])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop(0)


def _ended(client: RawClient, sid: int) -> bool:
    return client.status(sid) is not None or client.eof


async def _echo_works(client: RawClient, sid: int) -> None:
    client.open(sid, "Echo")
    client.send(sid, b"ping", end=True)
    await client.until(lambda: client.status(sid) is not None)
    assert client.status(sid) == b"0" and client.received(sid) == len(message(b"ping"))


async def test_a_stream_opened_and_reset_in_one_write_costs_only_itself() -> None:
    for method, options in (("Nope", {}), ("First", {"max_backlog": 0,
                                                      "sheddable": ["/t.S/First"]})):
        async with serving(**options) as (_, port):
            client = RawClient()
            await client.connect(port)
            client.open(1, "Echo")  # a healthy stream, still open
            client.open(3, method, flush=False)  # answered at once (unimplemented, shed)
            client.h2.reset_stream(3, h2.errors.ErrorCodes.CANCEL)  # ... but reset already
            client.flush()  # one write: HEADERS and RST_STREAM
            client.send(1, b"ping", end=True)
            await client.until(functools.partial(_ended, client, 1))
            assert not client.eof and client.status(1) == b"0", method
            await _echo_works(client, 5)
            client.close()


async def test_answers_waiting_for_window_are_delivered_during_the_grace() -> None:
    async with serving() as (server, port):
        client = RawClient()
        await client.connect(port)
        client.open(1, "Big")
        client.send(1, b"", end=True)
        await client.until(lambda: client.received(1) >= 65_535)
        stopping = asyncio.ensure_future(server.stop(5))
        client.h2.increment_flow_control_window(1 << 20)
        client.h2.increment_flow_control_window(1 << 20, stream_id=1)
        client.flush()
        await client.until(lambda: client.status(1) is not None)
        await asyncio.wait_for(stopping, 5)
        client.close()
    assert client.received(1) == len(message(b"x" * 200_000)) and client.status(1) == b"0"


async def test_a_larger_initial_window_in_settings_resumes_waiting_answers() -> None:
    async with serving() as (_, port):
        client = RawClient(initial_window=0)
        await client.connect(port)
        client.h2.increment_flow_control_window(1 << 20)  # the connection's window
        client.open(1, "Big")
        client.send(1, b"", end=True)
        await client.until(lambda: bool(client.of(1, h2.events.ResponseReceived)))
        assert client.received(1) == 0
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        client.flush()  # no WINDOW_UPDATE: the SETTINGS change alone opens the stream
        await client.until(lambda: client.status(1) is not None)
        assert client.received(1) == len(message(b"x" * 200_000))
        client.close()


async def test_a_stream_racing_our_goaway_is_refused_and_the_open_one_finishes() -> None:
    async with serving() as (server, port):
        client = RawClient()
        await client.connect(port)
        client.open(1, "Echo")
        await client.until(lambda: bool(server.connections)
                           and all(c.calls for c in server.connections))
        server.close()  # GOAWAY, last stream 1
        client.open(3, "Echo")  # sent before the client has read the GOAWAY
        await client.until(lambda: bool(client.of(3, h2.events.StreamReset)))
        (reset,) = client.of(3, h2.events.StreamReset)
        assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        client.send(1, b"ping", end=True)
        await client.until(lambda: client.status(1) is not None)
        assert client.status(1) == b"0"
        client.close()


async def test_an_answer_before_the_client_finished_sending_releases_the_stream() -> None:
    async with serving() as (_, port):
        client = RawClient()
        await client.connect(port)
        client.open(1, "First")
        client.send(1, b"one")
        await client.until(lambda: bool(client.of(1, h2.events.StreamReset)))
        assert client.status(1) == b"0"  # trailers first, then RST_STREAM(NO_ERROR)
        assert client.of(1, h2.events.StreamReset)[0].error_code == h2.errors.ErrorCodes.NO_ERROR
        await _echo_works(client, 3)
        client.close()


async def test_a_stream_error_costs_only_its_stream_and_is_counted(http2_layer: str) -> None:
    """Trailers without END_STREAM on an open call: the builtin layer resets that stream
    (RFC 9113 8.1: malformed) and counts it; the h2 library ends the connection."""
    async with serving() as (server, port):
        client = RawClient()
        await client.connect(port)
        client.open(1, "Echo")
        client.send(1, b"ping")
        await client.until(lambda: client.received(1) > 0)
        block = client.h2.encoder.encode([(b"x-trailer", b"no end_stream")])
        client._writer.write(len(block).to_bytes(3, "big") + b"\x01\x04\0\0\0\x01" + block)
        if http2_layer == "builtin":
            await client.until(lambda: bool(client.of(1, h2.events.StreamReset)))
            assert (client.of(1, h2.events.StreamReset)[0].error_code
                    == h2.errors.ErrorCodes.PROTOCOL_ERROR)
            await _echo_works(client, 3)  # the connection serves on
        else:
            await client.until(lambda: client.eof)
        assert server.protocol_errors == 1
        client.close()


async def test_a_stream_past_the_limit_is_refused_not_counted_as_bad_input(
        http2_layer: str) -> None:
    """A peer may open a stream past MAX_CONCURRENT_STREAMS before it read our SETTINGS:
    the builtin layer refuses only that stream (REFUSED_STREAM, the peer may retry it)
    and counts no protocol error; the h2 library ends the connection."""
    async with serving(max_concurrent_streams=2) as (server, port):
        client = RawClient()
        await client.connect(port)
        await client.until(lambda: client.h2.remote_settings.max_concurrent_streams == 2)
        for sid in (1, 3):
            client.open(sid, "Echo")
        # as a peer that had not read our SETTINGS yet
        client.h2.remote_settings.update({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        client.h2.remote_settings.acknowledge()
        client.open(5, "Echo")
        if http2_layer == "builtin":
            await client.until(lambda: bool(client.of(5, h2.events.StreamReset)))
            assert (client.of(5, h2.events.StreamReset)[0].error_code
                    == h2.errors.ErrorCodes.REFUSED_STREAM)
            assert server.protocol_errors == 0
            client.send(1, b"ping", end=True)  # the two open streams go on
            await client.until(lambda: client.status(1) is not None)
            assert client.status(1) == b"0"
        else:
            await client.until(lambda: client.eof)
        client.close()
