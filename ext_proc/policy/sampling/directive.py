"""What the stream tells the sampler about one request, carried in the parent `Context`.

The stream builds `RequestFacts`, asks the policy for a `SamplingDirective`, puts it
in the context it starts the gateway span with (`with_directive`), and the sampler
reads it back in `should_sample` (`directive_from`). The directive carries the
parameters of the snapshot it was computed from, so a reload between the two
steps cannot mix old and new rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from opentelemetry.context import Context, create_key, get_value, set_value

DirectiveSource = Literal["route", "rule", "tenant", "default"]

_DIRECTIVE_KEY: Final = create_key("extproc-sampling-directive")


class BudgetGate(Protocol):
    """Takes one sampled trace from the applicable budgets; False when any is empty."""

    def acquire(self) -> bool: ...


@dataclass(slots=True)  # not frozen: built per request, ~0.7 µs less
class RequestFacts:
    """The request attributes sampling rules can match on."""

    route: str | None
    path: str
    method: str
    headers: Mapping[str, list[str]]
    tenant: str | None
    route_ratio: float | None


@dataclass(frozen=True, slots=True)
class SamplingDirective:
    """The sampling parameters chosen for one request.

    ``ratio`` applies to root traces (and to remote parents when ``follow_parent``
    is false); ``source``/``rule`` say where it came from.
    """

    ratio: float
    source: DirectiveSource
    rule: str | None
    tenant: str | None
    bound: int = field(repr=False)
    follow_parent: bool = field(repr=False)
    record_unsampled: bool = field(repr=False)
    gate: BudgetGate | None = field(repr=False, compare=False)

    def bound_to(self, bound: int) -> SamplingDirective:
        """This directive with another `bound` (as dataclasses.replace, 2.8 µs: 1.3)."""
        return SamplingDirective(self.ratio, self.source, self.rule, self.tenant, bound,
                                 self.follow_parent, self.record_unsampled, self.gate)


def with_directive(ctx: Context | None, directive: SamplingDirective) -> Context:
    """`ctx` (or the current context) plus `directive`, for `tracer.start_span(context=...)`."""
    return set_value(_DIRECTIVE_KEY, directive, ctx)


def directive_from(ctx: Context | None) -> SamplingDirective | None:
    """The directive stored by `with_directive`, or None."""
    value = get_value(_DIRECTIVE_KEY, ctx)
    return value if isinstance(value, SamplingDirective) else None
