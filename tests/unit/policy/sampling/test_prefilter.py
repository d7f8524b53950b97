"""The prefilter plan: which requests Envoy may skip, and the sidecar's matching decision."""

from __future__ import annotations

import uuid

import pytest

from ext_proc.config.sampling import SamplingSettings, TenantSettings
from ext_proc.policy.sampling.prefilter import (
    PRECISION,
    Condition,
    bucket,
    compile_prefilter,
    root_sampled,
    threshold,
)

EXTRACT = ("tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage")


def _plan(sampling: dict[str, object] | None = None, tenants: dict[str, object] | None = None,
          env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return compile_prefilter(SamplingSettings.model_validate(sampling or {}),
                             TenantSettings.model_validate(tenants or {}), EXTRACT, env)


def test_bucket_is_the_first_three_hex_digits() -> None:
    assert bucket("fff0aa00-0000-4000-8000-000000000000") == 4095
    assert bucket("000f") == 0
    assert bucket("A1b-x") == 0xA1B
    assert bucket("zz1") is None and bucket("12") is None and bucket(None) is None


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (1.0, PRECISION), (0.01, 41),
                                                 (0.1, 410), (0.5, 2048)])
def test_threshold_rounds_up(ratio: float, expected: int) -> None:
    assert threshold(ratio) == expected
    assert threshold(ratio) / PRECISION >= ratio


def test_root_decision_is_the_bucket_below_the_threshold() -> None:
    assert root_sampled("028a", 0.01) is True   # bucket 40 < 41
    assert root_sampled("029a", 0.01) is False  # bucket 41
    assert root_sampled("nothex", 0.5) is None
    ids = [str(uuid.uuid4()) for _ in range(4000)]
    share = sum(bool(root_sampled(i, 0.1)) for i in ids) / len(ids)
    assert 0.08 < share < 0.12


def test_default_plan_skips_unsampled_parents_and_roots_by_ratio() -> None:
    plan = _plan({"ratio": 0.01})
    assert plan.enabled and plan.skip_unsampled_parent
    assert "traceparent" in plan.context_headers and "uber-trace-id" in plan.context_headers
    (default,) = plan.roots
    assert default.when == Condition() and default.threshold == 41


def test_env_sampler_sets_the_default_ratio_when_no_rules() -> None:
    plan = _plan(env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})
    assert plan.roots[-1].threshold == 410
    assert not plan.skip_unsampled_parent  # traceidratio does not follow parents


def test_off_and_keep_errors_ask_about_everything() -> None:
    assert not _plan({"prefilter": False}).enabled
    keep = _plan({"keep_errors": {"enabled": True}})
    assert not keep.enabled and "keep_errors" in keep.why


def test_expressible_rules_and_header_tenants_become_entries_in_order() -> None:
    plan = _plan({"ratio": 0.01, "rules": [
        {"name": "checkout", "path_prefix": "/checkout", "ratio": 1.0},
        {"method": "post", "header": {"name": "X-Debug", "exact": "1"}, "ratio": 0.5}],
        "tenants": {"acme": {"ratio": 0.2}}}, {"header": "x-tenant", "order": ["header"]})
    assert [(e.label, e.threshold) for e in plan.roots] == [
        ("rule checkout", PRECISION), ("rule #1", 2048), ("tenant acme", 820), ("default", 41)]
    assert plan.roots[1].when == Condition(method="POST", header="x-debug", exact="1")
    assert plan.roots[2].when == Condition(header="x-tenant", exact="acme")


def test_what_envoy_cannot_test_errs_towards_asking() -> None:
    jwt = _plan({"ratio": 0.01, "tenants": {"vip": {"ratio": 0.5}}}, {"jwt_claim": "org"})
    assert [e.threshold for e in jwt.roots] == [2048]
    assert any("tenant" in a for a in jwt.asks)
    by_route = _plan({"ratio": 0.01, "rules": [
        {"path_prefix": "/a", "ratio": 0.02}, {"route": "payments", "ratio": 0.9},
        {"path_prefix": "/b", "ratio": 0.3}]})
    assert [(e.label, e.threshold) for e in by_route.roots] == [
        ("rule #0", 82), ("default", threshold(0.9))]
    lookaround = _plan({"ratio": 0.0, "rules": [
        {"header": {"name": "x", "regex": "(?!no).*"}, "ratio": 0.4}]})
    assert [e.threshold for e in lookaround.roots] == [threshold(0.4)]


def test_digest_changes_with_what_envoy_is_told() -> None:
    assert _plan({"ratio": 0.01}).digest() == _plan({"ratio": 0.01}).digest()
    assert _plan({"ratio": 0.01}).digest() != _plan({"ratio": 0.02}).digest()
    assert _plan({"ratio": 0.01}).describe()["digest"] == _plan({"ratio": 0.01}).digest()


def test_rules_and_tenants_the_sidecar_can_never_match_are_left_out() -> None:
    plan = _plan({"ratio": 1.0, "rules": [
        {"name": "query", "path_prefix": "/search?q=", "ratio": 0.0},
        {"name": "spaced", "tenant": "acme corp", "ratio": 0.0}],
        "tenants": {"x" * 70: {"ratio": 0.0}, "bad id": {"ratio": 0.0}}},
        {"header": "x-tenant", "order": ["header"]})
    assert [(e.label, e.threshold) for e in plan.roots] == [("default", PRECISION)]


def test_without_the_access_log_join_envoy_asks_about_everything() -> None:
    plan = compile_prefilter(SamplingSettings(ratio=0.01), TenantSettings(), EXTRACT,
                             counted=False)
    assert not plan.enabled and "join_access_log" in plan.why


def test_the_digest_ignores_labels_and_explanations() -> None:
    named = _plan({"ratio": 0.01, "rules": [{"name": "a", "path_prefix": "/a", "ratio": 0.5}]})
    renamed = _plan({"ratio": 0.00999, "rules": [
        {"name": "b", "path_prefix": "/a", "ratio": 0.5}]})  # the same threshold: 41
    assert named.roots[-1].threshold == renamed.roots[-1].threshold
    assert named.digest() == renamed.digest()
