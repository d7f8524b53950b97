"""ext_proc.h2grpc.http2: the builtin HTTP/2 layer, frame by frame.

Hostile and malformed input (RFC 9113's connection and stream errors), flow control
both ways, frames split anywhere, and the same traffic through h2 side by side: the
events the engine reads must be the same, and an h2 client must read the same
answers from both."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest

from ext_proc.h2grpc import http2
from ext_proc.h2grpc.h2state import CLOSED_STREAMS_KEPT, server_connection
from ext_proc.h2grpc.http2 import PREFACE, ServerConnection

E = h2.errors.ErrorCodes
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK_FLAG, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"),
           (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
           (b":authority", b"extproc"), (b"content-type", b"application/grpc"),
           (b"te", b"trailers")]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", (len(payload) << 8) | kind, flags, sid) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, at = [], 0
    while at < len(data):
        word, flags, sid = struct.unpack_from(">IBI", data, at)
        out.append((word & 0xFF, flags, sid & 0x7FFFFFFF, data[at + 9:at + 9 + (word >> 8)]))
        at += 9 + (word >> 8)
    return out


class Peer:
    """A client writing frames by hand, with its own HPACK encoder."""

    def __init__(self, max_streams: int = 100) -> None:
        self.conn = ServerConnection(max_streams)
        self.encoder = hpack.Encoder()
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window((16 << 20) - 65535)
        assert self.conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))
        self.conn.data_to_send()

    def block(self, headers: list[tuple[bytes, bytes]] = REQUEST) -> bytes:
        return self.encoder.encode(headers)

    def open_bytes(self, sid: int) -> bytes:
        return frame(HEADERS, END_HEADERS, sid, self.block())

    def long_block(self, sid: int) -> bytes:
        """A header list past 16 KiB decoded (a 17,000-byte literal), in two frames."""
        block = self.encoder.encode([(b"x-long", b"v" * 17000)], huffman=False)
        return (frame(HEADERS, 0, sid, block[:16000])
                + frame(CONTINUATION, END_HEADERS, sid, block[16000:]))

    def send(self, *data: bytes) -> list[Any]:
        return self.conn.receive_data(b"".join(data))

    def open(self, sid: int, end_stream: bool = False) -> list[Any]:
        return self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid,
                               self.block()))

    def out(self) -> list[tuple[int, int, int, bytes]]:
        return frames(self.conn.data_to_send())

    def connection_error(self, *data: bytes) -> int:
        """The GOAWAY's code after `data`, which must be a connection error."""
        with pytest.raises(h2.exceptions.ProtocolError):
            self.send(*data)
        goaways = [f for f in self.out() if f[0] == GOAWAY]
        assert len(goaways) == 1
        assert self.conn.receive_data(frame(PING, 0, 0, b"8" * 8)) == []  # nothing more is read
        return int(struct.unpack(">II", goaways[0][3][:8])[1])

    def resets(self) -> dict[int, int]:
        return {sid: struct.unpack(">I", payload)[0]
                for kind, _, sid, payload in self.out() if kind == RST_STREAM}

    def still_serves(self, sid: int) -> None:
        events = self.open(sid)
        assert [type(e) for e in events] == [h2.events.RequestReceived]
        assert events[0].headers == REQUEST


def kinds(events: list[Any]) -> list[type]:
    return [type(e) for e in events]


# -- connection errors ---------------------------------------------------------------

def test_a_bad_preface_or_first_frame_is_a_protocol_error() -> None:
    for start in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
                  PREFACE + frame(PING, 0, 0, b"8" * 8),
                  PREFACE + frame(SETTINGS, 1, 0)):  # an ACK first: not our SETTINGS' answer
        conn = ServerConnection(10)
        with pytest.raises(h2.exceptions.ProtocolError):
            conn.receive_data(start)
        goaway = [f for f in frames(conn.data_to_send()) if f[0] == GOAWAY]
        assert struct.unpack(">II", goaway[0][3])[1] == E.PROTOCOL_ERROR, start


def test_a_preface_and_settings_byte_by_byte_are_read() -> None:
    conn = ServerConnection(10)
    data = PREFACE + frame(SETTINGS, 0, 0)
    events = [conn.receive_data(data[i:i + 1]) for i in range(len(data))]
    assert all(e == [] for e in events[:-1])
    assert kinds(events[-1]) == [h2.events.RemoteSettingsChanged]
    assert frames(conn.data_to_send()) == [(SETTINGS, 1, 0, b"")]  # our ACK


CONNECTION_ERRORS: dict[str, tuple[Callable[[Peer], list[bytes]], int]] = {
    "a frame longer than 16 KiB": (lambda p: [frame(DATA, 0, 1, b"x" * 16385)],
                                   E.FRAME_SIZE_ERROR),
    "DATA on stream 0": (lambda p: [frame(DATA, 0, 0, b"x")], E.PROTOCOL_ERROR),
    "DATA on an idle stream": (lambda p: [frame(DATA, 0, 3, b"x")], E.PROTOCOL_ERROR),
    "padding as long as the DATA": (lambda p: [p.open_bytes(1), frame(DATA, PADDED, 1, b"\x04abc")],
                                    E.PROTOCOL_ERROR),
    "HEADERS on stream 0": (lambda p: [frame(HEADERS, END_HEADERS, 0, p.block())],
                            E.PROTOCOL_ERROR),
    "HEADERS on an even stream": (lambda p: [frame(HEADERS, END_HEADERS, 2, p.block())],
                                  E.PROTOCOL_ERROR),
    "a new stream below the highest": (lambda p: [p.open_bytes(5), p.open_bytes(3)],
                                       E.STREAM_CLOSED),
    "padding as long as the HEADERS": (lambda p: [frame(HEADERS, END_HEADERS | PADDED, 1,
                                                        b"\x09" + p.block()[:8])],
                                       E.PROTOCOL_ERROR),
    "CONTINUATION without HEADERS": (lambda p: [frame(CONTINUATION, END_HEADERS, 1, b"")],
                                     E.PROTOCOL_ERROR),
    "a PING inside a header block": (lambda p: [frame(HEADERS, 0, 1, p.block()),
                                                frame(PING, 0, 0, b"8" * 8)], E.PROTOCOL_ERROR),
    "CONTINUATION on another stream": (lambda p: [frame(HEADERS, 0, 1, p.block()),
                                                  frame(CONTINUATION, END_HEADERS, 3, b"")],
                                       E.PROTOCOL_ERROR),
    "a header block past 64 KiB": (lambda p: [frame(HEADERS, 0, 1, b"\x00" * 16000)]
                                   + [frame(CONTINUATION, 0, 1, b"\x00" * 16000)] * 4,
                                   E.ENHANCE_YOUR_CALM),
    "a bad header block": (lambda p: [frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff")],
                           E.COMPRESSION_ERROR),
    "a header list past 16 KiB": (lambda p: [p.long_block(1)], E.ENHANCE_YOUR_CALM),
    "PRIORITY on stream 0": (lambda p: [frame(PRIORITY, 0, 0, b"\0" * 5)], E.PROTOCOL_ERROR),
    "a PRIORITY not of 5 bytes, no stream": (lambda p: [frame(PRIORITY, 0, 7, b"\0" * 4)],
                                             E.FRAME_SIZE_ERROR),
    "an RST_STREAM not of 4 bytes": (lambda p: [p.open_bytes(1), frame(RST_STREAM, 0, 1, b"\0")],
                                     E.FRAME_SIZE_ERROR),
    "RST_STREAM on stream 0": (lambda p: [frame(RST_STREAM, 0, 0, b"\0" * 4)], E.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (lambda p: [frame(RST_STREAM, 0, 9, b"\0" * 4)],
                                     E.PROTOCOL_ERROR),
    "SETTINGS on a stream": (lambda p: [frame(SETTINGS, 0, 1)], E.PROTOCOL_ERROR),
    "a SETTINGS ACK with a payload": (lambda p: [frame(SETTINGS, 1, 0, b"\0" * 6)],
                                      E.FRAME_SIZE_ERROR),
    "SETTINGS not in 6-byte entries": (lambda p: [frame(SETTINGS, 0, 0, b"\0" * 5)],
                                       E.FRAME_SIZE_ERROR),
    "ENABLE_PUSH 2": (lambda p: [frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 2))],
                      E.PROTOCOL_ERROR),
    "an initial window of 2^31": (lambda p: [frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 31))],
                                  E.FLOW_CONTROL_ERROR),
    "a MAX_FRAME_SIZE below 16 KiB": (lambda p: [frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100))],
                                      E.PROTOCOL_ERROR),
    "a MAX_FRAME_SIZE of 2^24": (lambda p: [frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 1 << 24))],
                                 E.PROTOCOL_ERROR),
    "PUSH_PROMISE": (lambda p: [frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2")],
                     E.PROTOCOL_ERROR),
    "a PING of 7 bytes": (lambda p: [frame(PING, 0, 0, b"7" * 7)], E.FRAME_SIZE_ERROR),
    "PING on a stream": (lambda p: [frame(PING, 0, 1, b"8" * 8)], E.PROTOCOL_ERROR),
    "GOAWAY on a stream": (lambda p: [frame(GOAWAY, 0, 1, b"\0" * 8)], E.PROTOCOL_ERROR),
    "a GOAWAY of 7 bytes": (lambda p: [frame(GOAWAY, 0, 0, b"\0" * 7)], E.FRAME_SIZE_ERROR),
    "a WINDOW_UPDATE of 3 bytes": (lambda p: [frame(WINDOW_UPDATE, 0, 0, b"\0" * 3)],
                                   E.FRAME_SIZE_ERROR),
    "a WINDOW_UPDATE of 0 on the connection": (lambda p: [frame(WINDOW_UPDATE, 0, 0, b"\0" * 4)],
                                               E.PROTOCOL_ERROR),
    "the connection's send window past 2^31-1": (
        lambda p: [frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1))],
        E.FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE on an idle stream": (lambda p: [frame(WINDOW_UPDATE, 0, 5, b"\0\0\0\1")],
                                        E.PROTOCOL_ERROR),
    "WINDOW_UPDATE on an even stream (never ours to open)": (
        lambda p: [p.open_bytes(5), frame(WINDOW_UPDATE, 0, 2, b"\0\0\0\1")], E.PROTOCOL_ERROR),
    "RST_STREAM on an even stream": (
        lambda p: [p.open_bytes(5), frame(RST_STREAM, 0, 4, b"\0" * 4)], E.PROTOCOL_ERROR),
    "DATA on an even stream": (lambda p: [p.open_bytes(5), frame(DATA, 0, 2, b"x")],
                               E.PROTOCOL_ERROR),
    "bad padding on a stream the peer ended": (
        lambda p: [frame(HEADERS, END_HEADERS | END_STREAM, 1, p.block()),
                   frame(DATA, PADDED, 1, b"\xff")], E.PROTOCOL_ERROR),
    "a new initial window past 2^31-1 for an open stream": (
        lambda p: [p.open_bytes(1),
                   frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", (1 << 31) - 1 - 65535)),
                   frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65536))],
        E.FLOW_CONTROL_ERROR),
}


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
def test_connection_errors_send_goaway_with_their_code(case: str) -> None:
    make, code = CONNECTION_ERRORS[case]
    peer = Peer()
    assert peer.connection_error(*make(peer)) == code


def test_data_on_a_stream_closed_both_ways_is_a_connection_error() -> None:
    peer = Peer()
    peer.open(1, end_stream=True)
    peer.conn.send_headers(1, [(b":status", b"200")], end_stream=True)
    assert peer.connection_error(frame(DATA, 0, 1, b"late")) == E.STREAM_CLOSED


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    conn = ServerConnection(10)  # the connection's window left at 65,535
    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    encoder = hpack.Encoder()
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST)))
    conn.data_to_send()
    data = frame(DATA, 0, 1, b"x" * 16384) * 4 + frame(DATA, 0, 1, b"x" * 4)  # 65,540
    with pytest.raises(h2.exceptions.ProtocolError):
        conn.receive_data(data)
    goaway = [f for f in frames(conn.data_to_send()) if f[0] == GOAWAY]
    assert struct.unpack(">II", goaway[0][3])[1] == E.FLOW_CONTROL_ERROR


def test_data_beyond_a_streams_window_is_a_flow_control_error() -> None:
    peer = Peer()
    peer.open(1)
    chunk = frame(DATA, 0, 1, b"x" * 16384)
    assert len(peer.send(chunk * 64)) == 64  # 1 MiB, the window we announced, unacknowledged
    assert peer.connection_error(frame(DATA, 0, 1, b"x")) == E.FLOW_CONTROL_ERROR


# -- stream errors: the stream is reset, the connection serves on ------------------------

def test_data_after_the_peers_end_stream_resets_only_that_stream() -> None:
    peer = Peer()
    peer.open(1, end_stream=True)
    events = peer.send(frame(DATA, 0, 1, b"late"))
    assert kinds(events) == [h2.events.StreamReset]
    assert (events[0].stream_id, events[0].error_code, events[0].remote_reset) == (
        1, E.STREAM_CLOSED, False)
    assert peer.resets() == {1: E.STREAM_CLOSED}
    peer.still_serves(3)


def test_trailers_without_end_stream_reset_the_stream() -> None:
    peer = Peer()
    peer.open(1)
    events = peer.send(frame(HEADERS, END_HEADERS, 1, peer.block([(b"grpc-status", b"0")])))
    assert kinds(events) == [h2.events.StreamReset]
    assert peer.resets() == {1: E.PROTOCOL_ERROR}
    peer.still_serves(3)


def test_trailers_with_end_stream_end_the_stream() -> None:
    peer = Peer()
    peer.open(1)
    events = peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1,
                             peer.block([(b"x-trailer", b"1")])))
    assert [(type(e), e.stream_id) for e in events] == [(h2.events.StreamEnded, 1)]


def test_a_stream_depending_on_itself_is_refused_and_its_block_still_decoded() -> None:
    peer = Peer()
    block = peer.encoder.encode([*REQUEST, (b"x-new", b"indexed")])  # adds to the table
    events = peer.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1,
                             struct.pack(">IB", 1, 16) + block))
    assert [(type(e), e.stream_id, e.remote_reset) for e in events] == [
        (h2.events.StreamReset, 1, False)]  # never opened: no request, the error counted
    assert peer.resets() == {1: E.PROTOCOL_ERROR}
    events = peer.send(frame(HEADERS, END_HEADERS, 3,
                             peer.encoder.encode([*REQUEST, (b"x-new", b"indexed")])))
    assert events[0].headers == [*REQUEST, (b"x-new", b"indexed")]  # the table followed


def test_bad_window_updates_and_priorities_on_an_open_stream_reset_it() -> None:
    for payload, kind, code in (
            (b"\0\0\0\0", WINDOW_UPDATE, E.PROTOCOL_ERROR),
            (struct.pack(">I", (1 << 31) - 1), WINDOW_UPDATE, E.FLOW_CONTROL_ERROR),
            (b"\0" * 4, PRIORITY, E.FRAME_SIZE_ERROR),
            (struct.pack(">IB", 1, 0), PRIORITY, E.PROTOCOL_ERROR)):
        peer = Peer()
        peer.open(1)
        events = peer.send(frame(kind, 0, 1, payload))
        assert kinds(events) == [h2.events.StreamReset], (kind, payload)
        assert peer.resets() == {1: code}
        peer.still_serves(3)


def test_streams_beyond_the_limit_are_refused_and_the_table_follows() -> None:
    peer = Peer(max_streams=2)
    peer.open(1)
    peer.open(3)
    extra = [*REQUEST, (b"x-refused", b"but decoded")]
    assert kinds(peer.send(frame(HEADERS, END_HEADERS, 5, peer.block(extra)))) == [
        h2.events.StreamReset]
    assert peer.resets() == {5: E.REFUSED_STREAM}
    peer.send(frame(RST_STREAM, 0, 1, b"\0\0\0\x08"))  # a slot frees
    events = peer.send(frame(HEADERS, END_HEADERS, 7, peer.block(extra)))
    assert events[0].headers == extra
    assert peer.send(frame(DATA, END_STREAM, 5, b"sent before our reset arrived")) == []


# -- what is ignored, and what is answered -----------------------------------------------

def test_frames_on_a_stream_we_reset_are_ignored_and_their_window_comes_back() -> None:
    conn = ServerConnection(10)  # a connection window of 65,535 only
    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    encoder = hpack.Encoder()
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST)))
    conn.reset_stream(1, E.CANCEL)
    conn.data_to_send()
    for _ in range(3):  # 3 x 49,152 bytes: only within the window if each comes back
        assert conn.receive_data(frame(DATA, 0, 1, b"x" * 16384) * 3
                                 + frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\1")
                                 + frame(PRIORITY, 0, 1, b"\0" * 5)) == []
        out = frames(conn.data_to_send())
        assert out and all(f[0] == WINDOW_UPDATE and f[2] == 0 for f in out)


def test_unknown_frames_are_ignored_and_closed_streams_may_still_see_updates() -> None:
    peer = Peer()
    peer.open(1, end_stream=True)
    peer.conn.send_headers(1, [(b":status", b"200")], end_stream=True)
    assert peer.send(frame(0x42, 0xFF, 1, b"whatever"), frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\1"),
                     frame(RST_STREAM, 0, 1, b"\0\0\0\0")) == []
    peer.still_serves(3)


def test_ping_is_answered_with_its_payload() -> None:
    peer = Peer()
    assert peer.send(frame(PING, 0, 0, b"12345678"), frame(PING, ACK_FLAG, 0, b"ignored!")) == []
    assert peer.out() == [(PING, ACK_FLAG, 0, b"12345678")]



def test_goaway_from_the_peer_lets_open_streams_finish() -> None:
    peer = Peer()
    peer.open(1)
    events = peer.send(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0) + b"bye"))
    assert kinds(events) == [h2.events.ConnectionTerminated]
    assert (events[0].error_code, events[0].last_stream_id, events[0].additional_data) == (
        0, 1, b"bye")
    assert peer.conn.state_machine.state is h2.connection.ConnectionState.CLOSED
    assert kinds(peer.send(frame(DATA, END_STREAM, 1, b"rest"))) == [
        h2.events.DataReceived, h2.events.StreamEnded]
    peer.conn.send_headers(1, [(b":status", b"200")], end_stream=True)


def test_a_table_size_set_twice_still_sends_its_update() -> None:
    peer = Peer()
    peer.open(1)
    settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 256))
    peer.send(settings, settings)  # hpack alone forgets the update it owes (h2state)
    peer.out()
    peer.conn.send_headers(1, [(b":status", b"200")])
    block = peer.out()[0][3]
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 256  # as a peer that saw its SETTINGS acknowledged
    assert decoder.decode(block, raw=True) == [(b":status", b"200")]
    assert block[:1] == bytes([0x20 | 31]) and decoder.header_table_size == 256


def test_a_setting_repeated_in_a_frame_is_applied_once_and_the_last_holds() -> None:
    peer = Peer()
    for sid in range(1, 200, 2):
        peer.open(sid)
    entries = b"".join(struct.pack(">HI", 4, 70000 + i) for i in range(2730))  # 16,380 bytes
    events = peer.send(frame(SETTINGS, 0, 0, entries))
    changed = events[0].changed_settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE]
    assert (changed.original_value, changed.new_value) == (65535, 70000 + 2729)
    assert peer.conn.local_flow_control_window(1) == 65535  # the connection's: not raised
    peer.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
    assert all(peer.conn.local_flow_control_window(sid) == 70000 + 2729
               for sid in range(1, 200, 2))
    bad = struct.pack(">HI", 2, 2) + struct.pack(">HI", 2, 0)  # invalid, then valid again
    assert peer.connection_error(frame(SETTINGS, 0, 0, bad)) == E.PROTOCOL_ERROR


def test_table_sizes_owed_stay_bounded_and_the_table_capped() -> None:
    peer = Peer()
    for size in range(3000):  # SETTINGS after SETTINGS, no answer sent in between
        peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, size % 5000)))
    assert len(peer.conn.encoder.table_size_changes) <= 2
    peer.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 0xFFFFFFFF)))  # "4 GiB"
    assert peer.conn.encoder.header_table_size == 4096
    for i in range(200):  # distinct answers: each indexed, the oldest evicted
        peer.conn.encoder.encode([(b"grpc-message", b"Method not found: /x/%d" % i)])
    entries = peer.conn.encoder.header_table.dynamic_entries
    assert sum(32 + len(name) + len(value) for name, value in entries) <= 4096  # evicted


def test_settings_are_applied_acknowledged_and_reported() -> None:
    peer = Peer()
    events = peer.send(frame(SETTINGS, 0, 0, struct.pack(">HIHIHIHI", 1, 0, 4, 100, 5, 32768,
                                                         0x99, 7)))
    assert peer.out() == [(SETTINGS, 1, 0, b"")]
    changed = events[0].changed_settings
    codes = h2.settings.SettingCodes
    assert {k: v.new_value for k, v in changed.items()} == {
        codes.HEADER_TABLE_SIZE: 0, codes.INITIAL_WINDOW_SIZE: 100, codes.MAX_FRAME_SIZE: 32768,
        0x99: 7}
    assert changed[codes.INITIAL_WINDOW_SIZE].original_value == 65535
    assert peer.conn.max_outbound_frame_size == 32768
    peer.open(1)
    assert peer.conn.local_flow_control_window(1) == 100
    peer.conn.send_headers(1, [(b":status", b"200")])
    out = peer.out()  # a table size update (to 0) comes first, and nothing is indexed
    assert out[0][0] == HEADERS and out[0][3][:1] == b"\x20"


# -- sending ---------------------------------------------------------------------------------

def test_sending_respects_both_windows_and_the_frame_size() -> None:
    peer = Peer()
    peer.open(1)
    peer.conn.send_headers(1, [(b":status", b"200")])
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        peer.conn.send_data(1, b"x" * 16385)
    for _ in range(3):
        peer.conn.send_data(1, b"x" * 16384)
    assert peer.conn.local_flow_control_window(1) == 65535 - 3 * 16384
    with pytest.raises(h2.exceptions.FlowControlError):
        peer.conn.send_data(1, b"x" * 16384)
    events = peer.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100_000)))
    assert [(type(e), e.stream_id, e.delta) for e in events] == [(h2.events.WindowUpdated, 1,
                                                                  100_000)]
    assert peer.conn.local_flow_control_window(1) == 65535 - 3 * 16384  # the connection's
    peer.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 100_000)))
    assert peer.conn.local_flow_control_window(1) == 65535 - 3 * 16384 + 100_000


def test_a_long_header_block_goes_out_in_continuations() -> None:
    peer = Peer()
    peer.open(1)
    peer.conn.send_headers(1, [(b":status", b"200"), (b"x-long", b"v" * 40000)])
    out = peer.out()
    assert [(f[0], f[1]) for f in out] == [(HEADERS, 0), (CONTINUATION, 0),
                                           (CONTINUATION, END_HEADERS)]
    decoded = hpack.Decoder(max_header_list_size=1 << 20).decode(b"".join(f[3] for f in out),
                                                                  raw=True)
    assert decoded == [(b":status", b"200"), (b"x-long", b"v" * 40000)]


def test_a_gone_stream_cannot_be_sent_on() -> None:
    peer = Peer()
    peer.open(1)
    peer.send(frame(RST_STREAM, 0, 1, b"\0\0\0\x08"))
    for send in (lambda: peer.conn.send_headers(1, [(b":status", b"200")]),
                 lambda: peer.conn.send_data(1, b"x"),
                 lambda: peer.conn.local_flow_control_window(1),
                 lambda: peer.conn.reset_stream(1)):
        with pytest.raises(h2.exceptions.StreamClosedError):
            send()


def test_received_data_comes_back_in_window_updates_once_half_is_owed() -> None:
    peer = Peer()
    peer.open(1)
    for _ in range(31):
        for event in peer.send(frame(DATA, 0, 1, b"x" * 16384)):
            peer.conn.acknowledge_received_data(event.flow_controlled_length, 1)
    assert peer.out() == []  # 496 KiB owed: under half of the stream's 1 MiB
    for event in peer.send(frame(DATA, PADDED, 1, b"\x09" + b"x" * 16374 + b"\0" * 9)):
        assert event.data == b"x" * 16374 and event.flow_controlled_length == 16384
        peer.conn.acknowledge_received_data(event.flow_controlled_length, 1)
    assert peer.out() == [(WINDOW_UPDATE, 0, 1, struct.pack(">I", 32 * 16384))]


def test_closed_streams_remembered_are_bounded() -> None:
    peer = Peer()
    for sid in range(1, 2 * (CLOSED_STREAMS_KEPT + 10), 2):
        peer.open(sid, end_stream=True)
        peer.conn.send_headers(sid, [(b":status", b"200")], end_stream=True)
    assert len(peer.conn._closed_streams) == CLOSED_STREAMS_KEPT
    assert min(peer.conn._closed_streams) == 21  # the oldest ten (1-19) went first
    assert not peer.conn._streams


# -- the same traffic through h2 and through the builtin layer ---------------------------

_ENGINE_EVENTS = (h2.events.RequestReceived, h2.events.DataReceived, h2.events.StreamEnded,
                  h2.events.StreamReset, h2.events.WindowUpdated,
                  h2.events.ConnectionTerminated)


def _seen(event: Any) -> tuple[Any, ...]:
    """What the engine reads of an event."""
    if isinstance(event, h2.events.RequestReceived):
        return ("request", event.stream_id, [tuple(h) for h in event.headers])
    if isinstance(event, h2.events.DataReceived):
        return ("data", event.stream_id, bytes(event.data), event.flow_controlled_length)
    if isinstance(event, h2.events.StreamReset):
        return ("reset", event.stream_id, int(event.error_code))
    if isinstance(event, h2.events.WindowUpdated):
        return ("window", event.stream_id, event.delta)
    if isinstance(event, h2.events.ConnectionTerminated):
        return ("goaway", int(event.error_code), event.last_stream_id)
    return ("ended", event.stream_id)


def _answer_seen(event: Any) -> tuple[Any, ...] | None:
    """What the client reads of our answers."""
    for kind in (h2.events.ResponseReceived, h2.events.TrailersReceived):
        if isinstance(event, kind):
            return (kind.__name__, event.stream_id, [tuple(h) for h in event.headers])
    if isinstance(event, h2.events.DataReceived):
        return ("data", event.stream_id, bytes(event.data))
    if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
        return (type(event).__name__, event.stream_id)
    return None


class _Side:
    """A client and a server layer, driven by the same script."""

    def __init__(self, layer: Any) -> None:
        self.server = layer
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.server.increment_flow_control_window((16 << 20) - 65535)
        self.seen: list[tuple[Any, ...]] = []
        self.answers: list[tuple[Any, ...]] = []
        self.open: set[int] = set()
        self.ended: set[int] = set()
        self.answered: set[int] = set()

    def to_server(self, rng: random.Random) -> bytes:
        data = self.client.data_to_send()
        at = 0
        while at < len(data):  # in random pieces: frames split anywhere
            step = rng.choice((1, 7, 9, 100, 5000, len(data)))
            for event in self.server.receive_data(data[at:at + step]):
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    self.server.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
                if isinstance(event, h2.events.RequestReceived):
                    self.open.add(event.stream_id)
                if isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                if isinstance(event, h2.events.StreamReset):
                    self.open.discard(event.stream_id)
                if isinstance(event, _ENGINE_EVENTS):
                    self.seen.append(_seen(event))
            at += step
        return data

    def to_client(self) -> None:
        for event in self.client.receive_data(self.server.data_to_send()):
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.client.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
            seen = _answer_seen(event)
            if seen is not None:
                self.answers.append(seen)


def _script(seed: int, sides: list[_Side]) -> None:
    rng = random.Random(seed)
    sids: list[int] = []
    for _ in range(60):
        step = rng.random()
        if step < 0.3 or not sids:
            sid = sides[0].client.get_next_available_stream_id()
            sids.append(sid)
            headers = REQUEST + [(b"x-n", str(rng.randrange(40)).encode())] * rng.randrange(3)
            end = rng.random() < 0.1
            for side in sides:
                side.client.send_headers(sid, headers, end_stream=end)
        elif step < 0.6:
            sid = rng.choice(sids)
            size = rng.choice((0, 5, 300, 16384, 40000))
            end = rng.random() < 0.5
            for side in sides:
                stream = side.client.streams.get(sid)
                if stream is None or not stream.open or stream.state_machine.state in (
                        h2.stream.StreamState.HALF_CLOSED_LOCAL,):
                    continue
                if size <= side.client.local_flow_control_window(sid):
                    for at in range(0, size, 16384):
                        side.client.send_data(sid, b"d" * min(16384, size - at))
                    if end:
                        side.client.end_stream(sid)
        elif step < 0.7:
            sid = rng.choice(sids)
            for side in sides:
                stream = side.client.streams.get(sid)
                if stream is not None and stream.open:
                    side.client.reset_stream(sid, E.CANCEL)
        elif step < 0.75:
            for side in sides:
                side.client.ping(b"p1ngp0ng")
        elif step < 0.8:
            size = rng.choice((0, 256, 4096))
            for side in sides:
                side.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: size})
        else:  # the server answers a stream that ended
            for side in sides:
                ready = sorted((side.open & side.ended) - side.answered)
                if not ready:
                    continue
                sid = ready[0]
                side.answered.add(sid)
                try:
                    side.server.send_headers(sid, [(b":status", b"200"),
                                                   (b"content-type", b"application/grpc")])
                    side.server.send_data(sid, b"\0\0\0\0\3abc")
                    side.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                except h2.exceptions.StreamClosedError:
                    pass
        written = [side.to_server(random.Random(rng.random())) for side in sides]
        assert written[0] == written[1], "the two clients diverged"
        for side in sides:
            side.to_client()
        for side in sides:
            side.to_server(random.Random(seed))  # the clients' WINDOW_UPDATEs and ACKs


@pytest.mark.parametrize("seed", range(40))
def test_the_same_traffic_reads_the_same_through_h2_and_the_builtin_layer(seed: int) -> None:
    sides = [_Side(server_connection(100)), _Side(ServerConnection(100))]
    for side in sides:
        side.to_server(random.Random(seed))  # preface and SETTINGS
        side.to_client()
        side.to_server(random.Random(seed))
    _script(seed, sides)
    h2_side, ours = sides
    assert ours.seen == h2_side.seen
    assert ours.answers == h2_side.answers
    assert any(s[0] == "request" for s in ours.seen)


def test_the_module_bounds_are_what_the_docs_say() -> None:
    assert http2.MAX_HEADER_LIST == 16 * 1024 and http2.MAX_HEADER_BLOCK == 64 * 1024
