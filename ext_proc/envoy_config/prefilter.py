"""The prefilter plan as Envoy runs it: ``match_delegate`` around the composite filter,
which builds the ext_proc filter for the requests it asks about.

`ext_proc.policy.sampling.prefilter` says which requests the sidecar would certainly not
sample; this module writes that as an ``xds.type.matcher.v3.Matcher`` whose matchers all
end in ``SkipFilter`` (Envoy does not run the wrapped filter: no stream, no cost). A
request no matcher matches reaches ``on_no_match``: the composite filter's
``ExecuteFilterAction`` builds the ext_proc filter for it, and it is asked, as before.
Each matcher is one way to be skipped:

- an unsampled parent: ``traceparent`` full-matches `UNSAMPLED_TRACEPARENT` and no other
  trace-context header is present;
- root entry i: no trace-context header, entry i's condition, no earlier entry's
  condition (first match wins), and the ``x-request-id`` bucket at or above entry i's
  threshold (`bucket_regex`).

A missing header gives the matcher no input, and a value matcher on no input does not
match, so "absent" is ``not_matcher`` of "any value" (checked on a real Envoy by
tests/e2e/test_prefilter.py). Envoy 1.40 wants ``google_re2: {}`` on every xds regex.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ext_proc.policy.sampling.prefilter import (
    PRECISION,
    REQUEST_ID,
    TRACEPARENT,
    UNSAMPLED_TRACEPARENT,
    Condition,
    PrefilterPlan,
    compile_prefilter,
)

if TYPE_CHECKING:
    from ext_proc.config import Settings

MATCH_DELEGATE_TYPE: Final = ("type.googleapis.com/"
                              "envoy.extensions.common.matching.v3.ExtensionWithMatcher")
COMPOSITE_FILTER: Final = "envoy.filters.http.composite"
COMPOSITE_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
PREFILTER_METADATA: Final = "x-extproc-otel-prefilter"  # gRPC initial metadata: the digest
_HEADER_INPUT: Final = "envoy.matching.inputs.request_headers"
_SKIP_ACTION: Final = "skip"
_ASK_ACTION: Final = "ask"
_HEX: Final = "0123456789abcdef"
# A traceparent with an all-zero trace or span id: invalid, so a root to the sidecar
INVALID_IDS: Final = "00-0{32}-.*|00-[0-9a-f]{32}-0{16}-.*"


def plan_for(settings: Settings) -> PrefilterPlan:
    """The plan these settings compile to (OTEL_TRACES_SAMPLER[_ARG] from this process)."""
    return compile_prefilter(settings.sampling, settings.tenants,
                             settings.propagation.extract, os.environ,
                             counted=settings.stream.join_access_log)


def _digit_class(low: int, high: int) -> str:
    """A class matching hex digits low..high in either case (low <= high)."""
    if low == high and _HEX[low].isdigit():
        return _HEX[low]
    digits = _HEX[low:high + 1]
    numeric = "".join(c for c in digits if c.isdigit())
    letters = "".join(c for c in digits if not c.isdigit())
    parts = []
    if numeric:
        parts.append(numeric[0] if len(numeric) == 1 else f"{numeric[0]}-{numeric[-1]}")
    for case in (letters.lower(), letters.upper()):
        if case:
            parts.append(case[0] if len(case) == 1 else f"{case[0]}-{case[-1]}")
    return "[" + "".join(parts) + "]"


def bucket_regex(threshold: int) -> str | None:
    """A full-match regex for ids whose bucket (first three hex digits) is >= `threshold`;
    None when nothing is (threshold 4096)."""
    if threshold >= PRECISION:
        return None
    digits = [(max(threshold, 0) >> shift) & 0xF for shift in (8, 4, 0)]
    any_hex = _digit_class(0, 15)
    branches = []
    for position, digit in enumerate(digits):
        last = position == len(digits) - 1
        low = digit if last else digit + 1
        if low > 15:
            continue
        head = "".join(_digit_class(d, d) for d in digits[:position])
        tail = any_hex * (len(digits) - position - 1)
        branches.append(head + _digit_class(low, 15) + tail)
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return body + ".*"


def skip_predicates(plan: PrefilterPlan) -> list[Any]:
    """One predicate per way to be skipped (empty when the plan skips nothing)."""
    if not plan.enabled:
        return []
    found = []
    if plan.skip_unsampled_parent:
        others = [h for h in plan.context_headers if h != TRACEPARENT]
        found.append(_all([_regex(TRACEPARENT, UNSAMPLED_TRACEPARENT),
                           _not(_regex(TRACEPARENT, INVALID_IDS)),  # the sidecar: a root
                           *[_absent(h) for h in others]]))
    no_context = [_absent(h) for h in plan.context_headers]
    # A tested header sent twice reaches the matcher joined with ",", while the sidecar
    # matches any one value: such roots are always asked.
    tested = sorted({e.when.header for e in plan.roots if e.when.header is not None})
    no_context += [_not(_regex(h, ".*,.*")) for h in tested]
    earlier: list[Condition] = []
    for entry in plan.roots:
        regex = bucket_regex(entry.threshold)
        if regex is not None:
            found.append(_all([*no_context, *_holds(entry.when),
                               *[_not(_all(_holds(c))) for c in earlier],
                               _regex(REQUEST_ID, regex)]))
        if entry.when == Condition():
            break  # every later entry is unreachable
        earlier.append(entry.when)
    return found


def wrap(plan: PrefilterPlan, http_filter: Any) -> Any:
    """`http_filter` (the ext_proc ``HttpFilter``) behind the plan's matcher, under the
    same name (per-route configs still reach it): ``match_delegate`` around Envoy's
    composite filter, which builds the ext_proc filter (`ExecuteFilterAction`) only for
    a request no matcher skips. ``match_delegate`` alone builds the filter it wraps for
    every request, skipped or not (docs/prefilter.md). Unchanged when the plan skips
    nothing."""
    from envoy_data_plane.envoy.config.core.v3 import TypedExtensionConfig
    from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
    from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
    from envoy_data_plane.envoy.extensions.filters.http.composite.v3 import (
        Composite,
        ExecuteFilterAction,
    )
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpFilter,
    )
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsExtension
    from envoy_data_plane.xds.type.matcher.v3 import (
        Matcher,
        MatcherMatcherList,
        MatcherMatcherListFieldMatcher,
        MatcherOnMatch,
    )

    predicates = skip_predicates(plan)
    if not predicates:
        return http_filter
    skip = MatcherOnMatch(action=XdsExtension(
        name=_SKIP_ACTION, typed_config=AnyMessage.pack(SkipFilter())))
    inner = TypedExtensionConfig(name=http_filter.name, typed_config=http_filter.typed_config)
    ask = MatcherOnMatch(action=XdsExtension(
        name=_ASK_ACTION, typed_config=AnyMessage.pack(ExecuteFilterAction(typed_config=inner))))
    matcher = Matcher(matcher_list=MatcherMatcherList(matchers=[
        MatcherMatcherListFieldMatcher(predicate=p, on_match=skip) for p in predicates]),
        on_no_match=ask)
    composite = TypedExtensionConfig(name=COMPOSITE_FILTER,
                                     typed_config=AnyMessage.pack(Composite()))
    return HttpFilter(name=http_filter.name, typed_config=AnyMessage.pack(
        ExtensionWithMatcher(xds_matcher=matcher, extension_config=composite)))


def unwrap(http_filter: dict[str, Any]) -> dict[str, Any]:
    """The typed_config of the filter `http_filter` runs: through a prefilter's
    ``match_delegate`` (and the composite filter's action, when it has one)."""
    config: dict[str, Any] = http_filter.get("typed_config", {})
    if config.get("@type") != MATCH_DELEGATE_TYPE:
        return config
    inner: dict[str, Any] = config.get("extension_config", {}).get("typed_config", {})
    if inner.get("@type") == COMPOSITE_TYPE:
        action = config.get("xds_matcher", {}).get("on_no_match", {}).get("action", {})
        executed: dict[str, Any] = action.get("typed_config", {}).get(
            "typed_config", {}).get("typed_config", {})
        return executed
    return inner


EG_NO_MATCHER: Final = ("Envoy Gateway's EnvoyExtensionPolicy has no matcher (see "
                        "docs/attach-istio-envoy-gateway.md): Envoy asks about every request")


def comment(plan: PrefilterPlan, *, carried: bool = True) -> str:
    """The YAML comment that heads a printed config: what Envoy skips, or why it asks
    about every request (`carried`: the format can hold the wrapper)."""
    if plan.enabled and not carried:
        return f"# extproc-otel prefilter off: {EG_NO_MATCHER}\n"
    if not plan.enabled:
        return f"# extproc-otel prefilter off: {plan.why}\n"
    return f"# extproc-otel prefilter {plan.digest()}: {plan.why}\n"


def _holds(when: Condition) -> list[Any]:
    """The predicates that together say `when` holds (none for the empty condition)."""
    from envoy_data_plane.xds.type.matcher.v3 import StringMatcher

    parts = []
    if when.path_prefix is not None:
        parts.append(_single(":path", StringMatcher(prefix=when.path_prefix)))
    if when.method is not None:
        parts.append(_single(":method", StringMatcher(exact=when.method, ignore_case=True)))
    if when.header is not None and when.exact is not None:
        parts.append(_single(when.header, StringMatcher(exact=when.exact)))
    if when.header is not None and when.regex is not None:
        parts.append(_regex(when.header, when.regex))
    return parts


def _single(header: str, value: Any) -> Any:
    from envoy_data_plane.envoy.type.matcher.v3 import HttpRequestHeaderMatchInput
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.xds.core.v3 import TypedExtensionConfig
    from envoy_data_plane.xds.type.matcher.v3 import (
        MatcherMatcherListPredicate,
        MatcherMatcherListPredicateSinglePredicate,
    )

    source = TypedExtensionConfig(name=_HEADER_INPUT, typed_config=AnyMessage.pack(
        HttpRequestHeaderMatchInput(header_name=header)))
    return MatcherMatcherListPredicate(single_predicate=MatcherMatcherListPredicateSinglePredicate(
        input=source, value_match=value))


def _regex(header: str, regex: str) -> Any:
    from envoy_data_plane.xds.type.matcher.v3 import (
        RegexMatcher,
        RegexMatcherGoogleRe2,
        StringMatcher,
    )

    return _single(header, StringMatcher(safe_regex=RegexMatcher(
        google_re2=RegexMatcherGoogleRe2(), regex=regex)))


def _absent(header: str) -> Any:
    return _not(_regex(header, ".*"))  # no input (header missing) never matches a value


def _not(predicate: Any) -> Any:
    from envoy_data_plane.xds.type.matcher.v3 import MatcherMatcherListPredicate

    return MatcherMatcherListPredicate(not_matcher=predicate)


def _all(predicates: Sequence[Any]) -> Any:
    """AND of `predicates` (an and_matcher needs two or more). Never called empty: a
    root predicate always tests the bucket, a parent one the traceparent."""
    from envoy_data_plane.xds.type.matcher.v3 import (
        MatcherMatcherListPredicate,
        MatcherMatcherListPredicatePredicateList,
    )

    if len(predicates) == 1:
        return predicates[0]
    return MatcherMatcherListPredicate(
        and_matcher=MatcherMatcherListPredicatePredicateList(predicate=list(predicates)))
