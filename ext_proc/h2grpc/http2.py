"""The server side of an HTTP/2 connection (RFC 9113), as the h2 engine needs it.

`ServerConnection` keeps what the `h2` library's `H2Connection` kept for the engine
(frames in and out, HPACK, flow control, stream states, SETTINGS and PING answers)
and offers the same calls and events (`h2.events`), so `Connection` and `Outbound`
drive either (`server.http2_layer`). It does only what a gRPC server needs: no
server push, no priorities (PRIORITY is read and ignored), no header checks (the
servicers parse what they use), no CONTINUATION blocks longer than 64 KiB. Alone, it
costs 0.10-0.12x of `h2`'s CPU per ext_proc stream (bench/h2alone.py); behind Envoy,
the sidecar's CPU per request fell 24-42 % with it (six runs on two boxes, bench/README.md).

Errors, as the RFC asks (section 5.4):
- a *connection error* queues a GOAWAY with its code and raises
  `h2.exceptions.ProtocolError` from `receive_data` (the engine writes the GOAWAY
  and closes): a bad preface, a first frame other than SETTINGS, a frame longer
  than 16 KiB, a bad header block, DATA beyond a window, a frame on an idle stream
  or a stream closed normally, a frame type or length a frame may not have;
- a *stream error* resets only its stream (RST_STREAM, and `StreamReset` with
  `remote_reset` False: the engine counts it): DATA or HEADERS after the peer's END_STREAM,
  trailers without END_STREAM, a stream depending on itself, a zero or
  overflowing WINDOW_UPDATE on a stream, a PRIORITY of the wrong length; a stream
  beyond MAX_CONCURRENT_STREAMS is refused (REFUSED_STREAM: the peer may retry);
- frames on a stream we reset are ignored (section 5.1), their DATA still counted
  against the connection's window and given back.
"""

from __future__ import annotations

from typing import Any

import h2.events
import hpack

from ext_proc.h2grpc.h2state import MAX_HEADER_LIST
from ext_proc.h2grpc.http2_control import ControlFrames
from ext_proc.h2grpc.http2_state import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENDED,
    FRAME_HEADER,
    GOAWAY,
    HEADERS,
    MAX_FRAME_IN,
    MAX_HEADER_BLOCK,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RESET_BY_US,
    RST_STREAM,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    ConnectionFailure,
    Err,
    Stream,
)

__all__ = ["MAX_HEADER_BLOCK", "MAX_HEADER_LIST", "PREFACE", "ServerConnection"]


class ServerConnection(ControlFrames):
    """One connection's HTTP/2 state, server side (see the module's docstring): the
    read loop, and the frames of streams (DATA, HEADERS, CONTINUATION)."""

    def receive_data(self, data: bytes) -> list[Any]:
        """The events `data` completes (h2's classes). A connection error queues a
        GOAWAY and raises `h2.exceptions.ProtocolError`."""
        events: list[Any] = []
        if self._failed:
            return events
        try:
            self._receive(data, events)
        except ConnectionFailure as exc:
            self._failed = True
            self._buffer = bytearray()
            self.close_connection(exc.code)
            raise h2.exceptions.ProtocolError(str(exc)) from None
        return events

    def _receive(self, data: bytes, events: list[Any]) -> None:
        if self._buffer:  # a frame arriving in pieces is copied once it is whole
            self._buffer += data
            if len(self._buffer) < self._needed:
                return
            buffer, self._buffer = bytes(self._buffer), bytearray()
        else:
            buffer = data
        at, size = 0, len(buffer)
        if not self._preface_seen:
            if size < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    raise ConnectionFailure(Err.PROTOCOL_ERROR, "not an HTTP/2 preface")
                self._buffer, self._needed = bytearray(buffer), len(PREFACE)
                return
            if buffer[:len(PREFACE)] != PREFACE:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "not an HTTP/2 preface")
            self._preface_seen = True
            at = len(PREFACE)
        unpack, needed = FRAME_HEADER.unpack_from, 9
        while size - at >= 9:
            word, flags, sid = unpack(buffer, at)
            length, kind = word >> 8, word & 0xFF
            if length > MAX_FRAME_IN:
                raise ConnectionFailure(Err.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            end = at + 9 + length
            if end > size:
                needed = 9 + length
                break
            payload = buffer[at + 9:end]
            at = end
            sid &= 0x7FFFFFFF
            if not self._settings_seen:
                if kind != SETTINGS or flags & ACK:
                    raise ConnectionFailure(Err.PROTOCOL_ERROR, "the first frame is not SETTINGS")
                self._settings_seen = True
            if self._block is not None and kind != CONTINUATION:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "a frame inside a header block")
            if kind == DATA:
                self._on_data(sid, flags, payload, events)
            elif kind == HEADERS:
                self._on_headers(sid, flags, payload, events)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(sid, payload, events)
            elif kind == CONTINUATION:
                self._on_continuation(sid, flags, payload, events)
            elif kind == SETTINGS:
                self._on_settings(sid, flags, payload, events)
            elif kind == RST_STREAM:
                self._on_rst_stream(sid, payload, events)
            elif kind == PING:
                self._on_ping(sid, flags, payload)
            elif kind == GOAWAY:
                self._on_goaway(sid, payload, events)
            elif kind == PRIORITY:
                self._on_priority(sid, payload, events)
            elif kind == PUSH_PROMISE:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # other types: ignored (RFC 9113 4.1)
        if at < size:
            self._buffer, self._needed = bytearray(buffer[at:]), needed

    def _not_open(self, sid: int, kind: str) -> None:
        """A DATA or HEADERS frame for a stream that is not open: ignored when we reset
        it; a connection error when it is idle or closed otherwise."""
        if self._idle(sid):
            raise ConnectionFailure(Err.PROTOCOL_ERROR, f"{kind} on idle stream {sid}")
        if self._closed_streams.get(sid) != RESET_BY_US:
            raise ConnectionFailure(Err.STREAM_CLOSED, f"{kind} on closed stream {sid}")

    def _on_data(self, sid: int, flags: int, payload: bytes, events: list[Any]) -> None:
        length = len(payload)
        if not sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._recv_window:
            raise ConnectionFailure(Err.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self._recv_window -= length
        if flags & PADDED and (not length or payload[0] >= length):
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "padding as long as the frame")
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            self.acknowledge_received_data(length, 0)  # the connection's share comes back
            if stream is not None:
                self._reset(sid, Err.STREAM_CLOSED, events)
            else:
                self._not_open(sid, "DATA")
            return
        if length > stream.recv_window:
            raise ConnectionFailure(Err.FLOW_CONTROL_ERROR, f"DATA beyond stream {sid}'s window")
        stream.recv_window -= length
        data = payload[1:length - payload[0]] if flags & PADDED else payload
        events.append(h2.events.DataReceived(stream_id=sid, data=data,
                                             flow_controlled_length=length))
        if flags & END_STREAM:
            self._end_remote(sid, stream, events)

    def _end_remote(self, sid: int, stream: Stream, events: list[Any]) -> None:
        stream.remote_closed = True
        events.append(h2.events.StreamEnded(stream_id=sid))
        if stream.local_closed:
            self._forget(sid, ENDED)

    def _on_headers(self, sid: int, flags: int, payload: bytes, events: list[Any]) -> None:
        if not sid or not sid & 1:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not end:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "padding as long as the frame")
            start, end = 1, end - payload[0]
        depends_on_itself = False
        if flags & PRIORITY_FLAG:
            if end - start >= 5:
                dependency = U32.unpack_from(payload, start)[0] & 0x7FFFFFFF
                depends_on_itself = dependency == sid
            start += 5
        if end < start:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "padding as long as the frame")
        if flags & END_HEADERS:
            self._on_block(sid, flags, payload[start:end], depends_on_itself, events)
        else:
            self._block = (sid, flags, depends_on_itself, bytearray(payload[start:end]))

    def _on_continuation(self, sid: int, flags: int, payload: bytes,
                         events: list[Any]) -> None:
        block = self._block
        if block is None or block[0] != sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "CONTINUATION out of place")
        fragments = block[3]
        fragments.extend(payload)
        if len(fragments) > MAX_HEADER_BLOCK:
            raise ConnectionFailure(Err.ENHANCE_YOUR_CALM,
                                   f"a header block longer than {MAX_HEADER_BLOCK} bytes")
        if flags & END_HEADERS:
            self._block = None
            self._on_block(sid, block[1], bytes(fragments), block[2], events)

    def _on_block(self, sid: int, flags: int, block: bytes, depends_on_itself: bool,
                  events: list[Any]) -> None:
        try:  # decoded even for a stream refused: the HPACK table must follow the peer's
            headers = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError:
            raise ConnectionFailure(Err.ENHANCE_YOUR_CALM,
                                   f"a header list longer than {MAX_HEADER_LIST}") from None
        except (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise ConnectionFailure(Err.COMPRESSION_ERROR, f"a bad header block: {exc}") from None
        stream = self._streams.get(sid)
        if stream is not None:  # trailers
            if stream.remote_closed:
                self._reset(sid, Err.STREAM_CLOSED, events)
            elif not flags & END_STREAM or depends_on_itself:
                self._reset(sid, Err.PROTOCOL_ERROR, events)  # malformed (RFC 9113 8.1)
            else:
                self._end_remote(sid, stream, events)
            return
        if sid <= self.highest_inbound_stream_id:
            self._not_open(sid, "HEADERS")
            return
        self.highest_inbound_stream_id = sid
        if depends_on_itself:
            self._reset(sid, Err.PROTOCOL_ERROR, events)
            return
        if len(self._streams) >= self._max_streams:
            self._reset(sid, Err.REFUSED_STREAM, events)
            return
        stream = self._streams[sid] = Stream(self._peer_window)
        events.append(h2.events.RequestReceived(stream_id=sid, headers=headers))
        if flags & END_STREAM:
            self._end_remote(sid, stream, events)

