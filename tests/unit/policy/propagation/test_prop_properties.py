"""Property tests: exact transcoding between every pair of formats; extractors never raise."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanContext
from prop_support import Gateway, as_carrier, local_context, propagator, span_context_of

from ext_proc.policy.propagation import FORMATS, Rejections, sampling_decision
from ext_proc.policy.propagation.grpc_trace_bin import GrpcTraceBinFormat

TRACE_IDS = st.integers(min_value=1, max_value=2**128 - 1)
SPAN_IDS = st.integers(min_value=1, max_value=2**64 - 1)
PAIRS = list(itertools.product(FORMATS, FORMATS))
HEADER_NAMES = sorted(
    set().union(*(fmt.FIELDS for fmt in FORMATS.values())) | {"baggage", "uberctx-a", "uberctx-"}
)


@pytest.mark.parametrize(("source", "target"), PAIRS)
@settings(max_examples=25)
@given(trace_id=TRACE_IDS, span_id=SPAN_IDS, sampled=st.booleans())
def test_every_extract_inject_pair_transcodes_exactly(
    source: str, target: str, trace_id: int, span_id: int, sampled: bool
) -> None:
    """Issue #3 §3: trace id, parent span id (= our span) and sampled survive every pair."""
    incoming: dict[str, str] = {}
    FORMATS[source].inject(local_context(trace_id, span_id, sampled), incoming)
    prop = propagator(extract=(source,), inject=(target,))
    span, out = Gateway().forward(prop, as_carrier(incoming))
    decoded = FORMATS[target].extract(as_carrier(out), Rejections())
    assert isinstance(decoded, SpanContext)
    own = span.get_span_context()
    assert (decoded.trace_id, decoded.span_id, decoded.trace_flags.sampled) == (
        trace_id, own.span_id, sampled,
    )
    assert span.parent is not None and span.parent.span_id == span_id


@pytest.mark.parametrize("target", list(FORMATS))
@given(trace_id=st.integers(min_value=1, max_value=2**64 - 1), span_id=SPAN_IDS)
def test_64_bit_b3_trace_ids_are_padded_in_every_target(
    target: str, trace_id: int, span_id: int
) -> None:
    """B3 README TraceId: 16 lower-hex characters = a 64-bit id, left-padded to 128 bits."""
    prop = propagator(extract=("b3",), inject=(target,))
    _, out = Gateway().forward(prop, {"b3": [f"{trace_id:016x}-{span_id:016x}-1"]})
    decoded = FORMATS[target].extract(as_carrier(out), Rejections())
    assert isinstance(decoded, SpanContext) and decoded.trace_id == trace_id


@pytest.mark.parametrize("name", HEADER_NAMES)
@given(values=st.lists(st.text(max_size=300), min_size=1, max_size=3))
def test_every_extractor_survives_arbitrary_text(name: str, values: list[str]) -> None:
    """Issue #3 §6: never raise on bad input; whatever arrives, a Context comes back."""
    rejections = Rejections()
    context = propagator(rejections).extract({name: values})
    assert span_context_of(context).is_valid in (True, False)
    assert all(count >= 1 for count in rejections.snapshot().values())


@given(raw=st.binary(max_size=64), padded=st.booleans())
def test_grpc_trace_bin_survives_arbitrary_bytes(raw: bytes, padded: bool) -> None:
    """Fuzz the binary decoder itself (base64 of arbitrary bytes reaches the field parser)."""
    text = base64.b64encode(raw).decode()
    result = GrpcTraceBinFormat().extract(
        {"grpc-trace-bin": [text if padded else text.rstrip("=")]}, Rejections()
    )
    assert result is None or (isinstance(result, SpanContext) and result.is_valid)


@given(
    trace_id=TRACE_IDS, span_id=SPAN_IDS, sampled=st.booleans(),
    position=st.integers(min_value=0, max_value=28), byte=st.integers(min_value=0, max_value=255),
)
def test_grpc_trace_bin_single_byte_mutations(
    trace_id: int, span_id: int, sampled: bool, position: int, byte: int
) -> None:
    raw = bytearray(GrpcTraceBinFormat.encode(local_context(trace_id, span_id, sampled)))
    raw[position] = byte
    decoded = GrpcTraceBinFormat.decode(bytes(raw))
    assert decoded is None or decoded.is_valid


@given(carrier=st.dictionaries(
    st.sampled_from(HEADER_NAMES),
    st.lists(st.text(alphabet=st.characters(codec="latin-1"), max_size=80), min_size=1, max_size=2),
))
def test_whole_propagator_survives_arbitrary_carriers(carrier: dict[str, list[str]]) -> None:
    prop = propagator(inject=(*FORMATS, "baggage"))
    span, out = Gateway().forward(prop, carrier)
    assert all(isinstance(value, str) for value in out.values())
    assert not set(prop.removals(carrier, out)) & set(out)
    assert span.get_span_context().is_valid


VALID = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,a@b=1",
    "grpc-trace-bin": "AABL+S81d7NNpqPOkp0ADkc2ATTwZ6oLqQK3AgE",
    "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "uber-trace-id": "80f198ee56343ba864fe8b2a57d3eff7%3Ae457b5a2e4d86bd1%3A0%3A1",
    "baggage": "key1=value1;property1;property2, key2 = value2",
    "uberctx-a": "value%201%20%2F%20blah",
}


@pytest.mark.parametrize("name", list(VALID))
@given(data=st.data())
def test_extractors_survive_near_valid_values(name: str, data: st.DataObject) -> None:
    """Mutations of valid values reach deep into each parser (far more than random text)."""
    value = VALID[name]
    start = data.draw(st.integers(min_value=0, max_value=len(value)))
    end = data.draw(st.integers(min_value=start, max_value=len(value)))
    alphabet = "0123456789abcdefABCDEF-:=,;%@ \t=/+AZ\x00\xff"
    insert = data.draw(st.text(alphabet=alphabet, max_size=4))
    mutated = value[:start] + insert + value[end:]
    rejections = Rejections()
    context = propagator(rejections).extract({name: [mutated]})
    valid = span_context_of(context).is_valid
    # an empty header is no header, and "b3: 0"/"1"/"d" is a valid decision without ids
    absent = not mutated.strip(" \t") or sampling_decision(context) is not None
    assert (valid or absent or name in ("baggage", "uberctx-a", "tracestate")
            or rejections.snapshot())
