"""Rules: matching on route, path, method, header, tenant; precedence; describe; validation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.sampling import build_sampling
from tests.unit.policy.sampling.test_sampling_sampler import facts

RULES: list[dict[str, Any]] = [
    {"name": "health", "path_prefix": "/health", "ratio": 0.01},
    {"name": "checkout", "route": "checkout-route", "ratio": 1.0},
    {"name": "debug", "header": {"name": "X-Debug", "exact": "on"}, "ratio": 1.0},
    {"name": "canary", "header": {"name": "x-canary", "regex": "v[0-9]+"}, "ratio": 0.9},
    {"name": "deletes", "method": "delete", "ratio": 0.8},
    {"name": "acme", "tenant": "acme", "ratio": 0.1},
]




def policy(**kw: Any) -> Any:
    return build_sampling(SamplingSettings.model_validate(kw), environ={})


@pytest.mark.parametrize(
    ("kw", "rule", "ratio"),
    [
        ({"path": "/healthz"}, "health", 0.01),
        ({"path": "/health/live?x=1"}, "health", 0.01),
        ({"route": "checkout-route", "path": "/checkout"}, "checkout", 1.0),
        ({"headers": {"x-debug": ["off", "on"]}}, "debug", 1.0),
        ({"headers": {"x-canary": ["v12"]}}, "canary", 0.9),
        ({"method": "DELETE"}, "deletes", 0.8),
        ({"method": "delete"}, "deletes", 0.8),
        ({"tenant": "acme"}, "acme", 0.1),
    ],
)
def test_each_matcher(kw: dict[str, Any], rule: str, ratio: float) -> None:
    d = policy(rules=RULES, ratio=0.5).directive(facts(**kw))
    assert (d.source, d.rule, d.ratio) == ("rule", rule, ratio)


@pytest.mark.parametrize(
    "kw",
    [
        {"path": "/healt"},
        {"route": "checkout"},
        {"headers": {"x-debug": ["ON"]}},
        {"headers": {"x-canary": ["v12-beta"]}},  # regex is a full match
        {"headers": {"x-canary": ["v" + "1" * 5000]}},  # too long to match
        {"headers": {"x-debug": []}},
        {"method": "GET"},
        {"tenant": "acme2"},
    ],
)
def test_non_matching_falls_back_to_default(kw: dict[str, Any]) -> None:
    d = policy(rules=RULES, ratio=0.5).directive(facts(**kw))
    assert (d.source, d.rule, d.ratio) == ("default", None, 0.5)


def test_first_match_wins() -> None:
    d = policy(rules=RULES).directive(facts(path="/health", tenant="acme", method="DELETE"))
    assert d.rule == "health"


def test_all_conditions_of_a_rule_must_match() -> None:
    p = policy(rules=[{"path_prefix": "/api", "method": "POST", "ratio": 0.3}], ratio=1.0)
    assert p.directive(facts(path="/api/x", method="POST")).ratio == 0.3
    assert p.directive(facts(path="/api/x", method="GET")).ratio == 1.0


def test_rule_without_matchers_matches_all_and_gets_index_label() -> None:
    d = policy(rules=[{"ratio": 0.2}], ratio=1.0).directive(facts(path="/anything"))
    assert (d.rule, d.ratio) == ("#0", 0.2)


def test_precedence_route_then_rule_then_tenant_then_default() -> None:
    p = policy(
        ratio=0.5,
        rules=[{"path_prefix": "/checkout", "ratio": 1.0}],
        tenants={"acme": {"ratio": 0.1}},
    )
    both = facts(path="/checkout", tenant="acme")
    assert p.directive(facts(path="/checkout", tenant="acme", route_ratio=0.02)).source == "route"
    assert p.directive(facts(path="/checkout", tenant="acme", route_ratio=0.02)).ratio == 0.02
    assert (p.directive(both).source, p.directive(both).ratio) == ("rule", 1.0)
    assert (p.directive(facts(tenant="acme")).source, p.directive(facts(tenant="acme")).ratio) == (
        "tenant", 0.1)
    assert p.directive(facts(tenant="other")).source == "default"
    assert p.directive(facts(tenant="other")).tenant == "other"


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_invalid_route_ratio_is_ignored(bad: float) -> None:
    d = policy(ratio=0.5).directive(facts(route_ratio=bad))
    assert (d.source, d.ratio) == ("default", 0.5)


def test_reload_swaps_rules_and_old_directive_stays_consistent() -> None:
    p = policy(rules=[{"path_prefix": "/a", "ratio": 0.0}])
    old = p.directive(facts(path="/a"))
    p.reload(SamplingSettings.model_validate({"rules": [{"path_prefix": "/a", "ratio": 1.0}]}))
    assert p.directive(facts(path="/a")).ratio == 1.0
    assert (old.ratio, old.bound) == (0.0, 0)
    assert p.settings.rules[0].ratio == 1.0


def test_describe_lists_active_rules() -> None:
    p = policy(
        rules=RULES[:3], tenants={"acme": {"ratio": 0.1, "budget": {"traces_per_second": 50}}},
        global_budget={"traces_per_second": 200, "burst": 400},
    )
    described = p.describe()
    assert [r["name"] for r in described["rules"]] == ["health", "checkout", "debug"]
    assert described["rules"][0]["match"] == {"path_prefix": "/health"}
    assert described["rules"][2]["match"] == {"header": {"name": "x-debug", "exact": "on"}}
    assert described["tenants"]["acme"]["budget"]["traces_per_second"] == 50
    assert described["global_budget"] == {"traces_per_second": 200, "burst": 400}
    assert described["precedence"][0] == "route_ratio"
    assert json.loads(json.dumps(described)) == described  # JSON-able for the admin view


@pytest.mark.parametrize(
    "bad",
    [
        {"rules": [{"ratio": 1.1}]},
        {"rules": [{"path_prefix": "/x"}]},
        {"rules": [{"header": {"name": "a", "exact": "b", "regex": "c"}, "ratio": 1}]},
        {"rules": [{"header": {"name": "a"}, "ratio": 1}]},
        {"rules": [{"header": {"name": "a", "regex": "("}, "ratio": 1}]},
        {"rules": [{"paths": "/x", "ratio": 1}]},
        {"global_budget": {"traces_per_second": 0}},
        {"ratio": -1},
        {"unknown": 1},
    ],
)
def test_invalid_settings_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SamplingSettings.model_validate(bad)


def test_settings_are_frozen() -> None:
    s = SamplingSettings.model_validate({})
    with pytest.raises(ValidationError):
        setattr(s, "ratio", 0.5)  # noqa: B010
