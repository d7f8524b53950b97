"""The builtin HTTP/2 layer's state, and its sending half: frames out, both windows,
stream states, resets and GOAWAY (`ext_proc.h2grpc.http2` reads; see its docstring)."""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, Final

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ext_proc.h2grpc.h2state import (
    CLOSED_STREAMS_KEPT,
    MAX_HEADER_LIST,
    STREAM_WINDOW,
    RepeatingBlocks,
    RepeatingHeaders,
)

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEADER_BLOCK: Final = 64 * 1024  # encoded, HEADERS and its CONTINUATIONs together
MAX_FRAME_IN: Final = 16384  # the largest frame we accept (SETTINGS_MAX_FRAME_SIZE's default)
MAX_WINDOW: Final = (1 << 31) - 1
FRAME_HEADER: Final = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
U32: Final = struct.Struct(">I")

# frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

Err = h2.errors.ErrorCodes
SERVER_OPEN: Final = h2.connection.ConnectionState.SERVER_OPEN
CLOSED: Final = h2.connection.ConnectionState.CLOSED

# how a stream we remember closed
ENDED, RESET_BY_PEER, RESET_BY_US = 0, 1, 2


class StateMachine:
    """`state` as `h2`'s state machine has it (the engine reads CLOSED: a GOAWAY went
    either way; streams already open go on, as RFC 9113 6.8 lets them)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = SERVER_OPEN


class Stream:
    """One open stream's windows and which sides have ended it."""

    __slots__ = ("local_closed", "recv_unacked", "recv_window", "remote_closed", "send_window")

    def __init__(self, send_window: int) -> None:
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0  # received and given back by the engine, not yet announced
        self.send_window = send_window
        self.remote_closed = False  # the peer's END_STREAM came
        self.local_closed = False  # ours went


class ConnectionFailure(Exception):
    """A connection error (RFC 9113 5.4.1): `code` goes in our GOAWAY."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Http2State:
    """One connection's HTTP/2 state, server side, and what it sends."""

    def __init__(self, max_concurrent_streams: int) -> None:
        self.decoder = RepeatingBlocks(MAX_HEADER_LIST)
        self.encoder = RepeatingHeaders()
        self.state_machine = StateMachine()
        self.highest_inbound_stream_id = 0
        self.max_outbound_frame_size = 16384  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._max_streams = max_concurrent_streams
        self._streams: dict[int, Stream] = {}
        # the last CLOSED_STREAMS_KEPT, and how each closed: an OrderedDict, whose oldest
        # entry goes in O(1) (a dict's next(iter()) walks the holes left at its front)
        self._closed_streams: OrderedDict[int, int] = OrderedDict()
        self._out = bytearray()
        self._buffer = bytearray()  # the start of a frame not yet whole ...
        self._needed = 0  # ... and how long it must grow to be read again
        self._preface_seen = False
        self._settings_seen = False
        self._failed = False  # a connection error was raised: nothing more is read
        self._peer_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._send_window = 65535  # the connection's, for what we send
        self._recv_window = 65535  # the connection's, for what the peer may send
        self._recv_target = 65535
        self._recv_unacked = 0
        # a header block in parts: stream, HEADERS flags, depends on itself, fragments
        self._block: tuple[int, int, bool, bytearray] | None = None

    # -- sending ------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self._out += FRAME_HEADER.pack((len(payload) << 8) | kind, flags, sid)
        self._out += payload

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def initiate_connection(self) -> None:
        """Our SETTINGS: the limits and the stream window we announce."""
        self._frame(SETTINGS, 0, 0, struct.pack(
            ">HIHIHI", h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS, self._max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE, STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST))

    def increment_flow_control_window(self, increment: int,
                                      stream_id: int | None = None) -> None:
        """Open the connection's receive window by `increment` (streams: not needed)."""
        if stream_id:
            raise ValueError("only the connection's window is raised this way")
        self._recv_window += increment
        self._recv_target += increment
        self._frame(WINDOW_UPDATE, 0, 0, U32.pack(increment))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """The engine consumed that much of a DATA frame: give it back to the peer, in
        WINDOW_UPDATEs once half of a window is owed (as h2 does)."""
        self._recv_unacked += acknowledged_size
        if self._recv_unacked >= self._recv_target // 2:
            self._frame(WINDOW_UPDATE, 0, 0, U32.pack(self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            stream.recv_unacked += acknowledged_size
            if stream.recv_unacked >= STREAM_WINDOW // 2:
                self._frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.recv_unacked))
                stream.recv_window += stream.recv_unacked
                stream.recv_unacked = 0

    def _sending(self, sid: int) -> Stream:
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise h2.exceptions.StreamClosedError(sid)
        return stream

    def local_flow_control_window(self, stream_id: int) -> int:
        """What may be sent on `stream_id` now (StreamClosedError: it is gone)."""
        return min(self._sending(stream_id).send_window, self._send_window)

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False) -> None:
        stream = self._sending(stream_id)
        block = self.encoder.encode(headers)
        size, end = self.max_outbound_frame_size, END_STREAM if end_stream else 0
        if len(block) <= size:
            self._frame(HEADERS, END_HEADERS | end, stream_id, block)
        else:
            self._frame(HEADERS, end, stream_id, block[:size])
            for at in range(size, len(block), size):
                last = at + size >= len(block)
                self._frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                            block[at:at + size])
        if end_stream:
            self._end_local(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._sending(stream_id)
        if len(data) > min(stream.send_window, self._send_window):
            raise h2.exceptions.FlowControlError(
                f"{len(data)} bytes beyond the window of stream {stream_id}")
        if len(data) > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"a frame of {len(data)} bytes (at most {self.max_outbound_frame_size})")
        stream.send_window -= len(data)
        self._send_window -= len(data)
        self._frame(DATA, END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            self._end_local(stream_id, stream)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if stream_id not in self._streams and stream_id in self._closed_streams:
            raise h2.exceptions.StreamClosedError(stream_id)
        self._frame(RST_STREAM, 0, stream_id, U32.pack(int(error_code)))
        self._forget(stream_id, RESET_BY_US)

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        """GOAWAY: no stream above `last_stream_id` (default: the highest seen) will be
        served; the ones open go on."""
        last = self.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        self._frame(GOAWAY, 0, 0,
                    struct.pack(">II", last, int(error_code)) + (additional_data or b""))
        self.state_machine.state = CLOSED

    def _end_local(self, sid: int, stream: Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(sid, ENDED)

    def _idle(self, sid: int) -> bool:
        """Never opened: even (we open no streams) or above every stream the peer opened."""
        return not sid & 1 or (sid > self.highest_inbound_stream_id
                               and sid not in self._closed_streams)

    def _forget(self, sid: int, how: int) -> None:
        self._streams.pop(sid, None)
        closed = self._closed_streams
        if len(closed) >= CLOSED_STREAMS_KEPT:
            closed.popitem(last=False)
        closed[sid] = how

    def _reset(self, sid: int, code: int, events: list[Any]) -> None:
        """A stream error: RST_STREAM, and `StreamReset` (remote_reset False) for the
        engine, which forgets the stream's call and counts the error."""
        events.append(h2.events.StreamReset(stream_id=sid, error_code=code, remote_reset=False))
        self._frame(RST_STREAM, 0, sid, U32.pack(code))
        self._forget(sid, RESET_BY_US)

    # -- receiving ----------------------------------------------------------------

