"""The HTTP/2 layer's cost per ext_proc stream, alone: ``python -m bench.h2alone [ROUNDS]``.

No gRPC, no Envoy, none of our tracing: one server connection is fed the frames of
ext_proc streams (32 at a time, as Envoy's worker connection carries them under
load): HEADERS, a DATA frame with one request message, and an empty END_STREAM DATA
frame; it answers each with HEADERS, one DATA frame and trailers. CPU per stream,
receiving and sending, side by side in one run (the layers alternate per round):

- ``h2``: the h2 library's connection as the engine had it until 0.2.0
  (``ext_proc.h2grpc.h2state.server_connection``, ``server.http2_layer: h2``);
- ``h2, hpack's coders``: the same without the remembered header blocks;
- ``builtin``: the engine's own layer (``ext_proc.h2grpc.http2``, the default);
- ``frames only``: the least any HTTP/2 layer must do for these frames (frame
  headers parsed and built with ``struct``, the same HPACK coders as ``h2``,
  flow-control windows counted, a WINDOW_UPDATE when half a window is used, stream
  ids checked). It is not a server: no CONTINUATION, PRIORITY or padding, no
  errors. It bounds what any HTTP/2 layer could save: the rest is unavoidable.

`check()` proves they all see the same requests, and that an h2 client reads the
same responses from each. bench/README.md ("where a recorded request's CPU goes")
puts the figures beside the sidecar's under load.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import hpack

from ext_proc.h2grpc.h2state import RepeatingBlocks, RepeatingHeaders, server_connection
from ext_proc.h2grpc.http2 import ServerConnection

STREAMS_AT_ONCE: Final = 32
_PATH: Final = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# what Envoy 1.40 opens an ext_proc stream with (its order; x-forwarded-for varies)
REQUEST_HEADERS: Final = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", _PATH),
                          (b":authority", b"extproc_otel"), (b"content-type", b"application/grpc"),
                          (b"te", b"trailers"), (b"x-envoy-internal", b"true"),
                          (b"x-forwarded-for", b"192.0.2.2")]
ANSWER_HEADERS: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK_TRAILERS: Final = [(b"grpc-status", b"0")]
REQUEST_MESSAGE: Final = b"\0" + (400).to_bytes(4, "big") + b"q" * 400  # ~ request_headers
ANSWER_MESSAGE: Final = b"\0" + (150).to_bytes(4, "big") + b"a" * 150  # ~ a lean answer

# ("request", sid, headers) | ("data", sid, bytes) | ("end", sid, None)
Event = tuple[str, int, Any]


class FramesOnly:
    """The frames of these streams, read and written with nothing else (see above)."""

    _HEADER: Final = struct.Struct(">IBI")  # 24-bit length packed with the type, flags, id
    _WINDOW: Final = 1 << 20  # per stream, as the sidecar announces
    _CONNECTION_WINDOW: Final = 1 << 24

    def __init__(self) -> None:
        self.decoder = RepeatingBlocks(16 * 1024)
        self.encoder = RepeatingHeaders()
        self.out = bytearray()
        self._buffer = b""
        self._highest = 0
        self._streams: dict[int, list[int]] = {}  # sid -> [receive window, send window]
        self._receive_window = self._CONNECTION_WINDOW
        self._send_window = 65535
        self._peer_stream_window = 65535

    def start(self) -> None:
        self._frame(4, 0, 0, struct.pack(">HIHI", 3, 1 << 20, 4, self._WINDOW))  # SETTINGS
        self._frame(8, 0, 0, struct.pack(">I", self._CONNECTION_WINDOW - 65535))

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        self.out += self._HEADER.pack((len(payload) << 8) | kind, flags, sid)
        self.out += payload

    def data_to_send(self) -> bytes:
        out, self.out = bytes(self.out), bytearray()
        return out

    def receive(self, data: bytes) -> list[Event]:
        buffer, at = self._buffer + data, 0
        events: list[Event] = []
        if not self._highest and buffer.startswith(b"PRI * HTTP/2.0"):
            at = 24
        unpack = self._HEADER.unpack_from
        while len(buffer) - at >= 9:
            word, flags, sid = unpack(buffer, at)
            length, kind = word >> 8, word & 0xFF
            end = at + 9 + length
            if end > len(buffer):
                break
            payload = buffer[at + 9:end]
            at = end
            sid &= 0x7FFFFFFF
            if kind == 0:  # DATA
                stream = self._streams[sid]
                stream[0] -= length
                self._receive_window -= length
                if length:
                    events.append(("data", sid, payload))
                if stream[0] < self._WINDOW // 2:
                    self._frame(8, 0, sid, struct.pack(">I", self._WINDOW - stream[0]))
                    stream[0] = self._WINDOW
                if self._receive_window < self._CONNECTION_WINDOW // 2:
                    self._frame(8, 0, 0,
                                struct.pack(">I", self._CONNECTION_WINDOW - self._receive_window))
                    self._receive_window = self._CONNECTION_WINDOW
                if flags & 1:
                    events.append(("end", sid, None))
            elif kind == 1:  # HEADERS: END_HEADERS set, no padding or priority here
                if sid <= self._highest or not sid & 1:
                    raise ValueError(f"stream id {sid} after {self._highest}")
                self._highest = sid
                self._streams[sid] = [self._WINDOW, self._peer_stream_window]
                events.append(("request", sid, self.decoder.decode(payload, raw=True)))
            elif kind == 8:  # WINDOW_UPDATE
                increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if sid == 0:
                    self._send_window += increment
                elif sid in self._streams:
                    self._streams[sid][1] += increment
            elif kind == 4 and not flags & 1:  # SETTINGS, acknowledged
                for i in range(0, length, 6):
                    code, value = struct.unpack_from(">HI", payload, i)
                    if code == 4:
                        self._peer_stream_window = value
                self._frame(4, 1, 0, b"")
        self._buffer = buffer[at:]
        return events

    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None:
        self._frame(1, 4 | end_stream, sid, self.encoder.encode(headers))
        if end_stream:
            del self._streams[sid]

    def send_data(self, sid: int, data: bytes) -> None:
        stream = self._streams[sid]
        if len(data) > min(stream[1], self._send_window):
            raise ValueError("no flow-control window (not a server: it cannot wait)")
        stream[1] -= len(data)
        self._send_window -= len(data)
        self._frame(0, 0, sid, data)


class H2Layer:
    """A server connection (h2's, or the builtin one with `builtin`), driven as
    ext_proc.h2grpc drives it."""

    def __init__(self, plain_hpack: bool = False, builtin: bool = False) -> None:
        self.connection: Any = ServerConnection(1000) if builtin else server_connection(1000)
        if plain_hpack:
            self.connection.decoder = hpack.Decoder(self.connection.decoder.max_header_list_size)
            self.connection.encoder = hpack.Encoder()

    def start(self) -> None:
        self.connection.initiate_connection()
        self.connection.increment_flow_control_window((1 << 24) - 65535)

    def data_to_send(self) -> bytes:
        return self.connection.data_to_send()

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        connection = self.connection
        received: list[Any] = connection.receive_data(data)
        for event in received:
            kind = type(event)
            if kind is h2.events.RequestReceived:
                events.append(("request", event.stream_id, event.headers))
            elif kind is h2.events.DataReceived:
                if event.flow_controlled_length:
                    connection.acknowledge_received_data(event.flow_controlled_length,
                                                         event.stream_id)
                if event.data:
                    events.append(("data", event.stream_id, event.data))
            elif kind is h2.events.StreamEnded:
                events.append(("end", event.stream_id, None))
        return events

    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None:
        self.connection.send_headers(sid, headers, end_stream=end_stream)

    def send_data(self, sid: int, data: bytes) -> None:
        self.connection.send_data(sid, data)


LAYERS: Final[dict[str, Callable[[], Any]]] = {
    "h2": H2Layer,
    "h2, hpack's coders": lambda: H2Layer(plain_hpack=True),
    "builtin": lambda: H2Layer(builtin=True),
    "frames only": FramesOnly,
}


class Peer:
    """Envoy's side: an h2 client writing the streams' frames, reading the answers."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()

    def streams(self, count: int) -> tuple[list[int], list[bytes], list[bytes]]:
        """`count` new streams: their ids, each one's opening bytes and its END_STREAM."""
        client, sids, opening, ends = self.client, [], [], []
        for _ in range(count):
            sid = client.get_next_available_stream_id()
            sids.append(sid)
            client.send_headers(sid, REQUEST_HEADERS)
            client.send_data(sid, REQUEST_MESSAGE)
            opening.append(client.data_to_send())
            client.end_stream(sid)
            ends.append(client.data_to_send())
        return sids, opening, ends

    def read(self, data: bytes) -> list[Any]:
        events = self.client.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.client.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
        return events


def _connected(layer: Any) -> Peer:
    peer = Peer()
    layer.start()
    layer.receive(peer.client.data_to_send())
    peer.read(layer.data_to_send())
    layer.receive(peer.client.data_to_send())
    return peer


def _exchange(layer: Any, peer: Peer) -> tuple[float, float, list[Event]]:
    """One burst of streams through `layer`: CPU seconds receiving and sending, and
    what it received."""
    sids, opening, ends = peer.streams(STREAMS_AT_ONCE)
    seen: list[Event] = []
    clock = time.process_time
    started = clock()
    for data in opening:
        seen += layer.receive(data)
    for data in ends:
        seen += layer.receive(data)
    received = clock()
    for sid in sids:
        layer.send_headers(sid, ANSWER_HEADERS)
        layer.send_data(sid, ANSWER_MESSAGE)
        layer.send_headers(sid, OK_TRAILERS, end_stream=True)
    out = layer.data_to_send()
    sent = clock()
    peer.read(out)
    layer.receive(peer.client.data_to_send())  # the peer's WINDOW_UPDATEs
    return received - started, sent - received, seen


def _answers(events: list[Any]) -> list[tuple[str, int, Any]]:
    """What an h2 client saw of the answers, without h2's object identities."""
    seen: list[tuple[str, int, Any]] = []
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            seen.append(("headers", event.stream_id, list(event.headers)))
        elif isinstance(event, h2.events.DataReceived):
            seen.append(("data", event.stream_id, bytes(event.data)))
        elif isinstance(event, h2.events.TrailersReceived):
            seen.append(("trailers", event.stream_id, list(event.headers)))
        elif isinstance(event, h2.events.StreamEnded):
            seen.append(("end", event.stream_id, None))
    return seen


def check(bursts: int = 4) -> None:
    """Every layer receives the same requests, and an h2 client reads the same answers
    from each (so that 'frames only' measures real work). Raises AssertionError."""
    received: dict[str, list[Event]] = {}
    answered: dict[str, list[tuple[str, int, Any]]] = {}
    for name, make in LAYERS.items():
        layer = make()
        peer = _connected(layer)
        received[name], answered[name] = [], []
        for _ in range(bursts):
            sids, opening, ends = peer.streams(STREAMS_AT_ONCE)
            for data in (*opening, *ends):
                received[name] += [(kind, sid, bytes(x) if kind == "data" else x)
                                   for kind, sid, x in layer.receive(data)]
            for sid in sids:
                layer.send_headers(sid, ANSWER_HEADERS)
                layer.send_data(sid, ANSWER_MESSAGE)
                layer.send_headers(sid, OK_TRAILERS, end_stream=True)
            answered[name] += _answers(peer.read(layer.data_to_send()))
            layer.receive(peer.client.data_to_send())
    first = next(iter(LAYERS))
    expected_requests = bursts * STREAMS_AT_ONCE
    assert sum(kind == "request" for kind, _, _ in received[first]) == expected_requests
    assert sum(kind == "end" for kind, _, _ in answered[first]) == expected_requests
    for name in LAYERS:
        assert received[name] == received[first], f"{name} received other requests"
        assert answered[name] == answered[first], f"{name}'s answers read otherwise"


def measure(rounds: int, bursts: int = 100) -> dict[str, list[tuple[float, float]]]:
    """Per layer, per round: CPU µs per stream receiving and sending. The layers take
    turns each round, in a rotating order, each on a connection of its own."""
    layers = {name: make() for name, make in LAYERS.items()}
    peers = {name: _connected(layer) for name, layer in layers.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYERS}
    names = list(LAYERS)
    streams = bursts * STREAMS_AT_ONCE
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            receiving = sending = 0.0
            for _ in range(bursts):
                t_in, t_out, _seen = _exchange(layers[name], peers[name])
                receiving += t_in
                sending += t_out
            results[name].append((receiving / streams * 1e6, sending / streams * 1e6))
    return results


def report(results: dict[str, list[tuple[float, float]]]) -> str:
    """Medians over the rounds (the total's min-max beside it) and the ratio to h2."""
    reference = statistics.median(sum(r) for r in results["h2"])
    lines = ["| HTTP/2 layer | CPU µs per stream: total (min-max of rounds) | receiving "
             "| sending | vs h2 |", "|---|---:|---:|---:|---:|"]
    for name, rounds in results.items():
        totals = [sum(r) for r in rounds]
        median = statistics.median(totals)
        lines.append(f"| {name} | {median:.1f} ({min(totals):.1f}-{max(totals):.1f}) "
                     f"| {statistics.median(r[0] for r in rounds):.1f} "
                     f"| {statistics.median(r[1] for r in rounds):.1f} "
                     f"| {median / reference:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    rounds = int(next((a for a in argv if a.isdigit()), "9"))
    check()
    print(f"{STREAMS_AT_ONCE} streams at a time; per stream: HEADERS, DATA and an empty "
          f"END_STREAM DATA in, HEADERS, DATA and trailers out; {rounds} rounds")
    print(report(measure(rounds)))


if __name__ == "__main__":
    main(sys.argv[1:])
