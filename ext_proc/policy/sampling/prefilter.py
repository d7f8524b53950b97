"""The head-sampling policy as Envoy can apply it: which requests are never worth asking.

Envoy decides whether to ask, the sidecar decides what to record. `compile_prefilter`
turns the sampling settings into a `PrefilterPlan`; `ext_proc.envoy_config` renders it
as the matcher of Envoy's `match_delegate` wrapper around the ext_proc filter, and the
sidecar compares its live plan's digest with the one Envoy was given (stale rules).

A request is skipped (the sidecar never sees it) only when the policy would certainly
not sample it:

- an **unsampled parent**: one well-formed `traceparent` whose sampled flag is 0, no
  other trace-context header, and the policy follows parents;
- a **root** (no trace-context header of any extracted format) whose `x-request-id`
  bucket is at or above the threshold of the first root entry it matches.

A root's bucket is the value of the first three hex digits of its `x-request-id` (a
random UUID Envoy generates): 0..4095. The sidecar samples an asked root exactly when
its bucket is below the threshold of its own ratio (`root_sampled`), so a skipped root
is one the sidecar would not have sampled: the two sides never contradict. Whatever
the matcher cannot express (route-name rules, JWT or route-metadata tenants, an
allow-listed tenant mapping, route overrides) is merged into a higher threshold:
it errs towards asking.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Final

from ext_proc.config.sampling import SamplingRule, SamplingSettings, TenantSettings
from ext_proc.policy.sampling.env import sampler_from_env

PRECISION: Final = 4096  # buckets of x-request-id: three hex digits
REQUEST_ID: Final = "x-request-id"
TRACEPARENT: Final = "traceparent"
# The headers each extracted format reads: any of them present makes a request not a root.
CONTEXT_HEADERS: Final[Mapping[str, tuple[str, ...]]] = {
    "tracecontext": ("traceparent",),
    "b3": ("b3",),
    "b3multi": ("x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"),
    "jaeger": ("uber-trace-id",),
    "grpc-trace-bin": ("grpc-trace-bin",),
}
# One W3C traceparent (version 00) whose sampled flag (bit 0 of the flags) is clear.
UNSAMPLED_TRACEPARENT: Final = r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f][02468ace]"
_HEX3: Final = re.compile(r"[0-9a-fA-F]{3}")
_TENANT_ID: Final = re.compile(r"[A-Za-z0-9._-]+")  # as TenantResolver.ID_PATTERN
# Regex syntax Python has and RE2 (Envoy) lacks: such a header rule is not expressible.
_NOT_RE2: Final = re.compile(r"\(\?[=!<]|\\[1-9]|\(\?P=")


def bucket(request_id: str | None) -> int | None:
    """The root's bucket, 0..4095, or None when the id does not start with hex digits."""
    if request_id is None or _HEX3.match(request_id) is None:
        return None
    return int(request_id[:3], 16)


def threshold(ratio: float) -> int:
    """Buckets below this are sampled at `ratio` (rounded up: never fewer than asked)."""
    return min(PRECISION, max(0, math.ceil(ratio * PRECISION - 1e-9)))


def root_sampled(request_id: str | None, ratio: float) -> bool | None:
    """The sidecar's decision for an asked root, or None when the id has no bucket."""
    value = bucket(request_id)
    return None if value is None else value < threshold(ratio)


@dataclass(frozen=True)
class Condition:
    """All given parts must hold (an empty condition holds for every request)."""

    path_prefix: str | None = None
    method: str | None = None
    header: str | None = None  # lower-case name
    exact: str | None = None
    regex: str | None = None  # full match, RE2 syntax


@dataclass(frozen=True)
class RootEntry:
    """Roots matching `when` (and no earlier entry) are skipped from bucket `threshold` on."""

    label: str
    when: Condition
    threshold: int


@dataclass(frozen=True)
class PrefilterPlan:
    enabled: bool
    why: str  # one line: what the plan does, or why it asks about everything
    skip_unsampled_parent: bool = False
    context_headers: tuple[str, ...] = ()
    roots: tuple[RootEntry, ...] = ()  # first match wins; the last one matches every root
    asks: tuple[str, ...] = field(default=())  # what it could not express (errs to asking)

    def digest(self) -> str:
        """A short hash of what Envoy is told (not the labels or the explanations): equal
        matchers, equal digests."""
        told = [self.enabled, self.skip_unsampled_parent, self.context_headers,
                [(asdict(e.when), e.threshold) for e in self.roots]]
        text = json.dumps(told, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        return {"enabled": self.enabled, "digest": self.digest(), "why": self.why,
                "asks_because": list(self.asks)}


def effective_defaults(settings: SamplingSettings, env: Mapping[str, str]) -> tuple[float, bool]:
    """The default root ratio and parent-following the sidecar applies (as its policy)."""
    env_sampler = None if settings.rules else sampler_from_env(env)
    ratio = (settings.ratio if settings.ratio is not None
             else env_sampler.ratio if env_sampler is not None else 1.0)
    follow = (settings.parent_based if settings.parent_based is not None
              else env_sampler.follow_parent if env_sampler is not None else True)
    return ratio, follow


def _rule_condition(rule: SamplingRule, tenants: TenantSettings
                    ) -> Condition | str | None:
    """The rule as a condition Envoy can test, why it cannot be one, or None when the
    sidecar can never match it (so it never applies)."""
    if rule.route is not None:
        return "a rule on the route name"
    if rule.path_prefix is not None and ("?" in rule.path_prefix or "#" in rule.path_prefix):
        return None  # the sidecar matches the path without its query
    if rule.tenant is not None and not resolvable(rule.tenant, tenants):
        return None
    header = rule.header
    if rule.tenant is not None:
        if header is not None or not _tenant_is_plain_header(tenants):
            return "a rule on a tenant not read from one plain header"
        return Condition(rule.path_prefix, rule.method, tenants.header, exact=rule.tenant)
    if header is not None and header.regex is not None and _NOT_RE2.search(header.regex):
        return "a header regex RE2 cannot run"
    return Condition(rule.path_prefix, rule.method, header.name if header else None,
                     header.exact if header else None, header.regex if header else None)


def resolvable(tenant: str, tenants: TenantSettings) -> bool:
    """Whether the sidecar can resolve a request to this tenant id (`TenantResolver`)."""
    return len(tenant) <= tenants.max_length and _TENANT_ID.fullmatch(tenant) is not None


def _tenant_is_plain_header(tenants: TenantSettings) -> bool:
    """The tenant is exactly one header's value: no other source, no allow-list mapping."""
    sources = {s for s in tenants.order
               if (s == "header" and tenants.header) or (s == "jwt" and tenants.jwt_claim)
               or (s == "route_metadata" and tenants.route_metadata_key)}
    return sources == {"header"} and not tenants.allowed


def compile_prefilter(sampling: SamplingSettings, tenants: TenantSettings,
                      extract: tuple[str, ...], env: Mapping[str, str] | None = None, *,
                      counted: bool = True) -> PrefilterPlan:
    """The plan for these settings (see the module's docstring for what it skips);
    `env` supplies OTEL_TRACES_SAMPLER[_ARG] when no rules are configured; `counted`:
    the sidecar counts the requests Envoy skips (stream.join_access_log)."""
    if not sampling.prefilter:
        return PrefilterPlan(False, "sampling.prefilter is off: Envoy asks about every request")
    if not counted:
        return PrefilterPlan(False, "stream.join_access_log is off, so requests Envoy skipped "
                                    "would go uncounted: Envoy asks about every request")
    if sampling.keep_errors.enabled:
        return PrefilterPlan(False, "sampling.keep_errors records every request to keep the "
                                    "failed ones: Envoy asks about every request")
    ratio, follow = effective_defaults(sampling, {} if env is None else env)
    # Every format's headers, not only `extract`'s: a route may extract others
    # (x-extproc-otel-extract), and a request carrying one is then not a root there.
    headers = tuple(dict.fromkeys(h for hs in CONTEXT_HEADERS.values() for h in hs))
    entries: list[RootEntry] = []
    asks: list[str] = ["routes that set x-extproc-otel-sample-ratio, or extract without "
                       "tracecontext (wrap their filter config with "
                       "ExtensionWithMatcherPerRoute, or raise the ratio)",
                       "roots whose tested headers repeat or hold a comma (always asked)"]
    merged: float | None = None  # from the first rule Envoy cannot test on: one catch-all
    for index, rule in enumerate(sampling.rules):
        condition = _rule_condition(rule, tenants)
        label = rule.name or f"#{index}"
        if condition is None:
            continue
        if isinstance(condition, str):
            asks.append(f"rule {label}: {condition}")
            merged = max(rule.ratio, merged or 0.0)
        elif merged is None:
            entries.append(RootEntry(f"rule {label}", condition, threshold(rule.ratio)))
        else:
            merged = max(rule.ratio, merged)
    tenant_ratios = {t: p.ratio for t, p in sampling.tenants.items()
                     if p.ratio is not None and resolvable(t, tenants)}
    if tenant_ratios and (merged is not None or not _tenant_is_plain_header(tenants)):
        asks.append("tenant ratios for a tenant not read from one plain header")
        merged = max([*tenant_ratios.values(), merged or 0.0])
    elif merged is None:
        entries += [RootEntry(f"tenant {t}", Condition(header=tenants.header, exact=t),
                              threshold(r)) for t, r in sorted(tenant_ratios.items())]
    final = ratio if merged is None else max(ratio, merged)
    entries.append(RootEntry("default", Condition(), threshold(final)))
    why = (f"skips roots by x-request-id bucket (default ratio {ratio}, {len(entries)} "
           f"root entries)" + (" and unsampled parents" if follow else ""))
    return PrefilterPlan(True, why, follow and "tracecontext" in extract, headers,
                         tuple(entries), tuple(asks))
