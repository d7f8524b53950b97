"""One HTTP/2 connection (asyncio protocol): frames in, calls dispatched, frames out.

The HTTP/2 layer (`ext_proc.h2grpc.http2`, or the h2 library's `H2Connection`:
`server.http2_layer`) keeps the protocol state (HPACK, flow control, stream states,
SETTINGS and PING answers); this class maps streams to `Call`s. The sending side
(`Outbound`) batches what the calls send within one event-loop turn into one write.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ext_proc.h2grpc.call import (
    RESPONSE_HEADERS,
    AbortError,
    Call,
    Headers,
    metadata_of,
    trailers,
)
from ext_proc.h2grpc.direct import DirectCall, Metadata
from ext_proc.h2grpc.h2state import RepeatingBlocks, RepeatingHeaders, server_connection
from ext_proc.h2grpc.http2 import ServerConnection
from ext_proc.h2grpc.outbound import Outbound

if TYPE_CHECKING:
    from ext_proc.h2grpc.server import Server

_CONNECTION_WINDOW: Final = 16 << 20
KEPT_METADATA: Final = 64  # decoded header blocks kept per connection
_PREFIX: Final = 5  # gRPC message: compressed flag (1 byte) + length (4 bytes, big endian)


_OVERLOADED: Final = RESPONSE_HEADERS + trailers(grpc.StatusCode.UNAVAILABLE, "overloaded")


def _unimplemented(path: bytes) -> Headers:
    return RESPONSE_HEADERS + trailers(grpc.StatusCode.UNIMPLEMENTED,
                                       f"Method not found: {path.decode('latin-1')}")


class Connection(Outbound, asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        super().__init__(server, ServerConnection(server.max_concurrent_streams)
                         if server.http2_layer == "builtin"
                         else server_connection(server.max_concurrent_streams))
        self._reading = False  # inside data_received
        self._opened = 0
        self._to_settle: list[DirectCall] = []
        self._metadata: dict[tuple[tuple[bytes, bytes], ...], Metadata] = {}

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"ipv{6 if ':' in str(peer[0]) else 4}:{peer[0]}:{peer[1]}"
        self._server.connections.add(self)
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._lost = True
        self._server.connections.discard(self)
        for call in list(self.calls.values()):
            call.reset()
        self.calls.clear()
        self._pending.clear()
        self._server.output_drained()
        self._settle()

    def data_received(self, data: bytes) -> None:
        self._reading = True
        self._opened = 0  # direct calls opened by this read
        try:
            self._read(data)
        finally:
            self._reading = False
            self._settle()  # direct calls record once every answer of this read is out

    def _read(self, data: bytes) -> None:
        try:
            events: list[Any] = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._server.protocol_error("HTTP/2 protocol error: connection closed",
                                        self.peer, exc)
            self._flush()  # h2 queued a GOAWAY
            self.close()
            return
        for event in events:
            try:
                self._on_event(event)
            except Exception as exc:  # one stream's trouble must not end the others
                sid = getattr(event, "stream_id", 0)
                self._server.protocol_error("HTTP/2 event failed: stream reset", self.peer, exc)
                if sid:
                    self._drop(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._flush()

    def settle_later(self, call: DirectCall) -> None:
        """Run `call.settle()` after this read's answers are written."""
        self._to_settle.append(call)
        if not self._reading and len(self._to_settle) == 1:
            self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        calls, self._to_settle = self._to_settle, []
        for call in calls:
            call.settle()

    def kept_metadata(self) -> int:
        return len(self._metadata)

    def kept_blocks(self) -> int:
        """Header blocks its HPACK coders remember: received ones decoded
        (h2state.RepeatingBlocks), sent ones encoded (RepeatingHeaders)."""
        decoder, encoder = self._h2.decoder, self._h2.encoder
        return ((decoder.kept() if isinstance(decoder, RepeatingBlocks) else 0)
                + (encoder.kept() if isinstance(encoder, RepeatingHeaders) else 0))

    def closed_streams(self) -> int:
        """Closed streams h2 remembers for this connection (at most CLOSED_STREAMS_KEPT)."""
        return len(self._h2._closed_streams)

    def metadata(self, headers: Headers) -> Metadata:
        """`headers` as gRPC metadata; a peer's streams repeat theirs (Envoy: per route),
        so the last few are kept decoded."""
        key = tuple(headers)
        found = self._metadata.get(key)
        if found is None:
            if len(self._metadata) >= KEPT_METADATA:
                self._metadata.clear()
            found = self._metadata[key] = metadata_of(headers)
        return found

    def forget(self, call: DirectCall) -> None:
        """`call` is over: no more of its frames are dispatched."""
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
        self._close_if_drained()
        self._server.output_drained()  # wakes a stop() waiting for open calls

    def _on_event(self, event: Any) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._on_data(event)
        elif kind is h2.events.RequestReceived:
            self._on_request(event)
        elif kind is h2.events.StreamEnded:
            call = self.calls.get(event.stream_id)
            if call is not None:
                if call.buffer:
                    call.fail(AbortError(grpc.StatusCode.INTERNAL,
                                         "stream ended inside a message"))
                call.end_of_requests()
        elif kind is h2.events.StreamReset:
            # a stream error of the peer's (http2.py); not a stream refused past our
            # limit, which a peer may open before it has read our SETTINGS
            if (not event.remote_reset
                    and event.error_code != h2.errors.ErrorCodes.REFUSED_STREAM):
                self._server.protocol_error(
                    "HTTP/2 stream error: stream reset", self.peer, h2.exceptions.ProtocolError(
                        f"stream {event.stream_id}: {h2.errors.ErrorCodes(event.error_code).name}"))
            self._pending.pop(event.stream_id, None)
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                call.reset()
            self._close_if_drained()
        elif kind is h2.events.WindowUpdated:
            self._resume(event.stream_id)
        elif kind is h2.events.RemoteSettingsChanged:
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._resume(0)  # h2 resized every stream window: no WindowUpdated
        elif kind is h2.events.ConnectionTerminated:
            self._close_if_drained()

    def _drop(self, sid: int, code: int) -> None:
        """Reset stream `sid` and forget its call (the connection carries on)."""
        self._pending.pop(sid, None)
        call = self.calls.pop(sid, None)
        if call is not None:
            call.reset()
        self._send(lambda: self._h2.reset_stream(sid, code))

    # -- inbound ----------------------------------------------------------------

    def _on_request(self, event: Any) -> None:
        headers: Headers = event.headers
        path = b""
        for key, value in headers:  # a plain loop: 0.10 µs, a generator 0.34
            if key == b":path":
                path = value
                break
        handler = self._server.handler(path)
        sid = event.stream_id
        if self._goaway_last is not None and sid > self._goaway_last:
            # opened as our GOAWAY crossed it: the peer counts it as refused
            self._send(lambda: self._h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM))
            return
        direct = self._server.direct.get(path)
        if direct is not None:
            # Streams opened by one read wait for the ones before them in it: past
            # max_backlog of them, a sheddable method's are refused (as calls waiting
            # for their task are, below).
            self._opened += 1
            server = self._server
            if self._opened > server.max_backlog and path in server.sheddable:
                server.shed += 1
                self.send_headers(sid, _OVERLOADED, end_stream=True)
                return
            opened = DirectCall.open(self, sid, direct, headers)
            if opened is not None:
                self.calls[sid] = opened
            return
        if handler is None:
            self.send_headers(sid, _unimplemented(path), end_stream=True)
            return
        server = self._server
        if server.backlog >= server.max_backlog and path in server.sheddable:
            server.shed += 1  # overloaded: the peer proceeds without us at once
            self.send_headers(sid, _OVERLOADED, end_stream=True)
            return
        server.backlog += 1
        call = Call(self, sid, handler, headers)
        self.calls[sid] = call
        task = self.loop.create_task(call.run())
        call.task = task
        task.add_done_callback(functools.partial(self._done, sid, call))

    def _on_data(self, event: Any) -> None:
        sid = event.stream_id
        if event.flow_controlled_length:  # not for an empty END_STREAM frame (~1.5 µs)
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        call = self.calls.get(sid)
        if call is None or call.finished or call.failed:
            return
        buffer = call.buffer
        data = event.data
        limit = self._server.max_receive_message_length
        if (not buffer and len(data) > _PREFIX and data[0] == 0
                and int.from_bytes(data[1:5], "big") == len(data) - _PREFIX <= limit):
            call.deliver(data[_PREFIX:])  # the usual frame: exactly one whole message
            return
        buffer += data
        while len(buffer) >= _PREFIX:
            length = int.from_bytes(buffer[1:5], "big")
            if buffer[0] != 0:
                call.fail(AbortError(grpc.StatusCode.UNIMPLEMENTED,
                                     "compressed messages are not supported"))
                return
            if length > limit:
                call.fail(AbortError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"Received message larger than max ({length} vs. {limit})"))
                return
            end = _PREFIX + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[_PREFIX:end])
            del buffer[:end]
            call.deliver(payload)
            if call.failed:
                return

    def started(self, call: Call) -> None:
        """`call`'s handler runs: it has left the backlog."""
        if call.waiting:
            call.waiting = False
            self._server.backlog -= 1

    def _done(self, sid: int, call: Call, _task: object = None) -> None:
        self.started(call)  # cancelled before it ran
        if self.calls.get(sid) is call:
            del self.calls[sid]
        if not call.finished:  # cancelled by the server's stop: tell the peer
            call.finished = True
            self._send(lambda: self._h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL))
        elif not call.half_closed and not call.cancelled() and sid not in self._pending:
            # answered before the peer finished sending: it may stop now (RFC 9113 8.1)
            self._send(lambda: self._h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR))
        self._close_if_drained()
