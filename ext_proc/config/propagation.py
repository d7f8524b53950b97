"""Settings for trace-context extraction and injection."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class PropagationSettings(BaseModel):
    model_config = _FROZEN

    extract: tuple[str, ...] = Field(
        ("tracecontext", "baggage"),
        description="Formats read from the incoming request, highest precedence first.",
    )
    inject: tuple[str, ...] = Field(
        ("tracecontext", "baggage"),
        description="Formats written into the upstream request.",
    )
