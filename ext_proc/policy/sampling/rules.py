"""Sampling rules compiled once into matchers; first match wins."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ext_proc.config.sampling import SamplingRule
from ext_proc.policy.sampling.directive import RequestFacts

TRACE_ID_LIMIT: Final = (1 << 64) - 1
MAX_MATCHED_VALUE_LEN: Final = 4096


def bound_for(ratio: float) -> int:
    """Upper bound on the low 64 trace-id bits for `ratio` (as the SDK's TraceIdRatioBased)."""
    return round(ratio * (TRACE_ID_LIMIT + 1))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    label: str
    ratio: float
    bound: int
    route: str | None
    path_prefix: str | None
    method: str | None
    header_name: str | None
    header_exact: str | None
    header_regex: re.Pattern[str] | None
    tenant: str | None

    def matches(self, facts: RequestFacts) -> bool:
        if self.route is not None and facts.route != self.route:
            return False
        if self.path_prefix is not None and not facts.path.startswith(self.path_prefix):
            return False
        if self.method is not None and facts.method.upper() != self.method:
            return False
        if self.tenant is not None and facts.tenant != self.tenant:
            return False
        if self.header_name is not None:
            return self._header_matches(facts.headers)
        return True

    def _header_matches(self, headers: Mapping[str, list[str]]) -> bool:
        values = headers.get(self.header_name or "")
        if not values:
            return False
        for value in values:
            if self.header_exact is not None:
                if value == self.header_exact:
                    return True
            elif (
                self.header_regex is not None
                and len(value) <= MAX_MATCHED_VALUE_LEN
                and self.header_regex.fullmatch(value) is not None
            ):
                return True
        return False


def compile_rule(index: int, rule: SamplingRule) -> CompiledRule:
    header = rule.header
    return CompiledRule(
        label=rule.name or f"#{index}",
        ratio=rule.ratio,
        bound=bound_for(rule.ratio),
        route=rule.route,
        path_prefix=rule.path_prefix,
        method=rule.method,
        header_name=header.name if header else None,
        header_exact=header.exact if header else None,
        header_regex=re.compile(header.regex) if header and header.regex is not None else None,
        tenant=rule.tenant,
    )


def first_match(rules: tuple[CompiledRule, ...], facts: RequestFacts) -> CompiledRule | None:
    for rule in rules:
        if rule.matches(facts):
            return rule
    return None


def describe_rule(rule: SamplingRule, index: int) -> dict[str, Any]:
    described: dict[str, Any] = {"name": rule.name or f"#{index}", "ratio": rule.ratio}
    match = rule.model_dump(exclude={"name", "ratio"}, exclude_none=True)
    described["match"] = match or "all"
    return described
