"""What every format shares: the format interface and hex id helpers (None on bad input)."""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from typing import ClassVar, Final

from opentelemetry.trace import SpanContext, TraceFlags

from ext_proc.policy.propagation.rejections import Rejections

Carrier = Mapping[str, list[str]]

LOWER_HEX: Final = re.compile(r"[0-9a-f]+")
ANY_HEX: Final = re.compile(r"[0-9a-fA-F]+")

# Result of an extractor: a valid remote context, a bare sampling decision
# (B3 ``b3: 0`` / ``X-B3-Sampled`` without ids), or nothing.
Extracted = SpanContext | bool | None


def parse_id(
    text: str, lengths: tuple[int, ...], pattern: re.Pattern[str] = LOWER_HEX
) -> int | None:
    """A non-zero id whose hex text has one of `lengths` (left-padded implicitly) or None."""
    if len(text) not in lengths or pattern.fullmatch(text) is None:
        return None
    value = int(text, 16)
    return value or None


def remote_context(
    trace_id: int, span_id: int, sampled: bool, flags: int | None = None
) -> SpanContext:
    """A remote span context; `flags` (W3C only) overrides the bare sampled bit."""
    trace_flags = TraceFlags(flags if flags is not None else int(sampled))
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace_flags)


def trace_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


def span_hex(span_id: int) -> str:
    return format(span_id, "016x")


class TraceFormat(abc.ABC):
    """One trace-context wire format. Stateless; `extract` never raises."""

    NAME: ClassVar[str]
    FIELDS: ClassVar[frozenset[str]]  # every header the format reads
    WRITES: ClassVar[frozenset[str]]  # the headers `inject` may set

    @abc.abstractmethod
    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        """The remote context in `carrier`; malformed input is counted and yields None."""

    @abc.abstractmethod
    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        """Write `span_context` (valid) as header name -> value into `out`."""
