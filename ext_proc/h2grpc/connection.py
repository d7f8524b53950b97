"""One HTTP/2 connection (asyncio protocol): frames in, calls dispatched, frames out.

The h2 library keeps the protocol state (HPACK, flow control, stream states,
SETTINGS and PING answers); this class maps streams to `Call`s and batches
everything the calls send within one event-loop turn into one write.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from loguru import logger

from ext_proc.h2grpc.call import RESPONSE_HEADERS, AbortError, Call, Headers, trailers

if TYPE_CHECKING:
    from ext_proc.h2grpc.server import Server

_CONFIG: Final = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # No per-header checks on the way out: our few headers are constants. None on the
    # way in either: h2 would answer a header value with surrounding spaces (which
    # grpc accepts) with a connection error, ending every stream of that Envoy
    # worker; only :path is read here, and the servicers parse what they use.
    validate_outbound_headers=False, normalize_outbound_headers=False,
    validate_inbound_headers=False, normalize_inbound_headers=False)
_WINDOW: Final = 1 << 20  # per-stream receive window we announce
_CONNECTION_WINDOW: Final = 16 << 20
_PREFIX: Final = 5  # gRPC message: compressed flag (1 byte) + length (4 bytes, big endian)


class _DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection states, except that a GOAWAY (either way) does not end the
    streams already open: HTTP/2 lets them finish (RFC 9113, 6.8), h2 would call
    every later frame of theirs a protocol error and drop the connection."""

    _transitions = {  # noqa: RUF012 (h2 declares it as an instance attribute)
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{(h2.connection.ConnectionState.CLOSED, event): (None,
                                                            h2.connection.ConnectionState.CLOSED)
           for (state, event) in h2.connection.H2ConnectionStateMachine._transitions
           if state is h2.connection.ConnectionState.SERVER_OPEN},
    }


_OVERLOADED: Final = RESPONSE_HEADERS + trailers(grpc.StatusCode.UNAVAILABLE, "overloaded")


def _unimplemented(path: bytes) -> Headers:
    return RESPONSE_HEADERS + trailers(grpc.StatusCode.UNIMPLEMENTED,
                                       f"Method not found: {path.decode('latin-1')}")


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self.loop = asyncio.get_running_loop()
        self.calls: dict[int, Call] = {}
        self._pending: dict[int, list[Any]] = {}  # stream -> [bytes waiting for window, trailers]
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._closed = False
        self.peer = ""
        settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
        })
        self._h2 = h2.connection.H2Connection(_CONFIG)
        self._h2.local_settings = settings
        self._h2.state_machine = _DrainingStateMachine()

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
        self._closed = True
        self._server.connections.discard(self)
        for call in list(self.calls.values()):
            call.reset()
        self.calls.clear()
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events: list[Any] = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.debug("HTTP/2 protocol error: closing the connection: {}", exc, peer=self.peer,
                         error=str(exc))
            self._flush()  # h2 queued a GOAWAY
            self.close()
            return
        for event in events:
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
                self._pending.pop(event.stream_id, None)
                call = self.calls.pop(event.stream_id, None)
                if call is not None:
                    call.reset()
            elif kind is h2.events.WindowUpdated:
                self._resume(event.stream_id)
            elif kind is h2.events.ConnectionTerminated:
                if not self.calls:
                    self.close()
        self._flush()

    # -- inbound ----------------------------------------------------------------

    def _on_request(self, event: Any) -> None:
        headers: Headers = event.headers
        path = next((v for k, v in headers if k == b":path"), b"")
        handler = self._server.handler(path)
        sid = event.stream_id
        if handler is None:
            self._h2.send_headers(sid, _unimplemented(path), end_stream=True)
            return
        server = self._server
        if server.backlog >= server.max_backlog and path in server.sheddable:
            server.shed += 1  # overloaded: the peer proceeds without us at once
            self._h2.send_headers(sid, _OVERLOADED, end_stream=True)
            return
        server.backlog += 1
        call = Call(self, sid, handler, headers)
        self.calls[sid] = call
        task = self.loop.create_task(call.run())
        call.task = task
        task.add_done_callback(functools.partial(self._done, sid, call))

    def _on_data(self, event: Any) -> None:
        sid = event.stream_id
        self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        call = self.calls.get(sid)
        if call is None or call.finished or call.failed:
            return
        buffer = call.buffer
        buffer += event.data
        limit = self._server.max_receive_message_length
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
        if not self.calls and self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
            self.close()

    # -- outbound ---------------------------------------------------------------

    def _send(self, action: Any) -> None:
        if self._closed:
            return
        try:
            action()
        except h2.exceptions.StreamClosedError:
            pass  # the peer reset it meanwhile
        except h2.exceptions.ProtocolError as exc:
            logger.debug("HTTP/2 send failed", peer=self.peer, error=str(exc))
        self._schedule_flush()

    def send_headers(self, sid: int, headers: Headers, end_stream: bool = False) -> None:
        self._send(lambda: self._h2.send_headers(sid, headers, end_stream=end_stream))

    def send_data(self, sid: int, data: bytes) -> None:
        pending = self._pending.get(sid)
        if pending is not None:  # keep order behind what waits for window
            pending[0] += data
            return
        self._pending[sid] = [bytearray(data), None]
        self._resume(sid)

    def send_trailers(self, sid: int, block: Headers) -> None:
        pending = self._pending.get(sid)
        if pending is not None:
            pending[1] = block
            return
        self.send_headers(sid, block, end_stream=True)

    def _resume(self, sid: int) -> None:
        """Send what flow control allows of the pending data of `sid` (all, when 0)."""
        for stream_id in (list(self._pending) if sid == 0 else [sid]):
            pending = self._pending.get(stream_id)
            if pending is None:
                continue
            data: bytearray = pending[0]
            try:
                while data:
                    size = min(len(data), self._h2.local_flow_control_window(stream_id),
                               self._h2.max_outbound_frame_size)
                    if size <= 0:
                        break
                    self._h2.send_data(stream_id, bytes(data[:size]))
                    del data[:size]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                del self._pending[stream_id]
                continue
            if not data:
                del self._pending[stream_id]
                if pending[1] is not None:
                    self.send_headers(stream_id, pending[1], end_stream=True)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def busy(self) -> bool:
        """Calls are waiting for their handler to start (a burst)."""
        return self._server.backlog > 0

    def flush(self) -> None:
        """Write what is queued now (the rest of this loop turn is batched)."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._closed:
            self._transport.write(data)

    def goaway(self) -> None:
        """Tell the peer to open no more streams here (in-flight ones continue)."""
        self._send(lambda: self._h2.close_connection())
        self._flush()

    def close(self, abort: bool = False) -> None:
        """Close after writing what is queued; `abort`: at once (server stop: a TLS
        close would wait for the peer's close_notify, up to 30 s, after our GOAWAY)."""
        if self._transport is not None and not self._closed:
            self._flush()
            self._closed = True
            if abort:
                self._transport.abort()
            else:
                self._transport.close()
