"""grpc-trace-bin: OpenCensus BinaryEncoding (opencensus-specs encodings/BinaryEncoding.md)."""

from __future__ import annotations

import base64

import pytest
from prop_support import SPAN_ID, TRACE_ID, local_context

from ext_proc.policy.propagation import Rejections
from ext_proc.policy.propagation.grpc_trace_bin import GrpcTraceBinFormat

# The spec's "Valid example" (Trace Context, version 0), byte for byte.
SPEC_EXAMPLE = bytes([
    0,
    0, 75, 249, 47, 53, 119, 179, 77, 166, 163, 206, 146, 157, 0, 14, 71, 54,
    1, 52, 240, 103, 170, 11, 169, 2, 183,
    2, 1,
])
SPEC_TRACE = 0x4BF92F3577B34DA6A3CE929D000E4736
SPEC_SPAN = 0x34F067AA0BA902B7
FMT = GrpcTraceBinFormat()


def b64(raw: bytes, padded: bool = True) -> str:
    text = base64.b64encode(raw).decode()
    return text if padded else text.rstrip("=")


def extract(*values: str, rejections: Rejections | None = None) -> tuple[int, int, bool] | None:
    result = FMT.extract({"grpc-trace-bin": list(values)}, rejections or Rejections())
    if result is None or isinstance(result, bool):
        return None
    return result.trace_id, result.span_id, result.trace_flags.sampled


def test_spec_valid_example_decodes() -> None:
    """BinaryEncoding 'Valid example': traceId, spanId, traceOptions = 1."""
    assert extract(b64(SPEC_EXAMPLE)) == (SPEC_TRACE, SPEC_SPAN, True)


def test_encoding_is_the_29_byte_layout_unpadded() -> None:
    """BinaryEncoding Trace Context fields 0 (16 bytes), 1 (8), 2 (1) after version 0;
    emitted as standard base64 without padding (Envoy notes: emit unpadded)."""
    context = local_context(SPEC_TRACE, SPEC_SPAN, sampled=True)
    assert GrpcTraceBinFormat.encode(context) == SPEC_EXAMPLE
    out: dict[str, str] = {}
    FMT.inject(context, out)
    assert out == {"grpc-trace-bin": b64(SPEC_EXAMPLE, padded=False)}
    assert "=" not in out["grpc-trace-bin"] and len(out["grpc-trace-bin"]) == 39


@pytest.mark.parametrize("padded", [True, False])
def test_padded_and_unpadded_base64_are_accepted(padded: bool) -> None:
    assert extract(b64(SPEC_EXAMPLE, padded)) == (SPEC_TRACE, SPEC_SPAN, True)


def test_options_field_is_optional_absent_means_not_sampled() -> None:
    """BinaryEncoding Trace-options: optional; 0 (the default) means no decision to trace."""
    assert extract(b64(SPEC_EXAMPLE[:-2])) == (SPEC_TRACE, SPEC_SPAN, False)


def test_only_the_sampled_bit_of_options_is_read() -> None:
    """BinaryEncoding Trace-options: 'The behavior of other bits is currently undefined.'"""
    assert extract(b64(SPEC_EXAMPLE[:-1] + b"\xfe")) == (SPEC_TRACE, SPEC_SPAN, False)


def test_decoding_stops_at_the_first_unknown_field_id() -> None:
    """BinaryEncoding Deserialization Rules: read until the first unknown field_id, which is
    not a parse error (the tail belongs to a newer data-type version)."""
    tail = bytes([3, 0xDE, 0xAD]) + bytes([2, 0])  # a known id after the unknown one is ignored
    assert extract(b64(SPEC_EXAMPLE + tail)) == (SPEC_TRACE, SPEC_SPAN, True)
    no_options = SPEC_EXAMPLE[:-2] + bytes([9, 1, 2, 3])
    assert extract(b64(no_options)) == (SPEC_TRACE, SPEC_SPAN, False)


def test_fields_in_any_order_within_the_version() -> None:
    """BinaryEncoding Serialization Rules: fields within a data-type version in any order."""
    reordered = bytes([0, 2, 1]) + SPEC_EXAMPLE[18:27] + SPEC_EXAMPLE[1:18]
    assert extract(b64(reordered)) == (SPEC_TRACE, SPEC_SPAN, True)


@pytest.mark.parametrize("raw", [
    bytes([1]) + SPEC_EXAMPLE[1:],                 # unknown version
    SPEC_EXAMPLE[:10],                             # truncated trace id
    SPEC_EXAMPLE[:22],                             # truncated span id
    SPEC_EXAMPLE[:28],                             # options id without its byte
    SPEC_EXAMPLE[:18],                             # no span id
    bytes([0]) + SPEC_EXAMPLE[18:],                # no trace id
    bytes([0, 0]) + bytes(16) + SPEC_EXAMPLE[18:],  # all-zero trace id
    SPEC_EXAMPLE[:19] + bytes(8) + SPEC_EXAMPLE[27:],  # all-zero span id
    b"", bytes([0]),
])
def test_invalid_binary_is_rejected_and_counted(raw: bytes) -> None:
    """BinaryEncoding: version byte first (only 0 known); 'All bytes 0 is considered invalid'."""
    rejections = Rejections()
    assert extract(b64(raw), rejections=rejections) is None
    assert rejections.snapshot() == {"grpc-trace-bin": 1}


@pytest.mark.parametrize("text", ["!!!", "AAAAA", "AA-_", "AAAA===", b64(SPEC_EXAMPLE) + "A"])
def test_invalid_base64_is_rejected(text: str) -> None:
    """Standard base64 alphabet only; a length of 4n+1 characters cannot be base64."""
    assert extract(text) is None


def test_comma_joined_duplicates_take_the_first_valid() -> None:
    """Envoy notes: several values may arrive comma-joined; the first valid one wins."""
    other = local_context(TRACE_ID, SPAN_ID, sampled=False)
    second = GrpcTraceBinFormat.encode_text(other)
    assert extract(f"garbage, {b64(SPEC_EXAMPLE)},{second}") == (SPEC_TRACE, SPEC_SPAN, True)
    assert extract("garbage", second) == (TRACE_ID, SPAN_ID, False)
