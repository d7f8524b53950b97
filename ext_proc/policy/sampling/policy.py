"""`SamplingPolicy`: compiled rules and budgets behind one atomically swapped snapshot.

Ratio precedence for a request: the per-route override (``route_ratio``, from
Envoy route metadata), then the first matching rule, then the tenant's ratio,
then the default ratio. ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` set
the default ratio and parent-following when no rules are configured and the
settings leave ``ratio``/``parent_based`` unset.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from loguru import logger

from ext_proc.config.sampling import SamplingSettings
from ext_proc.policy.sampling.budget import Clock, TenantBudgets
from ext_proc.policy.sampling.directive import DirectiveSource, RequestFacts, SamplingDirective
from ext_proc.policy.sampling.rules import (
    CompiledRule,
    bound_for,
    compile_rule,
    describe_rule,
    first_match,
)
from ext_proc.policy.sampling.sampler import GatewaySampler

ENV_SAMPLER: Final = "OTEL_TRACES_SAMPLER"
ENV_SAMPLER_ARG: Final = "OTEL_TRACES_SAMPLER_ARG"
_DEFAULT_SAMPLER: Final = "parentbased_always_on"
# name -> (follows parent, fixed ratio or None when the ratio comes from the arg)
_ENV_SAMPLERS: Final[Mapping[str, tuple[bool, float | None]]] = {
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


@dataclass(frozen=True, slots=True)
class EnvSampler:
    name: str
    follow_parent: bool
    ratio: float


def sampler_from_env(environ: Mapping[str, str]) -> EnvSampler:
    """Read the standard OTel variables; unknown names or bad args fall back with a warning."""
    name = environ.get(ENV_SAMPLER, _DEFAULT_SAMPLER).strip().lower() or _DEFAULT_SAMPLER
    if name not in _ENV_SAMPLERS:
        logger.warning("unsupported sampler in env, using default", variable=ENV_SAMPLER,
                       value=name, default=_DEFAULT_SAMPLER)
        name = _DEFAULT_SAMPLER
    follow, ratio = _ENV_SAMPLERS[name]
    if ratio is None:
        ratio = _ratio_arg(environ.get(ENV_SAMPLER_ARG))
    return EnvSampler(name, follow, ratio)


def _ratio_arg(text: str | None) -> float:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        logger.warning("bad sampler argument, using 1.0", variable=ENV_SAMPLER_ARG, value=text)
        return 1.0
    return value


class _Snapshot:
    """Everything `directive` needs, built once per settings version."""

    def __init__(self, settings: SamplingSettings, clock: Clock, env: Mapping[str, str]) -> None:
        self.settings = settings
        env_sampler = None if settings.rules else sampler_from_env(env)
        self.ratio_source = "settings"
        if settings.ratio is not None:
            self.ratio = settings.ratio
        elif env_sampler is not None:
            self.ratio = env_sampler.ratio
            self.ratio_source = (f"env:{env_sampler.name}" if env.get(ENV_SAMPLER)
                                 else f"default:{env_sampler.name}")
        else:
            self.ratio = 1.0
        self.follow_parent = (
            settings.parent_based if settings.parent_based is not None
            else env_sampler.follow_parent if env_sampler is not None else True
        )
        self.record_unsampled = settings.keep_errors.enabled
        self.rules: tuple[CompiledRule, ...] = tuple(
            compile_rule(i, rule) for i, rule in enumerate(settings.rules)
        )
        self.tenant_ratios: dict[str, tuple[float, int]] = {
            tenant: (p.ratio, bound_for(p.ratio))
            for tenant, p in settings.tenants.items() if p.ratio is not None
        }
        self.budgets = TenantBudgets(
            {tenant: p.budget for tenant, p in settings.tenants.items()},
            settings.tenant_budget, settings.global_budget, settings.max_tenants, clock,
        )
        self.default = self._make(self.ratio, bound_for(self.ratio), "default", None, None)

    def _make(
        self, ratio: float, bound: int, source: DirectiveSource, rule: str | None,
        tenant: str | None,
    ) -> SamplingDirective:
        return SamplingDirective(
            ratio=ratio, source=source, rule=rule, tenant=tenant, bound=bound,
            follow_parent=self.follow_parent, record_unsampled=self.record_unsampled,
            gate=self.budgets.gate_for(tenant),
        )

    def directive(self, facts: RequestFacts) -> SamplingDirective:
        tenant = facts.tenant
        override = facts.route_ratio
        if override is not None and 0.0 <= override <= 1.0:
            return self._make(override, bound_for(override), "route", None, tenant)
        rule = first_match(self.rules, facts)
        if rule is not None:
            return self._make(rule.ratio, rule.bound, "rule", rule.label, tenant)
        if tenant is not None:
            tenant_ratio = self.tenant_ratios.get(tenant)
            if tenant_ratio is not None:
                return self._make(tenant_ratio[0], tenant_ratio[1], "tenant", None, tenant)
        if tenant is None:
            return self.default
        return self._make(self.ratio, self.default.bound, "default", None, tenant)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "ratio": self.ratio,
            "ratio_source": self.ratio_source,
            "parent_based": self.follow_parent,
            "precedence": ["route_ratio", "rules", "tenant_ratio", "ratio"],
            "rules": [describe_rule(rule, i) for i, rule in enumerate(s.rules)],
            "tenants": {t: p.model_dump(exclude_none=True) for t, p in s.tenants.items()},
            "tenant_budget": s.tenant_budget.model_dump() if s.tenant_budget else None,
            "global_budget": s.global_budget.model_dump() if s.global_budget else None,
            "max_tenants": s.max_tenants,
            "keep_errors": s.keep_errors.model_dump(),
            "rules_file": str(s.rules_file) if s.rules_file else None,
        }


class SamplingPolicy:
    """Owns the sampler handed to the TracerProvider and the live rules behind it."""

    def __init__(
        self,
        settings: SamplingSettings,
        clock: Clock = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._clock = clock
        self._environ: Mapping[str, str] = dict(os.environ if environ is None else environ)
        self._snapshot = _Snapshot(settings, clock, self._environ)
        self.sampler = GatewaySampler(self._default_directive)

    def _default_directive(self) -> SamplingDirective:
        return self._snapshot.default

    @property
    def settings(self) -> SamplingSettings:
        return self._snapshot.settings

    def directive(self, facts: RequestFacts) -> SamplingDirective:
        """The sampling parameters for one request; cheap, never raises on odd facts."""
        return self._snapshot.directive(facts)

    def reload(self, settings: SamplingSettings) -> None:
        """Compile `settings` and swap them in atomically (budgets start full again)."""
        snapshot = _Snapshot(settings, self._clock, self._environ)
        self._snapshot = snapshot
        logger.info("sampling rules applied", rules=len(settings.rules),
                    tenants=len(settings.tenants), ratio=snapshot.ratio)

    def describe(self) -> dict[str, Any]:
        """The active policy as plain JSON-able data (check-config, admin /config)."""
        return self._snapshot.describe()


def build_sampling(
    settings: SamplingSettings,
    *,
    clock: Clock = time.monotonic,
    environ: Mapping[str, str] | None = None,
) -> SamplingPolicy:
    """Build the policy; `environ` defaults to a copy of ``os.environ`` taken now."""
    return SamplingPolicy(settings, clock=clock, environ=environ)
