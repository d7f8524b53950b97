"""W3C Baggage (https://www.w3.org/TR/baggage/, baggage/HTTP_HEADER_FORMAT.md)."""

from __future__ import annotations

import pytest
from prop_support import SUITE_PARENT, propagator

from ext_proc.policy.propagation import Rejections, baggage_members
from ext_proc.policy.propagation.baggage import Baggage


def members(*headers: str, rejections: Rejections | None = None) -> tuple[str, ...]:
    return baggage_members(propagator(rejections).extract({"baggage": list(headers)}))


def test_spec_example_passes_through_unchanged_with_properties() -> None:
    """§3.3.4 Example: 3 list-members with properties; members travel as they arrived."""
    header = (
        "key1=value1;property1;property2, key2 = value2, "
        "key3=value3; propertyKey=propertyValue"
    )
    assert members(header) == (
        "key1=value1;property1;property2",
        "key2 = value2",
        "key3=value3; propertyKey=propertyValue",
    )


def test_multiple_headers_combine() -> None:
    """§3.2 'Multiple baggage headers are allowed'; limits apply to the combination."""
    assert members("userId=alice", "serverNode=DF%2028,isProduction=false") == (
        "userId=alice", "serverNode=DF%2028", "isProduction=false",
    )


def test_duplicate_keys_are_kept_in_order() -> None:
    """§3.3.1 baggage-string: uniqueness of keys is not guaranteed; order SHOULD be preserved."""
    assert members("a=1,a=2") == ("a=1", "a=2")


@pytest.mark.parametrize("bad", ["novalue", "k=a b", 'k="q"', "k=a\\b", "=v", "k =v;;", "ke y=v"])
def test_malformed_members_are_dropped_and_counted(bad: str) -> None:
    """§4 Mutating baggage: for a malformed baggage-string an implementation MAY remove the
    offending list-member and propagate the rest (baggage-octet excludes space, DQUOTE,
    backslash; key is an RFC 7230 token)."""
    rejections = Rejections()
    assert members(f"a=1,{bad},b=2", rejections=rejections) == ("a=1", "b=2")
    assert rejections.snapshot() == {"baggage": 1}


def test_empty_value_and_equals_in_value_are_valid() -> None:
    """§3.3.1 value = *baggage-octet (may be empty); value MAY contain '=' code points."""
    assert members("a=,b=x=y") == ("a=", "b=x=y")


def test_64_members_and_8192_bytes_are_always_propagated() -> None:
    """§3.3.2 Limits: MUST propagate all members when <= 64 members and <= 8192 bytes."""
    # 64 members, combined exactly 8192 bytes: 64 * 127 + 63 commas = 8191, + 1 byte more.
    items = [f"k{i:02d}={'v' * 123}" for i in range(64)]
    items[0] += "v"
    header = ",".join(items)
    assert len(header.encode()) == 8192
    assert members(header) == tuple(items)


def test_beyond_limits_whole_members_are_dropped() -> None:
    """§3.3.2 Limits: MAY drop members until both hold; MUST NOT propagate partial members."""
    rejections = Rejections()
    items = [f"k{i}=v" for i in range(70)]
    kept = members(",".join(items), rejections=rejections)
    assert kept == tuple(items[:64])
    assert rejections.snapshot() == {"baggage": 6}
    big = "b=" + "x" * 8190
    assert members(f"a=1,{big},c=3") == ("a=1", "c=3")  # never truncated, later ones still fit


def test_configurable_higher_limits() -> None:
    """§3.3.2 'An implementor ... MAY define higher limits'."""
    limited = Baggage(max_members=100).limit([f"k{i}=v" for i in range(70)], Rejections())
    assert len(limited) == 70


def test_baggage_is_passed_through_to_upstream() -> None:
    """§4 'A system receiving a baggage request header SHOULD send it to outgoing requests.'"""
    prop = propagator()
    context = prop.extract({"baggage": ["a=1;p=q", " b = 2 "]})
    out: dict[str, str] = {}
    prop.inject(context, out)
    assert out == {"baggage": "a=1;p=q,b = 2"}


def test_jaeger_baggage_is_merged_w3c_wins() -> None:
    """uberctx-* members are appended after the W3C members; a same-named W3C member wins."""
    prop = propagator()
    context = prop.extract({
        "traceparent": [SUITE_PARENT], "baggage": ["a=1"],
        "uberctx-a": ["2"], "uberctx-user": ["J%C3%BCrgen%20X"],
    })
    assert baggage_members(context) == ("a=1", "user=J%C3%BCrgen%20X")


def test_uberctx_ignored_without_jaeger_extraction() -> None:
    prop = propagator(extract=("tracecontext", "baggage"))
    assert baggage_members(prop.extract({"uberctx-a": ["1"]})) == ()


def test_baggage_not_read_unless_configured() -> None:
    prop = propagator(extract=("tracecontext",))
    assert baggage_members(prop.extract({"baggage": ["a=1"]})) == ()
