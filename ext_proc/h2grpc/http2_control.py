"""The control frames the builtin HTTP/2 layer receives: WINDOW_UPDATE, SETTINGS,
RST_STREAM, PING, GOAWAY and PRIORITY (errors as `ext_proc.h2grpc.http2` says)."""

from __future__ import annotations

import struct
from typing import Any

import h2.events
import h2.settings

from ext_proc.h2grpc.http2_state import (
    ACK,
    CLOSED,
    MAX_WINDOW,
    PING,
    RESET_BY_PEER,
    SETTINGS,
    U32,
    ConnectionFailure,
    Err,
    Http2State,
)


class ControlFrames(Http2State):
    """The connection-wide frames a peer sends, read."""

    def _on_window_update(self, sid: int, payload: bytes, events: list[Any]) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "a WINDOW_UPDATE not of 4 bytes")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ConnectionFailure(Err.FLOW_CONTROL_ERROR, "a window past 2^31-1")
            events.append(h2.events.WindowUpdated(stream_id=0, delta=increment))
            return
        stream = self._streams.get(sid)
        if stream is None:
            if self._idle(sid):
                raise ConnectionFailure(Err.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a closed stream: allowed for a while (RFC 9113 6.9)
        if not increment:
            self._reset(sid, Err.PROTOCOL_ERROR, events)
        elif stream.send_window + increment > MAX_WINDOW:
            self._reset(sid, Err.FLOW_CONTROL_ERROR, events)
        else:
            stream.send_window += increment
            events.append(h2.events.WindowUpdated(stream_id=sid, delta=increment))

    def _on_settings(self, sid: int, flags: int, payload: bytes, events: list[Any]) -> None:
        if sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "SETTINGS not in 6-byte entries")
        changed: dict[Any, h2.settings.ChangedSetting] = {}
        codes = h2.settings.SettingCodes
        entries = [struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6)]
        for code, value in entries:  # every value must be valid ...
            if code == codes.ENABLE_PUSH and value > 1:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1")
            if code == codes.INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
                raise ConnectionFailure(Err.FLOW_CONTROL_ERROR, "an initial window past 2^31-1")
            if code == codes.MAX_FRAME_SIZE and not 16384 <= value <= (1 << 24) - 1:
                raise ConnectionFailure(Err.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
        # ... and the last of each is applied, once: a frame that repeats one 2,730 times
        # costs no more than one that has it once (RFC 9113 10.5)
        for code, value in dict(entries).items():
            original: int | None = None
            if code == codes.HEADER_TABLE_SIZE:
                original, self.encoder.header_table_size = self.encoder.header_table_size, value
            elif code == codes.INITIAL_WINDOW_SIZE:
                original, self._peer_window = self._peer_window, value
                for stream in self._streams.values():  # RFC 9113 6.9.2
                    stream.send_window += value - original
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionFailure(Err.FLOW_CONTROL_ERROR, "a window past 2^31-1")
            elif code == codes.MAX_FRAME_SIZE:
                original, self.max_outbound_frame_size = self.max_outbound_frame_size, value
            try:
                key: Any = codes(code)
            except ValueError:  # a setting we do not know: reported as its number
                key = code
            changed[key] = h2.settings.ChangedSetting(key, original, value)
        self._frame(SETTINGS, ACK, 0)
        event = h2.events.RemoteSettingsChanged()
        event.changed_settings = changed
        events.append(event)

    def _on_rst_stream(self, sid: int, payload: bytes, events: list[Any]) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "an RST_STREAM not of 4 bytes")
        if not sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if sid in self._streams:
            self._forget(sid, RESET_BY_PEER)
            events.append(h2.events.StreamReset(stream_id=sid,
                                                error_code=U32.unpack(payload)[0],
                                                remote_reset=True))
        elif self._idle(sid):
            raise ConnectionFailure(Err.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")

    def _on_ping(self, sid: int, flags: int, payload: bytes) -> None:
        if len(payload) != 8:
            raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "a PING not of 8 bytes")
        if sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "PING on a stream")
        if not flags & ACK:
            self._frame(PING, ACK, 0, payload)

    def _on_goaway(self, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionFailure(Err.FRAME_SIZE_ERROR, "a GOAWAY shorter than 8 bytes")
        last, code = struct.unpack_from(">II", payload)
        self.state_machine.state = CLOSED
        event = h2.events.ConnectionTerminated()
        event.error_code, event.last_stream_id = code, last & 0x7FFFFFFF
        event.additional_data = bytes(payload[8:])
        events.append(event)

    def _on_priority(self, sid: int, payload: bytes, events: list[Any]) -> None:
        """Read and ignored; a bad one is a stream error on an open stream, a connection
        error on any other (we do not reset streams that never opened)."""
        if not sid:
            raise ConnectionFailure(Err.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            code, problem = Err.FRAME_SIZE_ERROR, "a PRIORITY not of 5 bytes"
        elif U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            code, problem = Err.PROTOCOL_ERROR, "a stream depending on itself"
        else:
            return
        if sid not in self._streams:
            raise ConnectionFailure(code, problem)
        self._reset(sid, code, events)

