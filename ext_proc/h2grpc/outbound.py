"""The sending side of a connection: frames out, flow control, batching, closing.

What the calls send is queued in h2 and written once per event-loop turn (or at
once, when nothing else waits to run); data beyond the peer's flow-control window
waits in `_pending`, with the trailers that must follow it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h2.connection
import h2.exceptions
from loguru import logger

from ext_proc.h2grpc.call import Call, Headers
from ext_proc.h2grpc.direct import DirectCall
from ext_proc.h2grpc.http2 import ServerConnection

if TYPE_CHECKING:
    from ext_proc.h2grpc.server import Server


class Outbound:
    def __init__(self, server: Server,
                 connection: h2.connection.H2Connection | ServerConnection) -> None:
        self._server = server
        self._h2 = connection
        self.loop = asyncio.get_running_loop()
        self.calls: dict[int, Call | DirectCall] = {}
        self._pending: dict[int, list[Any]] = {}  # stream -> [bytes waiting for window, trailers]
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._closed = False  # no more writes
        self._lost = False  # the transport is gone
        self._goaway_last: int | None = None  # the last stream id our GOAWAY accepted
        self.peer = ""

    def _close_if_drained(self) -> None:
        """After a GOAWAY (either way): close once no call runs and nothing waits for
        flow-control window."""
        if (not self.calls and not self._pending
                and self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED):
            self.close()

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
        h2_connection = self._h2
        try:
            fits = len(data) <= min(h2_connection.max_outbound_frame_size,
                                    h2_connection.local_flow_control_window(sid))
        except h2.exceptions.ProtocolError:  # the stream is gone: nothing to send
            return
        if fits:  # the usual answer: one frame, within the window
            self._send(lambda: h2_connection.send_data(sid, data))
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
                if not self._pending:
                    self._server.output_drained()
                if pending[1] is not None:
                    self.send_headers(stream_id, pending[1], end_stream=True)
                    if not self.calls.get(stream_id):
                        self._close_if_drained()
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
        self._goaway_last = self._h2.highest_inbound_stream_id
        self._send(lambda: self._h2.close_connection(last_stream_id=self._goaway_last))
        self._flush()

    @property
    def pending_output(self) -> bool:
        """Response bytes or trailers wait for the peer's flow-control window."""
        return bool(self._pending)

    def close(self, abort: bool = False) -> None:
        """Close after writing what is queued; `abort`: at once, even after a close
        (server stop: a TLS close waits for the peer's close_notify, up to 30 s)."""
        transport = self._transport
        if transport is None or self._lost:
            return
        if not self._closed:
            self._flush()
            self._closed = True
        if abort:
            transport.abort()
        else:
            transport.close()
