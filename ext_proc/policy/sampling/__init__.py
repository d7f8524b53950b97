"""Head sampling for gateway spans: rules, per-route and per-tenant ratios, trace budgets,
keep-errors and live reload.

Wiring (see each module for details)::

    policy = build_sampling(settings.sampling)
    provider = TracerProvider(sampler=policy.sampler, ...)
    # per request, before starting the gateway span:
    directive = policy.directive(RequestFacts(route, path, method, headers, tenant, route_ratio))
    span = tracer.start_span(name, context=with_directive(parent_ctx, directive), ...)
"""

from __future__ import annotations

from ext_proc.policy.sampling.budget import TokenBucket
from ext_proc.policy.sampling.directive import (
    RequestFacts,
    SamplingDirective,
    directive_from,
    with_directive,
)
from ext_proc.policy.sampling.env import sampler_from_env
from ext_proc.policy.sampling.keep_errors import KEPT_ATTRIBUTE, KeepErrorsProcessor
from ext_proc.policy.sampling.policy import SamplingPolicy, build_sampling
from ext_proc.policy.sampling.reload import (
    LoadedRules,
    RulesFileError,
    RulesWatcher,
    load_rules,
    parse_rules,
)
from ext_proc.policy.sampling.sampler import GatewaySampler

__all__ = [
    "KEPT_ATTRIBUTE",
    "GatewaySampler",
    "KeepErrorsProcessor",
    "LoadedRules",
    "RequestFacts",
    "RulesFileError",
    "RulesWatcher",
    "SamplingDirective",
    "SamplingPolicy",
    "TokenBucket",
    "build_sampling",
    "directive_from",
    "load_rules",
    "parse_rules",
    "sampler_from_env",
    "with_directive",
]
