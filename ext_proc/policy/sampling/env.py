"""The standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG variables, read once.

They set the default ratio and parent-following when no rules are configured and
the settings leave ``ratio`` / ``parent_based`` unset (`ext_proc.policy.sampling.policy`,
and the prefilter Envoy is given, `ext_proc.policy.sampling.prefilter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from loguru import logger

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
