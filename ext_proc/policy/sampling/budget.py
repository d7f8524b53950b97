"""Token buckets bounding sampled traces per second, per tenant and globally.

Every gate and bucket is created when the policy is compiled (or the first time
an unlisted tenant is seen, up to ``max_tenants``), so a request allocates nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from ext_proc.config.sampling import Budget

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; starts full. Thread-safe."""

    __slots__ = ("_capacity", "_clock", "_last", "_lock", "_rate", "_tokens")

    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_budget(cls, budget: Budget, clock: Clock) -> TokenBucket:
        return cls(budget.traces_per_second, budget.capacity, clock)

    def acquire(self) -> bool:
        with self._lock:
            now = self._clock()
            elapsed = now - self._last
            if elapsed > 0:
                self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
                self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def refund(self) -> None:
        with self._lock:
            self._tokens = min(self._capacity, self._tokens + 1.0)


class Gate:
    """Both buckets (either may be absent) must grant; a tenant token is refunded otherwise."""

    __slots__ = ("_global", "_tenant")

    def __init__(self, tenant: TokenBucket | None, global_: TokenBucket | None) -> None:
        self._tenant = tenant
        self._global = global_

    def acquire(self) -> bool:
        if self._tenant is not None and not self._tenant.acquire():
            return False
        if self._global is not None and not self._global.acquire():
            if self._tenant is not None:
                self._tenant.refund()
            return False
        return True


class TenantBudgets:
    """Finds the gate for a tenant: listed tenants, then one bucket per unlisted tenant.

    At most ``max_tenants`` unlisted tenants get their own bucket (ids may be
    client-chosen); later ones share an overflow bucket.
    """

    def __init__(
        self,
        listed: Mapping[str, Budget | None],
        default: Budget | None,
        global_budget: Budget | None,
        max_tenants: int,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._default = default
        self._global = TokenBucket.from_budget(global_budget, clock) if global_budget else None
        self._max = max_tenants
        self._lock = threading.Lock()
        self._no_tenant: Gate | None = Gate(None, self._global) if self._global else None
        self._listed: dict[str, Gate | None] = {}
        for tenant, budget in listed.items():
            own = budget or default
            bucket = TokenBucket.from_budget(own, clock) if own else None
            self._listed[tenant] = self._gate(bucket)
        self._dynamic: dict[str, Gate | None] = {}
        overflow = TokenBucket.from_budget(default, clock) if default else None
        self._overflow = self._gate(overflow)

    def _gate(self, bucket: TokenBucket | None) -> Gate | None:
        if bucket is None and self._global is None:
            return None
        return Gate(bucket, self._global)

    def gate_for(self, tenant: str | None) -> Gate | None:
        if tenant is None:
            return self._no_tenant
        if tenant in self._listed:
            return self._listed[tenant]
        if self._default is None:
            return self._no_tenant
        gate = self._dynamic.get(tenant)
        if gate is not None:
            return gate
        with self._lock:
            gate = self._dynamic.get(tenant)
            if gate is None:
                if len(self._dynamic) >= self._max:
                    return self._overflow
                gate = self._gate(TokenBucket.from_budget(self._default, self._clock))
                self._dynamic[tenant] = gate
        return gate

    @property
    def tracked_tenants(self) -> int:
        return len(self._dynamic)
