"""B3 (openzipkin/b3-propagation README) and Jaeger (client libraries 'Propagation Format')."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanContext
from prop_support import SPAN_ID, TRACE_ID, local_context

from ext_proc.policy.propagation import Rejections
from ext_proc.policy.propagation._base import Extracted
from ext_proc.policy.propagation.b3 import B3MultiFormat, B3SingleFormat
from ext_proc.policy.propagation.jaeger import JaegerFormat

T128 = "80f198ee56343ba864fe8b2a57d3eff7"
T64 = "64fe8b2a57d3eff7"
SPAN = "e457b5a2e4d86bd1"
PARENT = "05e3ac9a4f6e3b90"


def ids(result: Extracted) -> tuple[int, int, bool] | None:
    if not isinstance(result, SpanContext):
        return None
    return result.trace_id, result.span_id, result.trace_flags.sampled


def b3(value: str, rejections: Rejections | None = None) -> Extracted:
    return B3SingleFormat().extract({"b3": [value]}, rejections or Rejections())


def b3multi(**headers: str) -> Extracted:
    carrier = {f"x-b3-{name.lower()}": [value] for name, value in headers.items()}
    return B3MultiFormat().extract(carrier, Rejections())


def jaeger(value: str) -> Extracted:
    return JaegerFormat().extract({"uber-trace-id": [value]}, Rejections())


# ---- B3 single --------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "sampled"), [
    (f"{T128}-{SPAN}-1-{PARENT}", True),   # README Single Header example
    (f"{T128}-{SPAN}-1", True),
    (f"{T128}-{SPAN}-0", False),
    (f"{T128}-{SPAN}-d", True),            # Sampling State: Debug implies accept
    (f"{T128}-{SPAN}", False),             # Defer: absence of the sampling field
])
def test_b3_single_header(value: str, sampled: bool) -> None:
    """README 'Single Header': b3={TraceId}-{SpanId}-{SamplingState}-{ParentSpanId}."""
    assert ids(b3(value)) == (int(T128, 16), int(SPAN, 16), sampled)


def test_b3_64_bit_trace_id_is_left_padded() -> None:
    """README TraceId: 32 or 16 lower-hex characters; 64-bit ids left-padded to 128 bits."""
    assert ids(b3(f"{T64}-{SPAN}-1")) == (int(T64, 16), int(SPAN, 16), True)
    assert ids(b3multi(TraceId=T64, SpanId=SPAN)) == (int(T64, 16), int(SPAN, 16), False)


@pytest.mark.parametrize(("value", "decision"), [("0", False), ("1", True), ("d", True)])
def test_b3_sampling_state_alone(value: str, decision: bool) -> None:
    """README: 'A deny decision may omit identifiers and look like this: b3: 0'."""
    assert b3(value) is decision


@pytest.mark.parametrize("value", [
    f"{T128.upper()}-{SPAN}-1", f"{T128}-{SPAN}-1-{PARENT}-x", f"{T128}-{SPAN}-1-{PARENT[1:]}",
    f"{T128}-{SPAN}-true-{PARENT[1:]}",
    f"{T128[2:]}-{SPAN}-1", f"{'0' * 32}-{SPAN}-1", f"{T128}-{'0' * 16}-1", f"{T128}",
    "", "-", "00", "yes",
])
def test_b3_single_malformed_is_rejected(value: str) -> None:
    """README: ids are lower-hex of fixed lengths (a bad sampling state: test_prop_b3_lenient)."""
    rejections = Rejections()
    assert b3(value, rejections) is None
    assert rejections.snapshot() == {"b3": 1}


def test_b3_inject_single() -> None:
    out: dict[str, str] = {}
    B3SingleFormat().inject(local_context(TRACE_ID, SPAN_ID, True), out)
    assert out == {"b3": f"{TRACE_ID:032x}-{SPAN_ID:016x}-1"}


# ---- B3 multi ---------------------------------------------------------------------------

@pytest.mark.parametrize(("sampled", "flags", "expected"), [
    ("1", None, True), ("0", None, False), (None, None, False),
    ("true", None, True), ("false", None, False),  # README: 'a lenient implementation may accept'
    (None, "1", True), ("0", "1", True),           # Debug Flag: X-B3-Flags: 1 implies accept
    ("0", "2", False),                             # 'Absent or any other value can be ignored'
])
def test_b3_multi_sampling(sampled: str | None, flags: str | None, expected: bool) -> None:
    """README 'Multiple Headers' Sampling State and Debug Flag."""
    headers = {"TraceId": T128, "SpanId": SPAN, "ParentSpanId": PARENT}
    if sampled is not None:
        headers["Sampled"] = sampled
    if flags is not None:
        headers["Flags"] = flags
    assert ids(b3multi(**headers)) == (int(T128, 16), int(SPAN, 16), expected)


def test_b3_multi_first_value_wins() -> None:
    """README Multiple Headers: 'When extracting state headers, the first value wins.'"""
    carrier = {
        "x-b3-traceid": [T128, T64], "x-b3-spanid": [SPAN, PARENT], "x-b3-sampled": ["1", "0"],
    }
    expected = (int(T128, 16), int(SPAN, 16), True)
    assert ids(B3MultiFormat().extract(carrier, Rejections())) == expected


def test_b3_multi_sampling_alone_is_a_decision() -> None:
    """README: 'It is also valid to send sampling state independently, such as X-B3-Sampled: 0'."""
    assert b3multi(Sampled="0") is False
    assert b3multi(Flags="1") is True


@pytest.mark.parametrize("headers", [
    {"TraceId": T128},                                   # SpanId required with TraceId
    {"SpanId": SPAN},
    {"TraceId": T128, "SpanId": SPAN, "ParentSpanId": ""},
    {"TraceId": T128, "SpanId": SPAN, "ParentSpanId": "-"},
    {"TraceId": T128 + "0", "SpanId": SPAN},
    {"TraceId": T128, "SpanId": SPAN.upper()},
])
def test_b3_multi_malformed_is_rejected(headers: dict[str, str]) -> None:
    assert b3multi(**headers) is None


def test_b3_inject_multi() -> None:
    out: dict[str, str] = {}
    B3MultiFormat().inject(local_context(TRACE_ID, SPAN_ID, False), out)
    assert out == {"x-b3-traceid": f"{TRACE_ID:032x}", "x-b3-spanid": f"{SPAN_ID:016x}",
                   "x-b3-sampled": "0"}


# ---- Jaeger -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (f"{T128}:{SPAN}:0:1", (int(T128, 16), int(SPAN, 16), True)),
    (f"{T128}:{SPAN}:{PARENT}:01", (int(T128, 16), int(SPAN, 16), True)),
    (f"{T128}:{SPAN}:0:0", (int(T128, 16), int(SPAN, 16), False)),
    (f"{T128}:{SPAN}:0:2", (int(T128, 16), int(SPAN, 16), True)),   # debug implies sampled
    (f"{T128}:{SPAN}:0:8", (int(T128, 16), int(SPAN, 16), False)),  # firehose alone
    ("deadbeef:beef:0:1", (0xDEADBEEF, 0xBEEF, True)),              # variable length, 0-padded
    (f"{T128}%3A{SPAN}%3A0%3A1", (int(T128, 16), int(SPAN, 16), True)),  # URL-encoded
    (f"{T128}%3a{SPAN}%3a0%3a03", (int(T128, 16), int(SPAN, 16), True)),
    (f"{T128.upper()}:{SPAN}:0:1", (int(T128, 16), int(SPAN, 16), True)),
])
def test_jaeger_uber_trace_id(value: str, expected: tuple[int, int, bool]) -> None:
    """Jaeger 'Trace/Span Identity': {trace-id}:{span-id}:{parent-span-id}:{flags}; receivers
    MUST accept shorter hex strings and 0-pad them on the left; flags one or two hex digits,
    bit 1 sampled, bit 2 debug."""
    assert ids(jaeger(value)) == expected


@pytest.mark.parametrize("value", [
    f"0:{SPAN}:0:1", f"{T128}:0:0:1",                   # 'Value of 0 is not valid'
    f"{T128}0:{SPAN}:0:1", f"{T128}:{SPAN}0:0:1",        # too long
    f"{T128}:{SPAN}:0", f"{T128}:{SPAN}:0:1:0", f"{T128}:{SPAN}:0:100",
    f"{T128}:{SPAN}::1", f"{T128}:{SPAN}:0:", f"{T128}:{SPAN}:0:g1", ":::", "",
    f"{T128}%3G{SPAN}%3A0%3A1",
])
def test_jaeger_malformed_is_rejected(value: str) -> None:
    assert jaeger(value) is None


def test_jaeger_inject() -> None:
    """Senders SHOULD generate 16 or 32 hex characters; parent span id deprecated (0)."""
    out: dict[str, str] = {}
    JaegerFormat().inject(local_context(TRACE_ID, SPAN_ID, True), out)
    assert out == {"uber-trace-id": f"{TRACE_ID:032x}:{SPAN_ID:016x}:0:01"}


def test_jaeger_baggage_headers_round_trip_to_w3c_members() -> None:
    """Jaeger 'Baggage' Value Encoding: uberctx-key1: value%201%20%2F%20blah is 'value 1 / blah'."""
    carrier = {"uberctx-key1": ["value%201%20%2F%20blah"], "uberctx-": ["x"], "other": ["y"]}
    members = list(JaegerFormat.baggage_members(carrier))
    assert members == ["key1=value%201%20/%20blah"]
    assert JaegerFormat.baggage_headers(members) == {"uberctx-key1": "value%201%20%2F%20blah"}
