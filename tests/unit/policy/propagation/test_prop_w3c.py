"""W3C Trace Context (https://www.w3.org/TR/trace-context-2/) and the w3c/trace-context test suite.

Each test names the spec section and/or the test-suite case (test/test.py) it checks.
"""

from __future__ import annotations

import pytest
from opentelemetry.trace import TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prop_support import (
    SUITE_PARENT,
    SUITE_SPAN,
    SUITE_TRACE,
    Gateway,
    as_carrier,
    propagator,
    span_context_of,
)

from ext_proc.policy.propagation import Rejections
from ext_proc.policy.propagation.w3c import TraceContextFormat


def extract_tp(*values: str, rejections: Rejections | None = None) -> int | None:
    """The extracted trace id for these traceparent values, None for a new root."""
    rejections = rejections or Rejections()
    result = TraceContextFormat().extract({"traceparent": list(values)}, rejections)
    return None if result is None or isinstance(result, bool) else result.trace_id


def tracestate(*headers: str) -> dict[str, str] | None:
    context = TraceContextFormat().extract(
        {"traceparent": [SUITE_PARENT], "tracestate": list(headers)}, Rejections()
    )
    assert context is not None and not isinstance(context, bool)
    return dict(context.trace_state) or None


SUITE_ID = int(SUITE_TRACE, 16)


def test_valid_version_00_is_extracted_with_flags() -> None:
    """§3.2.2 traceparent field values: version-trace-id-parent-id-flags."""
    result = TraceContextFormat().extract({"traceparent": [SUITE_PARENT]}, Rejections())
    assert result is not None and not isinstance(result, bool)
    assert (result.trace_id, result.span_id, result.trace_flags.sampled, result.is_remote) == (
        SUITE_ID, int(SUITE_SPAN, 16), True, True,
    )


def test_two_traceparent_headers_restart_the_trace(rejections: Rejections) -> None:
    """Test suite test_traceparent_duplicated: two traceparent headers => new trace id."""
    assert extract_tp(SUITE_PARENT, SUITE_PARENT, rejections=rejections) is None
    assert rejections.snapshot() == {"tracecontext": 1}


def test_opentelemetry_reads_only_the_first_traceparent() -> None:
    """Why we own the parser: OTel's propagator is laxer and keeps the first of two."""
    context = TraceContextTextMapPropagator().extract(
        {"traceparent": [SUITE_PARENT, SUITE_PARENT]}
    )
    assert span_context_of(context).trace_id == SUITE_ID


@pytest.mark.parametrize("value", [
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-01.",  # version_0x00
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-01-what-the-future-will-be-like",  # version_0x00
    f"cc-{SUITE_TRACE}-{SUITE_SPAN}-01.what-the-future-will-be-like",  # version_0xcc
    f"ff-{SUITE_TRACE}-{SUITE_SPAN}-01",  # version_0xff
    f".0-{SUITE_TRACE}-{SUITE_SPAN}-01",  # version illegal characters
    f"0-{SUITE_TRACE}-{SUITE_SPAN}-01",  # version too short
    f"000-{SUITE_TRACE}-{SUITE_SPAN}-01",  # version too long
    f"00-{'0' * 32}-{SUITE_SPAN}-01",  # trace id all zero
    f"00-{SUITE_TRACE[:-1]}.-{SUITE_SPAN}-01",  # trace id illegal char
    f"00-{SUITE_TRACE}0-{SUITE_SPAN}-01", f"00-{SUITE_TRACE[1:]}-{SUITE_SPAN}-01",
    f"00-{SUITE_TRACE}-{'0' * 16}-01",  # parent id all zero
    f"00-{SUITE_TRACE}-{SUITE_SPAN[:-1]}.-01",
    f"00-{SUITE_TRACE}-{SUITE_SPAN}0-01", f"00-{SUITE_TRACE}-{SUITE_SPAN[1:]}-01",
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-.0", f"00-{SUITE_TRACE}-{SUITE_SPAN}-010",
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-0",
    f"00-{SUITE_TRACE.upper().replace('1', 'A')}-{SUITE_SPAN}-01",  # §3.2.2.3: HEXDIGLC only
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-0A",
    f"00-{SUITE_TRACE}-{SUITE_SPAN}-01\n",
    "", "   ",
])
def test_invalid_traceparent_restarts_the_trace(value: str) -> None:
    """Test suite test_traceparent_*: each malformed value yields a newly generated trace id."""
    assert extract_tp(value) is None


@pytest.mark.parametrize("value", [
    f"cc-{SUITE_TRACE}-{SUITE_SPAN}-01",
    f"cc-{SUITE_TRACE}-{SUITE_SPAN}-01-what-the-future-will-be-like",
    f"01-{SUITE_TRACE}-{SUITE_SPAN}-01-",
])
def test_future_version_parses_the_first_55_characters(value: str) -> None:
    """§3.2.4 Versioning of traceparent; test suite test_traceparent_version_0xcc."""
    assert extract_tp(value) == SUITE_ID


@pytest.mark.parametrize("value", [
    f" {SUITE_PARENT}", f"\t{SUITE_PARENT}", f"{SUITE_PARENT} ", f"{SUITE_PARENT}\t",
    f"\t {SUITE_PARENT} \t",
])
def test_traceparent_ows_is_ignored(value: str) -> None:
    """Test suite test_traceparent_ows_handling."""
    assert extract_tp(value) == SUITE_ID


def test_unknown_flags_are_zeroed_random_flag_kept() -> None:
    """§3.2.2.5 trace-flags: other flags 'Vendors MUST set those to zero'; random-trace-id kept."""
    result = TraceContextFormat().extract(
        {"traceparent": [f"00-{SUITE_TRACE}-{SUITE_SPAN}-ff"]}, Rejections()
    )
    assert result is not None and not isinstance(result, bool)
    assert int(result.trace_flags) == 0x03


def test_random_flag_survives_the_gateway_hop() -> None:
    """Test suite test_propagates_random_flag; §3.2.2.5 Random Trace ID Flag."""
    _, out = Gateway().forward(
        propagator(), {"traceparent": [f"00-{SUITE_TRACE}-{SUITE_SPAN}-03"]}
    )
    assert out["traceparent"].startswith(f"00-{SUITE_TRACE}-")
    assert out["traceparent"].endswith("-03")


def test_tracestate_headers_are_combined_in_order() -> None:
    """§3.3 tracestate; test suite test_tracestate_multiple_headers_different_keys."""
    state = TraceContextFormat().extract(
        {"traceparent": [SUITE_PARENT],
         "tracestate": ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]},
        Rejections(),
    )
    assert state is not None and not isinstance(state, bool)
    assert state.trace_state.to_header() == "foo=1,bar=2,rojo=1,congo=2,baz=3"


@pytest.mark.parametrize(("headers", "expected"), [
    (("",), None),                                     # test_tracestate_empty_header
    (("foo=1", ""), {"foo": "1"}),
    (("", "foo=1"), {"foo": "1"}),
    (("foo=1 \t , \t bar=2, \t baz=3",), {"foo": "1", "bar": "2", "baz": "3"}),  # ows_handling
    (("\t foo=1 \t",), {"foo": "1"}),
    (("foo= 1",), {"foo": " 1"}),                      # Value: leading spaces are preserved
    (("foo=1,,, ,bar=2",), {"foo": "1", "bar": "2"}),  # empty list members are allowed
])
def test_tracestate_ows_and_empty_members(
    headers: tuple[str, ...], expected: dict[str, str] | None
) -> None:
    """§3.3 tracestate 'list': empty and whitespace-only members allowed, OWS ignored."""
    assert tracestate(*headers) == expected


@pytest.mark.parametrize("header", [
    "foo =1", "FOO=1", "foo.bar=1",           # test_tracestate_key_illegal_characters
    "@foo=1,bar=2",                           # test_tracestate_key_illegal_vendor_format
    "foo=bar=baz", "foo=,bar=3",              # test_tracestate_value_illegal_characters
    "foo=1,bar", "foo=a\tb", "foo=\x7f",
    f"foo=1,{'z' * 257}=1",  # test_tracestate_key_length_limit
    "foo=" + "v" * 257,                       # Value: up to 256 characters
])
def test_invalid_tracestate_member_discards_the_tracestate(header: str) -> None:
    """§3.3 'Key'/'Value' grammar: a malformed member discards the whole tracestate."""
    assert tracestate(header) is None


@pytest.mark.parametrize("key", [
    "foo@", "foo@@bar", "foo@bar@baz",        # test_tracestate_key_illegal_vendor_format
    "z" * 256, "t" * 241 + "@" + "v" * 14,    # test_tracestate_key_length_limit
    "t" * 242 + "@v", "t@" + "v" * 15,
    "1abc", "a-_*/0@x",
])
def test_current_key_grammar_accepts(key: str) -> None:
    """§3.3 Key: key = (lcalpha / DIGIT) 0*255(keychar), keychar includes '@'."""
    assert tracestate(f"foo=1,{key}=1") == {"foo": "1", key: "1"}


def test_all_allowed_characters() -> None:
    """Test suite test_tracestate_all_allowed_characters."""
    key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    value = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))
    assert tracestate(f"{key}={value}", f"{key}@a-z0-9_-*/={value}") == {
        key: value, f"{key}@a-z0-9_-*/": value,
    }


@pytest.mark.parametrize("key", ["foo@", "foo@@bar", "t@" + "v" * 15, "1abc"])
def test_opentelemetry_tracestate_is_stricter_than_the_spec(key: str) -> None:
    """Why we own the parser: TraceState.from_header drops the whole header for these keys."""
    assert len(TraceState.from_header([f"{key}=1,bar=2"])) == 0
    assert tracestate(f"{key}=1,bar=2") == {key: "1", "bar": "2"}


def test_duplicate_keys_keep_the_left_most() -> None:
    """Test suite test_tracestate_duplicated_keys (strict level 2): the tracestate is inherited
    with duplicates kept or de-duplicated; §3.5 'vendors MAY also discard duplicate keys'.
    OpenTelemetry's TraceState.from_header drops the whole tracestate instead."""
    assert tracestate("foo=1,foo=2") == {"foo": "1"}
    assert tracestate("foo=1", "foo=2") == {"foo": "1"}
    assert len(TraceState.from_header(["foo=1,foo=2"])) == 0


def test_member_count_limit() -> None:
    """Test suite test_tracestate_member_count_limit: 32 inherited, 33 discarded."""
    members = [f"bar{i:02d}={i:02d}" for i in range(1, 34)]
    assert len(tracestate(",".join(members[:32])) or {}) == 32
    assert tracestate(",".join(members[:10]), ",".join(members[10:])) is None


def test_tracestate_without_traceparent_is_discarded() -> None:
    """Test suite test_tracestate_included_traceparent_missing."""
    context = propagator().extract({"tracestate": ["foo=1"]})
    assert not span_context_of(context).is_valid


def test_tracestate_reaches_upstream_unchanged() -> None:
    """§3.5 Mutating the tracestate field: 'MUST send it to outgoing requests'; test suite
    test_tracestate_included_traceparent_included. The SDK copies the parent's tracestate
    to the gateway span, including keys OpenTelemetry's own grammar would reject."""
    header = "foo@=1,congo=t61rcWkgMzE,1a=x y"
    span, out = Gateway().forward(
        propagator(), as_carrier({"traceparent": SUITE_PARENT, "tracestate": header})
    )
    assert out["tracestate"] == header
    assert out["traceparent"] == f"00-{SUITE_TRACE}-{span.get_span_context().span_id:016x}-01"
    assert span.parent is not None and span.parent.span_id == int(SUITE_SPAN, 16)
