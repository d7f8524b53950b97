"""Settings for trace-context extraction and injection."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

_FROZEN = ConfigDict(frozen=True, extra="forbid")

FormatName = Literal["tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage"]
ResponseFormat = Literal["traceresponse", "server-timing"]

FORMAT_NAMES: Final[tuple[FormatName, ...]] = (
    "tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage",
)
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2


# NoDecode: env values reach `_split_csv` raw, so both ``a,b`` and ``["a","b"]`` work.
Formats = Annotated[tuple[FormatName, ...], NoDecode]
Names = Annotated[tuple[str, ...], NoDecode]
ResponseFormats = Annotated[tuple[ResponseFormat, ...], NoDecode]


def _split_csv(value: Any) -> Any:
    """Accept ``"a,b"`` and a JSON list string (env vars, YAML scalars) as well as a list."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value  # reported by the field's own validation
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate entries in {list(values)}")
    return values


def _header_name(value: str) -> str:
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value.lower()


class PropagationSettings(BaseModel):
    model_config = _FROZEN

    extract: Formats = Field(
        default=("tracecontext", "grpc-trace-bin", "b3", "b3multi", "jaeger", "baggage"),
        description=(
            "Formats read from the incoming request, highest precedence first: the first "
            "format holding a valid context wins. 'baggage' (W3C baggage) is read in "
            "addition; 'jaeger' also reads uberctx-* baggage. Names: " + ", ".join(FORMAT_NAMES)
        ),
    )
    inject: Formats = Field(
        default=("tracecontext", "baggage"),
        description=(
            "Formats written into the upstream request (replacing incoming values). "
            "'baggage' passes the extracted baggage members through."
        ),
    )
    clear: Names = Field(
        default=(),
        description=(
            "Extra incoming header names removed from the upstream request. Headers of "
            "formats that are extracted but not injected are always removed, so upstreams "
            "never see two contradicting contexts."
        ),
    )
    response: ResponseFormats = Field(
        default=(),
        description=(
            "Response headers that return the trace id to the client: 'traceresponse' "
            "and/or 'server-timing' (trace;desc=00-<trace>-<span>-<flags>). Off by default."
        ),
    )
    response_header: str | None = Field(
        default=None,
        description="Custom response header carrying the 32-hex trace id; off when unset.",
    )
    baggage_max_members: int = Field(
        default=64, ge=64, le=1024,
        description="Baggage members propagated before whole members are dropped (W3C minimum 64).",
    )
    baggage_max_bytes: int = Field(
        default=8192, ge=8192, le=65536,
        description=(
            "Combined baggage bytes propagated before whole members are dropped "
            "(W3C minimum 8192)."
        ),
    )

    @field_validator("extract", "inject", "clear", "response", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("extract", "inject", "response")
    @classmethod
    def _no_duplicates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(value)

    @field_validator("clear")
    @classmethod
    def _check_clear(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(tuple(_header_name(name) for name in value))

    @field_validator("response_header")
    @classmethod
    def _check_response_header(cls, value: str | None) -> str | None:
        return None if value is None else _header_name(value)
