"""Settings for head sampling (rules, tenant rates and budgets, keep-errors) and tenants.

`SamplingSettings` is also the schema of the live-reloaded rules file: the file
overlays the sampling section of the main config (see `ext_proc.policy.sampling.reload`).
`TenantSettings` says where a request's tenant id comes from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")

Ratio = float
TenantSource = Literal["header", "jwt", "route_metadata"]


class HeaderMatch(BaseModel):
    """One request header compared with an exact value or a full-match regex."""

    model_config = _FROZEN

    name: str = Field(min_length=1, description="Header name (case-insensitive).")
    exact: str | None = Field(None, description="Matches when any value equals this string.")
    regex: str | None = Field(
        None,
        description=(
            "Matches when any value full-matches this Python regex "
            "(values over 4 KiB never match)."
        ),
    )

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderMatch:
        if (self.exact is None) == (self.regex is None):
            raise ValueError("set exactly one of 'exact' or 'regex'")
        return self


class SamplingRule(BaseModel):
    """Request matchers (all given ones must match; none = match all) and the ratio to apply."""

    model_config = _FROZEN

    name: str | None = Field(None, description="Label shown by check-config and the admin view.")
    route: str | None = Field(None, description="Envoy route name (xds.route_name) equals this.")
    path_prefix: str | None = Field(None, description="Request :path starts with this.")
    method: str | None = Field(None, description="HTTP method equals this (case-insensitive).")
    header: HeaderMatch | None = Field(None, description="A request header matches.")
    tenant: str | None = Field(None, description="Resolved tenant id equals this.")
    ratio: Ratio = Field(ge=0, le=1, description="Probability of sampling a matching root trace.")

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return value.upper() if value is not None else None


class Budget(BaseModel):
    """A token bucket on sampled traces: a steady rate plus a burst allowance."""

    model_config = _FROZEN

    traces_per_second: float = Field(gt=0, description="Sustained sampled traces per second.")
    burst: float | None = Field(
        None, ge=1, description="Bucket size (traces); default max(1, traces_per_second).",
    )

    @property
    def capacity(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.traces_per_second)


class TenantPolicy(BaseModel):
    """Per-tenant overrides; unset fields fall back to the defaults."""

    model_config = _FROZEN

    ratio: Ratio | None = Field(
        None, ge=0, le=1,
        description="Root ratio for this tenant when no rule or route override applies.",
    )
    budget: Budget | None = Field(
        None, description="This tenant's budget (overrides tenant_budget).",
    )


class KeepErrorsSettings(BaseModel):
    """Record spans that lost the head decision and export the failed or slow ones."""

    model_config = _FROZEN

    enabled: bool = Field(
        False,
        description=(
            "Record unsampled spans and export those that end in error, 5xx or over the "
            "latency threshold. Upstream still sees the head decision (not sampled), so such "
            "traces contain only the gateway span."
        ),
    )
    status_code_min: int = Field(
        500, ge=100, le=599,
        description="Keep spans whose http.response.status_code is at least this.",
    )
    latency_threshold_ms: float | None = Field(
        None, gt=0,
        description="Keep spans at least this long (milliseconds); unset = no latency rule.",
    )
    max_per_second: Budget | None = Field(
        None, description="Cap on kept (not head-sampled) spans exported; unset = no cap.",
    )


class SamplingSettings(BaseModel):
    """Head-sampling policy.

    Ratio precedence: route override, first matching rule, tenant ratio, ``ratio``.
    """

    model_config = _FROZEN

    ratio: Ratio | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Root ratio when nothing more specific applies. Unset: from OTEL_TRACES_SAMPLER/"
            "OTEL_TRACES_SAMPLER_ARG when no rules are configured, else 1.0."
        ),
    )
    parent_based: bool | None = Field(
        None,
        description=(
            "Follow a valid remote parent's sampled flag. Unset: from OTEL_TRACES_SAMPLER when "
            "no rules are configured, else true."
        ),
    )
    rules: tuple[SamplingRule, ...] = Field((), description="Ordered rules; the first match wins.")
    tenants: dict[str, TenantPolicy] = Field(
        default_factory=dict, description="Per-tenant ratio and budget, keyed by tenant id.",
    )
    tenant_budget: Budget | None = Field(
        None,
        description="Budget each tenant gets on its own unless tenants.<id>.budget overrides it.",
    )
    global_budget: Budget | None = Field(
        None, description="Budget shared by all sampled traces, checked after the tenant's.",
    )
    max_tenants: int = Field(
        1000,
        ge=1,
        description="Distinct unlisted tenants given their own bucket; the rest share one.",
    )
    keep_errors: KeepErrorsSettings = Field(
        default_factory=lambda: KeepErrorsSettings.model_validate({}),
        description="Tail-keep failed or slow gateway spans.",
    )
    prefilter: bool = Field(
        True,
        description=(
            "Compile the policy into Envoy's config (envoy-config): Envoy skips the sidecar "
            "for requests the policy will certainly not sample (unsampled parents, roots "
            "outside the ratio by x-request-id), and the sidecar samples asked roots by the "
            "same x-request-id rule. Off: Envoy asks about every request. keep_errors turns "
            "it off."
        ),
    )
    rules_file: Path | None = Field(
        None, description="YAML file overlaying this section, watched and reloaded live.",
    )
    reload_interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often the rules file is checked for changes.",
    )


class TenantSettings(BaseModel):
    """Where the tenant id comes from. It becomes a span attribute and a metric label."""

    model_config = _FROZEN

    header: str | None = Field(None, description="Request header holding the tenant id.")
    jwt_claim: str | None = Field(
        None,
        description=(
            "Claim of the bearer JWT holding the tenant id (dots descend into objects). The "
            "payload is decoded WITHOUT verification: verify upstream (e.g. Envoy jwt_authn)."
        ),
    )
    jwt_header: str = Field(
        "authorization", description="Header holding 'Bearer <JWT>'.",
    )
    route_metadata_key: str | None = Field(
        None, description="Key of the forwarded route metadata holding the tenant id.",
    )
    order: tuple[TenantSource, ...] = Field(
        ("route_metadata", "header", "jwt"),
        min_length=1,
        description="Sources tried in order; first valid id wins; unconfigured ones are skipped.",
    )
    max_length: int = Field(64, ge=1, le=256, description="Longer ids are rejected.")
    allowed: tuple[str, ...] = Field(
        (),
        description="If set, ids outside it resolve to 'unlisted' (bounds label cardinality).",
    )
    unlisted: str = Field(
        "other",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Tenant id used for ids outside 'allowed'.",
    )

    @field_validator("header", "jwt_header")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value is not None else None
