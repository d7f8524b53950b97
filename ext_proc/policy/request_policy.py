"""Tenants, sampling and redaction, applied to one request.

`RequestPolicy` bundles the per-request decisions the stream delegates:
who the tenant is and which sampling directive applies (before the span
starts, so on the hot path: cheap), and which redacted attributes the span
records (after Envoy has its answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.trace import get_current_span

from ext_proc.policy.propagation import sampling_decision
from ext_proc.policy.redaction import Redactor
from ext_proc.policy.sampling import RequestFacts, SamplingPolicy, with_directive
from ext_proc.policy.sampling.prefilter import REQUEST_ID, root_sampled
from ext_proc.policy.sampling.rules import TRACE_ID_LIMIT
from ext_proc.policy.tenants import TenantResolver
from ext_proc.request.envoy_attrs import EnvoyAttributes
from ext_proc.request.headers import Carrier, first
from ext_proc.request.route_options import RouteOptions
from ext_proc.telemetry import semconv as sc

TENANT_ID: Final = "tenant.id"
ALWAYS: Final = TRACE_ID_LIMIT + 1  # a bound every trace id is under
NEVER: Final = 0


class RequestPolicy:
    """Built once by the app; shared by every stream (no per-request state)."""

    def __init__(self, redactor: Redactor, sampling: SamplingPolicy | None = None,
                 tenants: TenantResolver | None = None) -> None:
        self.redactor = redactor
        # response headers to record: the exchange needs Envoy's response phase
        self.wants_response = redactor.captures_response
        self.sampling = sampling
        self._tenants = tenants if tenants is not None and tenants.enabled else None

    # -- before the span starts (hot path) ----------------------------------------

    def tenant(self, carrier: Carrier, options: RouteOptions) -> str | None:
        if self._tenants is None:
            return None
        return self._tenants.resolve(carrier, options.metadata_map)

    def sampling_context(self, parent: Context, carrier: Carrier, *, path: str, method: str,
                         route_name: str | None, tenant: str | None,
                         options: RouteOptions) -> Context:
        """`parent` plus the sampling directive the gateway span is started with."""
        if self.sampling is None:
            return parent
        ratio = options.sample_ratio
        decision = sampling_decision(parent)  # e.g. "b3: 0": the client's decision, no ids
        if decision is not None:
            ratio = 1.0 if decision else 0.0
        sampling = self.sampling
        directive = sampling.directive(RequestFacts(
            route=route_name, path=path, method=method, headers=carrier, tenant=tenant,
            route_ratio=ratio,
        ))
        if sampling.prefilter.enabled and not get_current_span(parent).get_span_context().is_valid:
            # A root: decided by its x-request-id, as Envoy's prefilter decides whether to ask
            sampled = root_sampled(first(carrier, REQUEST_ID), directive.ratio)
            if sampled is not None:
                directive = directive.bound_to(ALWAYS if sampled else NEVER)
        return with_directive(parent, directive)

    # -- after the answer ------------------------------------------------------------

    def request_attributes(self, carrier: Carrier, raw_target: str,
                           envoy: EnvoyAttributes, tenant: str | None) -> dict[str, Any]:
        """Redacted path (it replaces the raw one the span started with) and query,
        captured headers, auth annotation and the tenant."""
        redactor = self.redactor
        attrs: dict[str, Any] = {TENANT_ID: tenant} if tenant is not None else {}
        path, query = redactor.path_and_query(raw_target)
        attrs[sc.URL_PATH] = path
        if query is not None:
            attrs[sc.URL_QUERY] = query
        attrs.update(redactor.header_attributes(carrier, "request"))
        attrs.update(redactor.auth_attributes(
            carrier, mtls=bool(envoy.boolean(sc.EnvoyAttr.CONNECTION_MTLS))))
        return attrs

    def response_attributes(self, carrier: Mapping[str, list[str]]) -> dict[str, Any]:
        return dict(self.redactor.header_attributes(carrier, "response"))
