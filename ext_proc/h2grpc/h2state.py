"""The h2 library's connection state (`server.http2_layer: h2`), as the server side of
the sidecar needs it, and the HPACK coders both HTTP/2 layers use:
lenient header checks, GOAWAY that lets open streams finish, a bounded memory of
closed streams, header blocks that repeat decoded once, and the SETTINGS it announces."""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection
import h2.settings
import hpack

_CONFIG: Final = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # No per-header checks on the way out: our few headers are constants. None on the
    # way in either: h2 would answer a header value with surrounding spaces (which
    # grpc accepts) with a connection error, ending every stream of that Envoy
    # worker; only :path is read here, and the servicers parse what they use.
    validate_outbound_headers=False, normalize_outbound_headers=False,
    validate_inbound_headers=False, normalize_inbound_headers=False)
STREAM_WINDOW: Final = 1 << 20  # per-stream receive window we announce
MAX_HEADER_LIST: Final = 16 * 1024  # decoded, announced in SETTINGS_MAX_HEADER_LIST_SIZE


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


# Closed streams each connection remembers, to tell a late frame on a stream it reset
# (answered RST_STREAM) from a protocol error (connection error). h2 keeps 65,536: an
# OrderedDict of ~150 bytes an entry, ~10 MB per connection once that many streams
# have passed, which was the sidecar's whole memory "warm-up" (#21). 8,192 is seconds
# of history at any rate one connection serves here.
CLOSED_STREAMS_KEPT: Final = 8192


class _H2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


# Header blocks each connection remembers (received decoded, sent encoded), and the
# largest one remembered: a block (encoded) of at most 1 KiB and 32 headers, so that a
# peer can make a connection hold at most ~64 x 2 KiB. The blocks Envoy and our answers
# repeat are a few dozen bytes.
KEPT_HEADER_BLOCKS: Final = 64
# The largest HPACK table we encode with, whatever the peer allows (its default, 4096)
ENCODER_TABLE_MAX: Final = 4096
_LONGEST_KEPT: Final = 1024  # bytes
_MOST_HEADERS_KEPT: Final = 32


def _mark(table: Any) -> tuple[Any, ...]:
    """What tells whether an HPACK table changed: every insertion puts a new entry
    first, and every eviction comes with an insertion or a resize."""
    entries = table.dynamic_entries
    return len(entries), entries[0] if entries else None, table.maxsize


def _same(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    """`before` and `after` (marks, and what follows them) are equal, the newest
    entry being the same object (an entry added again is equal, not the same)."""
    return after[1] is before[1] and after == before


def _remember(known: dict[Any, Any], key: Any, value: Any) -> None:
    """`known[key] = value`, forgetting everything first at KEPT_HEADER_BLOCKS."""
    if len(known) >= KEPT_HEADER_BLOCKS:
        known.clear()
    known[key] = value


class RepeatingBlocks(hpack.Decoder):
    """hpack's decoder, which decodes a header block it has seen once only while the
    dynamic table stays as it was.

    What a block decodes to depends only on the block, the dynamic table and the two
    limits. A block that neither adds to the table nor resizes it decodes the same
    way while the table and the limits stay as they were (each remembered block
    keeps the table's mark and the limits it was decoded with), and every change of
    the table forgets every block. Envoy opens each ext_proc stream with the same
    block (the same headers, `:path` a literal it never indexes): under load,
    decoding it was ~8 % of the sidecar's busy time (bench/README.md)."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self._known: dict[bytes, tuple[list[Any], tuple[Any, ...]]] = {}
        self.repeats = 0  # blocks answered from memory

    def kept(self) -> int:
        return len(self._known)

    def _state(self) -> tuple[Any, ...]:
        return (*_mark(self.header_table), self.max_header_list_size,
                self.max_allowed_table_size)

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        known = self._known.get(data) if raw else None
        if known is not None and _same(known[1], self._state()):
            self.repeats += 1
            return list(known[0])
        before, unchanged = self._state(), False
        try:
            headers: list[Any] = list(super().decode(data, raw))
        finally:  # a block that failed may have changed the table as well
            unchanged = _same(before, self._state())
            if not unchanged:
                self._known.clear()
        if (unchanged and raw and len(data) <= _LONGEST_KEPT
                and len(headers) <= _MOST_HEADERS_KEPT):
            _remember(self._known, bytes(data), (headers, before))
            return list(headers)
        return headers


class RepeatingHeaders(hpack.Encoder):
    """hpack's encoder, which encodes a header list it has sent once only while the
    dynamic table stays as it was (and no table size update is due): the answer
    headers and OK trailers of every stream are the same lists, whose encoding was
    ~4 % of the sidecar's busy time. Only short lists of plain (name, value) tuples
    of bytes are remembered: a `NeverIndexedHeaderTuple` compares equal to a plain
    tuple but must not be encoded as one, and True equals 1 but is not sent as 1."""

    def __init__(self) -> None:
        super().__init__()
        self._known: dict[tuple[bool, tuple[Any, ...]], tuple[bytes, tuple[Any, ...]]] = {}
        self.repeats = 0  # lists answered from memory

    def kept(self) -> int:
        return len(self._known)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table, key = self.header_table, None
        if self.table_size_changes:
            self._settle_size_changes()
        if (type(headers) is list and len(headers) <= _MOST_HEADERS_KEPT
                and all(type(h) is tuple and len(h) == 2 and type(h[0]) is bytes
                        and type(h[1]) is bytes for h in headers)):
            key = (huffman, tuple(headers))
            known = self._known.get(key)
            if known is not None and not table.resized and _same(known[1], _mark(table)):
                self.repeats += 1
                return known[0]
        resized, before = table.resized, _mark(table)
        encoded = super().encode(headers, huffman)
        if resized or not _same(before, _mark(table)):
            self._known.clear()
        elif key is not None and len(encoded) <= _LONGEST_KEPT:
            _remember(self._known, key, (encoded, before))
        return encoded

    @property
    def header_table_size(self) -> int:
        return int(self.header_table.maxsize)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE, capped at ENCODER_TABLE_MAX (RFC 7541
        4.2 lets an encoder use less than the peer allows: a peer allowing 4 GiB made
        every answer's headers stay in the table, 12 MB after 4,000 UNIMPLEMENTED
        replies); the size updates owed stay at most two, however many SETTINGS come
        before the next answer."""
        hpack.Encoder.header_table_size.fset(self, min(value, ENCODER_TABLE_MAX))  # type: ignore[attr-defined]
        if len(self.table_size_changes) > 2:
            self._settle_size_changes()

    def _settle_size_changes(self) -> None:
        """The table size updates this block owes the peer (RFC 7541 4.2): the smallest
        size set since the last block, then the size now if larger. hpack would send
        every size set, in order: a peer whose limit is already the last one
        (SETTINGS 256 then 0, both acknowledged) refuses the 256 and ends the
        connection. And setting the size it had again makes hpack forget an update
        still due (SETTINGS 256 twice): the next block would carry none."""
        smallest, size = min(self.table_size_changes), self.header_table.maxsize
        self.table_size_changes = [smallest] if smallest == size else [smallest, size]
        self.header_table.resized = True


def server_connection(max_concurrent_streams: int) -> h2.connection.H2Connection:
    """A server-side h2 connection state announcing our limits and windows."""
    connection = _H2Connection(_CONFIG)
    connection.decoder = RepeatingBlocks(connection.decoder.max_header_list_size)
    connection.encoder = RepeatingHeaders()
    connection.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
    })
    connection.state_machine = _DrainingStateMachine()
    return connection
