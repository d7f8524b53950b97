"""Lenient B3 sampling state (#19, item 5): a value outside the spec never discards valid ids.

openzipkin/b3-propagation README: ``X-B3-Sampled`` is ``1`` or ``0`` ('some tracers
propagated true or false ... a lenient implementation may accept them'); the ``b3``
header's third part is ``1``, ``0`` or ``d`` (debug, implies accept); absent = defer.
A readable legacy value is taken as it means, any other as absent (defer); both are
counted as rejections (metric and rate-limited debug log) but the trace continues.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanContext
from prop_support import Gateway, propagator

from ext_proc.policy.propagation import Rejections
from ext_proc.policy.propagation._base import Extracted
from ext_proc.policy.propagation.b3 import B3MultiFormat, B3SingleFormat

T128 = "80f198ee56343ba864fe8b2a57d3eff7"
SPAN = "e457b5a2e4d86bd1"
PARENT = "05e3ac9a4f6e3b90"
IDS = (int(T128, 16), int(SPAN, 16))

READABLE = [  # (value, sampled)
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False),
    ("FALSE", False), ("d", True), ("D", True),
]
UNKNOWN = ["yes", "2", "", "on", "01", "truee"]


def single(value: str, rejections: Rejections) -> Extracted:
    return B3SingleFormat().extract({"b3": [value]}, rejections)


def multi(rejections: Rejections, **headers: str) -> Extracted:
    carrier = {f"x-b3-{name.lower()}": [value] for name, value in headers.items()}
    return B3MultiFormat().extract(carrier, rejections)


def kept(result: Extracted) -> tuple[int, int, bool]:
    assert isinstance(result, SpanContext), f"ids discarded: {result!r}"
    assert result.is_remote and result.is_valid
    return result.trace_id, result.span_id, result.trace_flags.sampled


# ---- X-B3-Sampled -----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "sampled"), READABLE)
def test_multi_readable_sampled_keeps_ids_and_its_meaning(value: str, sampled: bool) -> None:
    rejections = Rejections()
    result = multi(rejections, TraceId=T128, SpanId=SPAN, ParentSpanId=PARENT, Sampled=value)
    assert kept(result) == (*IDS, sampled)
    assert rejections.snapshot() == {"b3multi": 1}  # outside 0/1: still counted


@pytest.mark.parametrize("value", UNKNOWN)
def test_multi_unknown_sampled_defers_like_an_absent_one(value: str) -> None:
    rejections = Rejections()
    result = multi(rejections, TraceId=T128, SpanId=SPAN, Sampled=value)
    absent = multi(Rejections(), TraceId=T128, SpanId=SPAN)
    assert result == absent and kept(result) == (*IDS, False)
    assert rejections.snapshot() == {"b3multi": 1}


@pytest.mark.parametrize(("value", "sampled"), [("1", True), ("0", False)])
def test_multi_canonical_sampled_is_not_counted(value: str, sampled: bool) -> None:
    rejections = Rejections()
    assert kept(multi(rejections, TraceId=T128, SpanId=SPAN, Sampled=value)) == (*IDS, sampled)
    assert rejections.snapshot() == {}


def test_multi_debug_flag_wins_over_an_unknown_sampled() -> None:
    rejections = Rejections()
    result = multi(rejections, TraceId=T128, SpanId=SPAN, Sampled="yes", Flags="1")
    assert kept(result) == (*IDS, True)
    assert rejections.snapshot() == {"b3multi": 1}


@pytest.mark.parametrize(("value", "decision"), [("True", True), ("false", False), ("yes", None)])
def test_multi_sampled_alone_is_read_leniently(value: str, decision: bool | None) -> None:
    rejections = Rejections()
    assert multi(rejections, Sampled=value) is decision
    assert rejections.snapshot() == {"b3multi": 1}


def test_multi_bad_ids_with_a_lenient_sampled_are_counted_once() -> None:
    rejections = Rejections()
    assert multi(rejections, TraceId=T128.upper(), SpanId=SPAN, Sampled="True") is None
    assert rejections.snapshot() == {"b3multi": 1}


# ---- b3 single header -------------------------------------------------------------------

@pytest.mark.parametrize(("value", "sampled"), READABLE)
def test_single_readable_state_keeps_ids_and_its_meaning(value: str, sampled: bool) -> None:
    rejections = Rejections()
    assert kept(single(f"{T128}-{SPAN}-{value}-{PARENT}", rejections)) == (*IDS, sampled)
    assert rejections.snapshot() == ({} if value == "d" else {"b3": 1})  # d is the spec's


@pytest.mark.parametrize("value", UNKNOWN)
def test_single_unknown_state_defers_like_an_absent_one(value: str) -> None:
    rejections = Rejections()
    result = single(f"{T128}-{SPAN}-{value}", rejections)
    assert result == single(f"{T128}-{SPAN}", Rejections()) and kept(result) == (*IDS, False)
    assert rejections.snapshot() == {"b3": 1}


def test_single_unknown_state_with_a_parent_keeps_ids() -> None:
    rejections = Rejections()
    assert kept(single(f"{T128}-{SPAN}-yes-{PARENT}", rejections)) == (*IDS, False)
    assert rejections.snapshot() == {"b3": 1}


@pytest.mark.parametrize(("value", "decision"), [("true", True), ("False", False)])
def test_single_legacy_word_alone_is_a_decision(value: str, decision: bool) -> None:
    rejections = Rejections()
    assert single(value, rejections) is decision
    assert rejections.snapshot() == {"b3": 1}


# ---- through the gateway: the trace continues, the rejection is seen ----------------------

@pytest.mark.parametrize(("headers", "sampled", "bad"), [
    ({"x-b3-traceid": T128, "x-b3-spanid": SPAN, "x-b3-sampled": "True"}, True, "True"),
    ({"x-b3-traceid": T128, "x-b3-spanid": SPAN, "x-b3-sampled": "false"}, False, "false"),
    ({"x-b3-traceid": T128, "x-b3-spanid": SPAN, "x-b3-sampled": "yes"}, False, "yes"),
    ({"b3": f"{T128}-{SPAN}-TRUE"}, True, "TRUE"),
    ({"b3": f"{T128}-{SPAN}-2"}, False, "2"),
])
def test_gateway_continues_the_trace(
        headers: dict[str, str], sampled: bool, bad: str, debug_records: list[Any]) -> None:
    rejections = Rejections()
    prop = propagator(rejections)
    carrier = {name: [value] for name, value in headers.items()}
    span, out = Gateway().forward(prop, carrier)
    own = span.get_span_context()
    assert own.trace_id == int(T128, 16)
    assert span.parent is not None and span.parent.span_id == int(SPAN, 16)
    assert own.trace_flags.sampled is sampled
    assert out["traceparent"] == f"00-{T128}-{own.span_id:016x}-0{int(sampled)}"
    assert sum(rejections.snapshot().values()) == 1
    (logged,) = [r for r in debug_records if r["message"] == "rejected trace-context header"]
    assert logged["extra"]["value"] == bad
