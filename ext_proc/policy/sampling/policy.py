"""`SamplingPolicy`: compiled rules and budgets behind one atomically swapped snapshot.

Ratio precedence for a request: the per-route override (``route_ratio``, from
Envoy route metadata), then the first matching rule, then the tenant's ratio,
then the default ratio. ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` set
the default ratio and parent-following when no rules are configured and the
settings leave ``ratio``/``parent_based`` unset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Final

from loguru import logger

from ext_proc.config.sampling import SamplingSettings, TenantSettings
from ext_proc.policy.sampling.budget import Clock, TenantBudgets
from ext_proc.policy.sampling.directive import DirectiveSource, RequestFacts, SamplingDirective
from ext_proc.policy.sampling.env import ENV_SAMPLER, sampler_from_env
from ext_proc.policy.sampling.prefilter import PrefilterPlan, compile_prefilter
from ext_proc.policy.sampling.prefilter_watch import PrefilterWatch
from ext_proc.policy.sampling.rules import (
    CompiledRule,
    bound_for,
    compile_rule,
    describe_rule,
    first_match,
)
from ext_proc.policy.sampling.sampler import GatewaySampler
from ext_proc.request.seams import Bounded


class _Snapshot:
    """Everything `directive` needs, built once per settings version."""

    def __init__(self, settings: SamplingSettings, clock: Clock, env: Mapping[str, str],
                 tenants: TenantSettings, extract: tuple[str, ...], counted: bool) -> None:
        self.settings = settings
        self.prefilter: PrefilterPlan = compile_prefilter(settings, tenants, extract, env,
                                                          counted=counted)
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
    """Owns the sampler handed to the TracerProvider and the live rules behind it.

    `environ` defaults to a copy of ``os.environ`` taken now; `tenants`, `extract`
    (propagation.extract) and `counted` (stream.join_access_log) shape the prefilter."""

    def __init__(
        self,
        settings: SamplingSettings,
        clock: Clock = time.monotonic,
        environ: Mapping[str, str] | None = None,
        tenants: TenantSettings | None = None,
        extract: tuple[str, ...] = (),
        counted: bool = True,
    ) -> None:
        self._clock = clock
        self._counted = counted
        self._environ: Mapping[str, str] = dict(os.environ if environ is None else environ)
        self._tenants = tenants or TenantSettings.model_validate({})
        self._extract = extract
        self._snapshot = self._compile(settings)
        self.sampler = GatewaySampler(self._default_directive)
        # the plan Envoy says it runs (ext_proc initial metadata), against the live one
        self.prefilter_watch = PrefilterWatch(lambda: self._snapshot.prefilter)

    def _compile(self, settings: SamplingSettings) -> _Snapshot:
        return _Snapshot(settings, self._clock, self._environ, self._tenants, self._extract,
                         self._counted)

    @property
    def prefilter(self) -> PrefilterPlan:
        """The live plan: when enabled, asked roots are sampled by their x-request-id."""
        return self._snapshot.prefilter

    def _default_directive(self) -> SamplingDirective:
        return self._snapshot.default

    @property
    def settings(self) -> SamplingSettings:
        return self._snapshot.settings

    def directive(self, facts: RequestFacts) -> SamplingDirective:
        """The sampling parameters for one request; cheap, never raises on odd facts."""
        return self._snapshot.directive(facts)

    def bounded(self) -> tuple[Bounded, ...]:
        """Unlisted tenants with their own trace budget (the rules in force)."""
        return (Bounded("sampling.tenants", lambda: self._snapshot.budgets.tracked_tenants,
                        self._snapshot.settings.max_tenants),)

    def reload(self, settings: SamplingSettings) -> None:
        """Compile `settings` and swap them in atomically (budgets start full again)."""
        snapshot = self._compile(settings)
        self._snapshot = snapshot
        self.prefilter_watch.recheck()
        logger.info("sampling rules applied", rules=len(settings.rules),
                    tenants=len(settings.tenants), ratio=snapshot.ratio)

    def describe(self) -> dict[str, Any]:
        """The active policy as plain JSON-able data (check-config, admin /config)."""
        return {**self._snapshot.describe(), "prefilter": self.prefilter_watch.describe()}


# The policy's builder, by its long-standing name (SamplingPolicy's arguments, as given).
build_sampling: Final = SamplingPolicy
