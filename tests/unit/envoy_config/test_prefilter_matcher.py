"""The prefilter plan rendered as Envoy's match_delegate matcher (issue #18, item 1).

`xds_skips` evaluates the printed matcher the way Envoy's xds matcher does (first
matching matcher_list entry; a missing header is no input, which no value matcher
matches); `plan_skips` is the plan's semantics written out plainly. The two must agree
on every request of a grid that crosses each part of each condition with the buckets
around each threshold. Real-Envoy behaviour: tests/e2e/test_prefilter.py.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from ext_proc.config import Settings, load_settings
from ext_proc.dev.devstack import envoy_binary
from ext_proc.envoy_config import (
    EXT_PROC_FILTER,
    FORMATS,
    PREFILTER_METADATA,
    Format,
    options_for,
    plan_for,
    render,
    snippet,
    unwrap,
)
from ext_proc.envoy_config.embed import envoy_configs, envoy_validate
from ext_proc.envoy_config.prefilter import MATCH_DELEGATE_TYPE, bucket_regex
from ext_proc.policy.sampling.prefilter import (
    UNSAMPLED_TRACEPARENT,
    Condition,
    PrefilterPlan,
    bucket,
)

Request = Mapping[str, str]  # lower-case header name -> value, with :path and :method
HEXES = [f"{v:03x}" for v in range(4096)]

RICH: dict[str, Any] = {
    "sampling": {
        "ratio": 0.01,
        "rules": [
            {"name": "api-post", "path_prefix": "/api", "method": "POST", "ratio": 0.5},
            {"name": "canary", "header": {"name": "x-canary", "exact": "yes"}, "ratio": 1.0},
            {"name": "beta", "header": {"name": "x-ver", "regex": "b[0-9]+"}, "ratio": 0.2},
            {"name": "api", "path_prefix": "/api", "ratio": 0.1},
        ],
        "tenants": {"gold": {"ratio": 0.75}, "free": {"ratio": 0.0}},
    },
    "tenants": {"header": "x-tenant"},
}


def test_bucket_regex_matches_exactly_the_buckets_at_or_above() -> None:
    """Every threshold 0..4096 against every 3-hex-digit prefix, in lower, upper and mixed
    case (Python's re standing in for RE2: the regex uses only classes and alternation)."""
    assert bucket_regex(4096) is None
    texts = ["\n".join(case(h) + "0-1111-4aaa-8bbb" for h in HEXES) for case in (
        str.lower, str.upper, lambda h: h[0].upper() + h[1].lower() + h[2].upper())]
    for threshold in range(4096):
        regex = bucket_regex(threshold)
        assert regex is not None
        found = re.compile(f"(?m)^(?:{regex})$").findall
        want = HEXES[threshold:]
        for text in texts:
            assert [m[:3].lower() for m in found(text)] == want, threshold


def test_bucket_regex_needs_three_hex_digits() -> None:
    regex = re.compile(str(bucket_regex(0)))
    assert not regex.fullmatch("")
    assert not regex.fullmatch("ff")
    assert not regex.fullmatch("fg0")
    assert regex.fullmatch("fff")


def _header(request: Request, name: str) -> str | None:
    return request.get(name)


def _value_matches(value: str | None, matcher: Mapping[str, Any]) -> bool:
    if value is None:
        return False  # no input: no value matcher matches
    if "safe_regex" in matcher:
        assert matcher["safe_regex"]["google_re2"] == {}
        return re.fullmatch(matcher["safe_regex"]["regex"], value) is not None
    fold = (lambda s: s.lower()) if matcher.get("ignore_case") else (lambda s: s)
    if "exact" in matcher:
        return fold(value) == fold(matcher["exact"])
    if "prefix" in matcher:
        return fold(value).startswith(fold(matcher["prefix"]))
    raise AssertionError(f"unexpected value matcher {matcher}")


def _holds(predicate: Mapping[str, Any], request: Request) -> bool:
    if "single_predicate" in predicate:
        single = predicate["single_predicate"]
        config = single["input"]["typed_config"]
        assert config["@type"].endswith("envoy.type.matcher.v3.HttpRequestHeaderMatchInput")
        return _value_matches(_header(request, config["header_name"]), single["value_match"])
    if "and_matcher" in predicate:
        parts = predicate["and_matcher"]["predicate"]
        assert len(parts) >= 2
        return all(_holds(p, request) for p in parts)
    if "or_matcher" in predicate:
        return any(_holds(p, request) for p in predicate["or_matcher"]["predicate"])
    return not _holds(predicate["not_matcher"], request)


def xds_skips(http_filter: Mapping[str, Any], request: Request) -> bool:
    """What Envoy does with the printed filter: True when SkipFilter fires."""
    config = http_filter["typed_config"]
    if config["@type"] != MATCH_DELEGATE_TYPE:
        return False
    for matcher in config["xds_matcher"]["matcher_list"]["matchers"]:
        if _holds(matcher["predicate"], request):
            action = matcher["on_match"]["action"]["typed_config"]["@type"]
            return action.endswith("filters.common.matcher.action.v3.SkipFilter")
    return False


def _condition_holds(when: Condition, request: Request) -> bool:
    path, method = request[":path"], request[":method"]
    value = request.get(when.header) if when.header else None
    return ((when.path_prefix is None or path.startswith(when.path_prefix))
            and (when.method is None or method.upper() == when.method.upper())
            and (when.exact is None or value == when.exact)
            and (when.regex is None or (value is not None
                                        and re.fullmatch(when.regex, value) is not None)))


def plan_skips(plan: PrefilterPlan, request: Request) -> bool:
    """The plan's semantics (prefilter.py) as plainly as they can be written."""
    if not plan.enabled:
        return False
    present = [h for h in plan.context_headers if h in request]
    if present:
        return (plan.skip_unsampled_parent and present == ["traceparent"]
                and re.fullmatch(UNSAMPLED_TRACEPARENT, request["traceparent"]) is not None)
    value = bucket(request.get("x-request-id"))
    if value is None:
        return False
    entry = next(e for e in plan.roots if _condition_holds(e.when, request))
    return value >= entry.threshold


def _ids(plan: PrefilterPlan) -> list[str | None]:
    """Request ids on both sides of every threshold, in both cases, and malformed ones."""
    ids: list[str | None] = [None, "", "zz1", "12", "12g"]
    for entry in plan.roots:
        for value in (entry.threshold - 1, entry.threshold):
            if 0 <= value < 4096:
                ids += [f"{value:03x}9a7c-0000", f"{value:03X}9A7C-0000"]
    return ids


def _grid(plan: PrefilterPlan) -> list[dict[str, str]]:
    contexts: list[dict[str, str]] = [
        {}, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-00"},
        {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
        {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-00", "b3": "1"},
        {"traceparent": "00-" + "A" * 32 + "-" + "b" * 16 + "-00"},  # not lower-case hex
        {"x-b3-sampled": "0"}, {"grpc-trace-bin": ""}]
    requests = []
    for context, path, method, extra, rid in itertools.product(
            contexts, ["/", "/api/x", "/apix", "/other"], ["GET", "post"],
            [{}, {"x-canary": "yes"}, {"x-canary": "no"}, {"x-ver": "b12"}, {"x-ver": "b"},
             {"x-tenant": "gold"}, {"x-tenant": "free"}, {"x-tenant": "gold", "x-ver": "b1"}],
            _ids(plan)):
        request = {":path": path, ":method": method, **context, **extra}
        if rid is not None:
            request["x-request-id"] = rid
        requests.append(request)
    return requests


def _filter(settings: Settings) -> dict[str, Any]:
    (flt,) = snippet(settings, options_for(settings))["http_filters"]
    assert flt["name"] == EXT_PROC_FILTER
    result: dict[str, Any] = flt
    return result


@pytest.mark.parametrize("config", [
    RICH,
    {"sampling": {"ratio": 0.1}},
    {"sampling": {"ratio": 0.0, "parent_based": False}},
    {"sampling": {"ratio": 0.3, "rules": [{"method": "GET", "ratio": 0.9},
                                          {"path_prefix": "/api", "ratio": 0.0}]}},
    {"sampling": {"ratio": 0.05}, "propagation": {"extract": ["tracecontext"]}},
], ids=["rich", "ratio", "zero-no-parents", "catch-all-rule", "w3c-only"])
def test_the_matcher_skips_exactly_what_the_plan_says(config: dict[str, Any]) -> None:
    settings = load_settings(**config)
    plan, flt = plan_for(settings), _filter(settings)
    requests = _grid(plan)
    decisions = [xds_skips(flt, r) for r in requests]
    assert decisions == [plan_skips(plan, r) for r in requests]
    assert any(decisions) and not all(decisions)


def test_the_rich_plan_has_every_kind_of_entry() -> None:
    """The grid above would prove little if the plan had nothing but a default."""
    plan = plan_for(load_settings(**RICH))
    assert plan.skip_unsampled_parent
    labels = [e.label for e in plan.roots]
    assert labels == ["rule api-post", "rule canary", "rule beta", "rule api", "tenant free",
                      "tenant gold", "default"]


def test_a_plan_that_skips_nothing_leaves_the_filter_bare_but_names_its_digest() -> None:
    settings = load_settings(sampling={"ratio": 1.0, "parent_based": False})
    flt = _filter(settings)
    assert flt["typed_config"]["@type"].endswith("ext_proc.v3.ExternalProcessor")
    assert flt["typed_config"]["grpc_service"]["initial_metadata"] == [
        {"key": PREFILTER_METADATA, "value": plan_for(settings).digest()}]


@pytest.mark.parametrize("sampling", [{"prefilter": False}, {"keep_errors": {"enabled": True}}])
def test_off_gives_the_bare_filter_and_says_why(sampling: dict[str, Any]) -> None:
    settings = load_settings(sampling={"ratio": 0.01, **sampling})
    flt = _filter(settings)
    assert flt["typed_config"]["@type"].endswith("ext_proc.v3.ExternalProcessor")
    assert "initial_metadata" not in flt["typed_config"]["grpc_service"]
    for fmt in FORMATS:
        text = render(fmt, settings, options_for(settings))
        first = text.splitlines()[0]
        assert first == f"# extproc-otel prefilter off: {plan_for(settings).why}"
        assert MATCH_DELEGATE_TYPE not in text


def test_envoy_gateway_says_it_cannot_carry_the_prefilter() -> None:
    settings = load_settings(**RICH)
    text = render("envoy-gateway", settings, options_for(settings))
    assert text.startswith("# extproc-otel prefilter off: Envoy Gateway's EnvoyExtensionPolicy")
    assert MATCH_DELEGATE_TYPE not in text


def test_on_names_the_digest_on_the_stream_and_in_the_comment() -> None:
    settings = load_settings(**RICH)
    plan = plan_for(settings)
    inner = unwrap(_filter(settings))
    assert inner["grpc_service"]["initial_metadata"] == [
        {"key": PREFILTER_METADATA, "value": plan.digest()}]
    text = render("bootstrap", settings, options_for(settings))
    assert text.startswith(f"# extproc-otel prefilter {plan.digest()}: ")


@pytest.mark.parametrize("prefilter", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_envoy_accepts_every_format_with_and_without_the_wrapper(fmt: Format,
                                                                 prefilter: bool) -> None:
    settings = load_settings(sampling={**RICH["sampling"], "prefilter": prefilter},
                             tenants=RICH["tenants"])
    text = render(fmt, settings, options_for(settings))
    configs = [c for doc in yaml.safe_load_all(text) if doc for c in envoy_configs(doc)]
    assert configs
    wrapped = [c for c in configs if MATCH_DELEGATE_TYPE in yaml.safe_dump(c)]
    assert bool(wrapped) is (prefilter and fmt != "envoy-gateway")
    for config in configs:
        verdict = envoy_validate(config, envoy_binary())
        assert verdict.ok, verdict.output[-2000:]


def test_a_traceparent_with_zero_ids_is_asked_the_sidecar_takes_it_for_a_root() -> None:
    flt = _filter(load_settings(sampling={"ratio": 1.0}))
    tp = "00-{}-{}-00"
    ok = {":path": "/", ":method": "GET", "x-request-id": "fff"}
    assert xds_skips(flt, {**ok, "traceparent": tp.format("ab" * 16, "cd" * 8)})
    assert not xds_skips(flt, {**ok, "traceparent": tp.format("0" * 32, "cd" * 8)})
    assert not xds_skips(flt, {**ok, "traceparent": tp.format("ab" * 16, "0" * 16)})


def test_a_repeated_tested_header_is_asked() -> None:
    """Envoy joins a repeated header with ',': the sidecar matches any one value, so such
    a root must be asked (here: tenant gold at 0.75 over a default of 0.01; bucket 256)."""
    flt = _filter(load_settings(**RICH))
    root = {":path": "/x", ":method": "GET", "x-request-id": "10000000"}
    assert xds_skips(flt, {**root, "x-tenant": "free"})
    assert not xds_skips(flt, {**root, "x-tenant": "gold"})
    assert not xds_skips(flt, {**root, "x-tenant": "gold,gold"})
    assert not xds_skips(flt, {**root, "x-canary": "no,yes"})


def test_a_request_with_any_formats_context_header_is_not_a_root() -> None:
    """A route may extract a format the global settings do not (x-extproc-otel-extract)."""
    flt = _filter(load_settings(sampling={"ratio": 0.0},
                                propagation={"extract": ["tracecontext"]}))
    root = {":path": "/x", ":method": "GET", "x-request-id": "fff00000"}
    assert xds_skips(flt, root)
    for header in ("b3", "x-b3-traceid", "uber-trace-id", "grpc-trace-bin"):
        assert not xds_skips(flt, {**root, header: "1"}), header
