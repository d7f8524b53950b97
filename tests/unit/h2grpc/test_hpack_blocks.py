"""`RepeatingBlocks` and `RepeatingHeaders`: a header block decoded once (a header list
encoded once) is answered from memory only while the dynamic table and the limits are as
they were; every answer equals hpack's own."""

from __future__ import annotations

import random
from typing import Any

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

from ext_proc.h2grpc.h2state import (
    KEPT_HEADER_BLOCKS,
    RepeatingBlocks,
    RepeatingHeaders,
    server_connection,
)

LIMIT = 64 * 1024

# The headers Envoy 1.40 opens every ext_proc stream with
ENVOY = [(b":method", b"POST"),
         (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
         (b":authority", b"extproc_otel"), (b":scheme", b"http"), (b"te", b"trailers"),
         (b"content-type", b"application/grpc"), (b"x-envoy-internal", b"true"),
         (b"x-forwarded-for", b"192.0.2.2")]


def envoy_like(headers: list[tuple[bytes, bytes]]) -> list[HeaderTuple]:
    """As Envoy encodes them: `:path` a literal that is never indexed."""
    return [NeverIndexedHeaderTuple(k, v) if k == b":path" else HeaderTuple(k, v)
            for k, v in headers]


def test_a_repeated_block_is_decoded_once_and_reads_the_same() -> None:
    encoder, ours, plain = hpack.Encoder(), RepeatingBlocks(LIMIT), hpack.Decoder(LIMIT)
    blocks = [encoder.encode(envoy_like(ENVOY)) for _ in range(5)]
    assert blocks[0] != blocks[1] and len(set(blocks[1:])) == 1  # the first one indexes
    for block in blocks:
        assert ours.decode(block, raw=True) == plain.decode(block, raw=True) == ENVOY
    assert ours.repeats == 3  # the second block was decoded; the next three remembered
    assert ours.kept() == 1


def test_answers_equal_hpacks_through_insertions_evictions_and_resizes() -> None:
    """A peer whose table is small (evictions), that inserts new values now and then,
    never indexes some, and resizes its table: decoded side by side with hpack's own
    decoder, block by block."""
    rng = random.Random(20261206)
    encoder, ours, plain = hpack.Encoder(), RepeatingBlocks(LIMIT), hpack.Decoder(LIMIT)
    encoder.header_table_size = 256
    values = [f"v{i}".encode() for i in range(12)]
    for step in range(3000):
        if step % 500 == 250:
            encoder.header_table_size = rng.choice([0, 128, 256, 4096])
        route = rng.choice(values[:3] if rng.random() < 0.9 else values)
        headers = [HeaderTuple(b":method", b"POST"),
                   NeverIndexedHeaderTuple(b":path", b"/p.S/M"), HeaderTuple(b"x-route", route)]
        if rng.random() < 0.3:
            headers.append(HeaderTuple(b"x-tenant", rng.choice(values)))
        block = encoder.encode(headers)
        assert ours.decode(block, raw=True) == plain.decode(block, raw=True), step
        assert list(ours.header_table.dynamic_entries) == list(plain.header_table.dynamic_entries)
    assert ours.repeats > 1000  # most blocks repeated one seen since the table last changed
    assert ours.kept() <= KEPT_HEADER_BLOCKS


def test_a_remembered_block_is_decoded_again_once_the_table_changed() -> None:
    encoder, ours = hpack.Encoder(), RepeatingBlocks(LIMIT)
    encoder.encode([HeaderTuple(b"x-a", b"1")])  # kept in step with `ours` below
    first = encoder.encode([HeaderTuple(b"x-a", b"1")])
    ours.decode(hpack.Encoder().encode([HeaderTuple(b"x-a", b"1")]), raw=True)
    assert ours.decode(first, raw=True) == [(b"x-a", b"1")]  # decoded: now remembered
    ours.decode(hpack.Encoder().encode([HeaderTuple(b"x-b", b"2")]), raw=True)  # inserts
    assert ours.kept() == 0
    # the same bytes now point at another entry of the table (the newest is x-b: 2)
    assert ours.decode(first, raw=True) == [(b"x-b", b"2")]


def test_a_remembered_block_still_meets_a_smaller_header_list_limit() -> None:
    ours, encoder = RepeatingBlocks(LIMIT), hpack.Encoder()
    block = encoder.encode([NeverIndexedHeaderTuple(b"x-big", b"v" * 200)])
    assert ours.decode(block, raw=True) == [(b"x-big", b"v" * 200)]
    assert ours.decode(block, raw=True) == [(b"x-big", b"v" * 200)]
    assert ours.repeats == 1
    ours.max_header_list_size = 100  # our SETTINGS changed
    with pytest.raises(OversizedHeaderListError):
        ours.decode(block, raw=True)


def test_a_bad_block_fails_and_forgets_everything_if_it_changed_the_table() -> None:
    ours, encoder = RepeatingBlocks(LIMIT), hpack.Encoder()
    good = encoder.encode([NeverIndexedHeaderTuple(b"x-a", b"1")])
    ours.decode(good, raw=True)
    bad_index = b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f"
    with pytest.raises(HPACKDecodingError):
        ours.decode(bad_index, raw=True)
    assert ours.kept() == 1  # the table is as it was: what is remembered still holds
    with pytest.raises(HPACKDecodingError):  # adds x-new: v to the table, then fails
        ours.decode(b"\x40\x05x-new\x01v" + bad_index, raw=True)
    assert list(ours.header_table.dynamic_entries) == [(b"x-new", b"v")]
    assert ours.kept() == 0


def test_long_blocks_and_text_decoding_are_not_remembered() -> None:
    ours, encoder = RepeatingBlocks(LIMIT), hpack.Encoder()
    long_block = encoder.encode([NeverIndexedHeaderTuple(b"x-long", b"v" * 2000)])
    assert ours.decode(long_block, raw=True) == [(b"x-long", b"v" * 2000)]
    short = encoder.encode([NeverIndexedHeaderTuple(b"x-a", b"1")])
    assert ours.decode(short) == [("x-a", "1")]
    assert ours.kept() == 0


def test_answers_are_copies() -> None:
    ours, encoder = RepeatingBlocks(LIMIT), hpack.Encoder()
    block = encoder.encode([NeverIndexedHeaderTuple(b"x-a", b"1")])
    ours.decode(block, raw=True).clear()
    ours.decode(block, raw=True).append((b"x-z", b"9"))
    assert ours.decode(block, raw=True) == [(b"x-a", b"1")]


def test_every_server_connection_decodes_with_it() -> None:
    connection = server_connection(100)
    assert isinstance(connection.decoder, RepeatingBlocks)
    assert connection.decoder.max_header_list_size == hpack.Decoder().max_header_list_size


# -- sent: RepeatingHeaders ---------------------------------------------------------

ANSWER = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK = [(b"grpc-status", b"0")]


def test_the_answer_headers_are_encoded_as_hpack_would_and_then_from_memory() -> None:
    ours, plain, peer = RepeatingHeaders(), hpack.Encoder(), hpack.Decoder()
    for _ in range(5):
        for headers in (ANSWER, OK):
            block = ours.encode(headers)
            assert block == plain.encode(headers)
            assert peer.decode(block, raw=True) == headers
    assert ours.kept() == 2
    assert ours.repeats == 6  # each list added itself, was remembered, then repeated


def test_encodings_equal_hpacks_through_insertions_resizes_and_never_indexed() -> None:
    rng = random.Random(6122026)
    ours, plain, peer = RepeatingHeaders(), hpack.Encoder(), hpack.Decoder(LIMIT)
    values = [f"v{i}".encode() for i in range(10)]
    for step in range(3000):
        if step % 400 == 200:  # the peer's SETTINGS_HEADER_TABLE_SIZE
            ours.header_table_size = plain.header_table_size = rng.choice([0, 64, 256, 4096])
        headers: list[Any] = [(b"x-route", rng.choice(values[:3] if rng.random() < 0.9
                                                       else values))]
        if rng.random() < 0.1:  # equal to a plain tuple, encoded apart
            headers = [NeverIndexedHeaderTuple(*headers[0])]
        block = ours.encode(headers)
        assert block == plain.encode(headers), step
        assert peer.decode(block, raw=True) == [tuple(h) for h in headers]
    assert list(ours.header_table.dynamic_entries) == list(plain.header_table.dynamic_entries)
    assert ours.repeats > 1000


def test_a_table_size_update_due_is_sent_before_a_remembered_list() -> None:
    ours, peer = RepeatingHeaders(), hpack.Decoder()
    for _ in range(3):
        peer.decode(ours.encode(ANSWER), raw=True)
    ours.header_table_size = 1024  # the peer asked for a smaller table
    block = ours.encode(ANSWER)
    assert block[0] & 0xE0 == 0x20  # starts with a dynamic table size update
    assert peer.decode(block, raw=True) == ANSWER
    assert peer.header_table_size == 1024


def test_every_server_connection_encodes_with_it() -> None:
    assert isinstance(server_connection(100).encoder, RepeatingHeaders)


def test_settings_back_and_forth_still_send_both_size_updates() -> None:
    """The peer's table size goes 4096 -> 1024 -> 4096 before our next answer: the
    table looks as it was, but hpack owes the peer both updates."""
    ours, plain, peer = RepeatingHeaders(), hpack.Encoder(), hpack.Decoder()
    for _ in range(3):
        assert ours.encode(ANSWER) == plain.encode(ANSWER)
        peer.decode(ours.encode(OK), raw=True) and plain.encode(OK)
    for coder in (ours, plain):
        coder.header_table_size = 1024
        coder.header_table_size = 4096
    block = ours.encode(ANSWER)
    assert block == plain.encode(ANSWER)
    assert block[0] & 0xE0 == 0x20  # the updates come first


def test_a_lower_table_limit_is_checked_for_a_remembered_block() -> None:
    encoder, ours, plain = hpack.Encoder(), RepeatingBlocks(LIMIT), hpack.Decoder(LIMIT)
    blocks = [encoder.encode([HeaderTuple(b"x-a", b"1")]) for _ in range(3)]
    for block in blocks:
        assert ours.decode(block, raw=True) == plain.decode(block, raw=True)
    assert ours.repeats == 1
    for decoder in (ours, plain):
        decoder.max_allowed_table_size = 16  # our SETTINGS shrank the table it may use
    with pytest.raises(hpack.InvalidTableSizeError):
        plain.decode(blocks[-1], raw=True)
    with pytest.raises(hpack.InvalidTableSizeError):
        ours.decode(blocks[-1], raw=True)


def test_an_equal_entry_added_again_is_a_change_of_the_table() -> None:
    """A table with room for one entry: adding x-a: 1 again evicts the equal entry. The
    table looks the same by value but indices may now point elsewhere: what was
    remembered must be decoded again (the newest entry is another object)."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 40  # one entry of 3 + 1 + 32 bytes
    ours, plain = RepeatingBlocks(LIMIT), hpack.Decoder(LIMIT)
    size_update = encoder.encode([NeverIndexedHeaderTuple(b"x-z", b"0")])
    adds = encoder.encode([HeaderTuple(b"x-a", b"1")])
    uses = encoder.encode([HeaderTuple(b"x-a", b"1")])
    for block in (size_update, adds, uses, uses):
        assert ours.decode(block, raw=True) == plain.decode(block, raw=True)
    assert ours.repeats == 1
    assert adds[0] == 0x40  # a literal that adds itself to the table
    assert ours.decode(adds, raw=True) == plain.decode(adds, raw=True)  # evicts its twin
    assert ours.kept() == 0


def test_large_blocks_and_lists_are_not_remembered_either_way() -> None:
    many = [(b"x-%d" % i, b"v") for i in range(40)]
    sent = RepeatingHeaders()
    sent.header_table_size = 0  # nothing is ever added: every list could be remembered
    sent.encode(many)
    sent.encode([(b"x-long", b"v" * 2000)])
    assert sent.kept() == 0
    sent.encode([(b"x-short", b"v")])
    assert sent.kept() == 1
    received = RepeatingBlocks(LIMIT)
    received.decode(b"\x82" * 40, raw=True)  # 40 indexed headers in 40 bytes
    assert received.kept() == 0


def test_only_bytes_are_remembered_on_the_way_out() -> None:
    """True == 1 and "1" != b"1": only names and values of bytes are remembered."""
    sent = RepeatingHeaders()
    sent.header_table_size = 0
    sent.encode([(b"x-a", b"1")])  # sends the size update: not remembered
    for headers in ([(b"x-a", "1")], [(b"x-a", True)], [(b"x-a", 1)]):
        sent.encode(headers)
        sent.encode(headers)
    assert sent.kept() == 0
    assert sent.encode([(b"x-a", b"1")]) == sent.encode([(b"x-a", b"1")])
    assert sent.kept() == 1


def _size_updates(block: bytes) -> list[int]:
    """The dynamic table size updates a header block starts with."""
    updates, at = [], 0
    while at < len(block) and block[at] & 0xE0 == 0x20:
        value, used = hpack.hpack.decode_integer(block[at:], 5)
        updates.append(value)
        at += used
    return updates


def test_size_updates_owed_are_the_smallest_then_the_last() -> None:
    """RFC 7541 4.2, where hpack sends every size set: SETTINGS 256 then 0, both
    acknowledged, leave the peer a limit of 0, and an update to 256 would be refused;
    the same size set twice must still send the update it owes."""
    for sizes, updates in (((256, 0), [0]), ((256, 256), [256]), ((0, 256, 4096), [0, 4096]),
                           ((1024, 4096), [1024, 4096]), ((4096,), [])):
        encoder = RepeatingHeaders()
        for size in sizes:
            encoder.header_table_size = size
        block = encoder.encode([(b":status", b"200")])
        assert _size_updates(block) == updates, sizes
        decoder = hpack.Decoder()
        decoder.max_allowed_table_size = sizes[-1]  # the peer's limit: its last SETTINGS
        assert decoder.decode(block, raw=True) == [(b":status", b"200")], sizes
        assert _size_updates(encoder.encode([(b":status", b"200")])) == []  # owed once
