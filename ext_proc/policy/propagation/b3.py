"""Zipkin B3, single ``b3`` header and multiple ``X-B3-*`` headers.

Rules from openzipkin/b3-propagation README: trace ids are 16 or 32 lower-hex
characters (64-bit ids are left-padded to 128 bits), span ids 16; sampling state
``1`` accept, ``0`` deny, ``d`` debug (implies accept) in the single header, and
``X-B3-Sampled: 1|0`` / ``X-B3-Flags: 1`` (debug) in the multi form; absent = defer.
Sampling state may travel without ids (``b3: 0``), which we return as a bare
decision. For multiple headers the first value wins.

Lenient sampling state: the README lets a receiver accept the ``true``/``false`` of
older tracers. Any sampling value outside the spec's own (``0``/``1``, and ``d`` in
``b3``) is counted as a rejection, but never discards valid ids: a value we can read
(``true``, ``False``, ``D`` ...) is taken as it means, any other is read as absent
(defer), exactly as if the ids had come without it.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.trace import SpanContext

from ext_proc.policy.propagation._base import (
    LOWER_HEX,
    Carrier,
    Extracted,
    TraceFormat,
    parse_id,
    remote_context,
    span_hex,
    trace_hex,
)
from ext_proc.policy.propagation.rejections import Rejections

_TRACE_LENGTHS: Final = (16, 32)
_SPAN_LENGTHS: Final = (16,)
# Every sampling value we can read, case-insensitively; None is defer.
_LENIENT: Final = {"0": False, "1": True, "d": True, "true": True, "false": False}


def _is_parent_id(text: str) -> bool:
    """16 lower-hex characters; the parent is not used, so zero is tolerated."""
    return len(text) == 16 and LOWER_HEX.fullmatch(text) is not None


def _sampling(
    text: str, canonical: frozenset[str], fmt: str, rejections: Rejections
) -> bool | None:
    """The decision `text` means; a value outside `canonical` is counted, unknown = defer."""
    if text in canonical:
        return _LENIENT[text]
    decision = _LENIENT.get(text.lower())
    reason = "unknown sampling state: deferred" if decision is None else "lenient sampling state"
    rejections.reject(fmt, reason, text)
    return decision


class B3SingleFormat(TraceFormat):
    NAME = "b3"
    HEADER_KEY: Final = "b3"
    FIELDS = frozenset({HEADER_KEY})
    WRITES = FIELDS
    _STATES: Final = frozenset({"0", "1", "d"})

    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        values = carrier.get(self.HEADER_KEY)
        if not values:
            return None
        result = self._parse(values[0].strip(" \t"), rejections)
        if result is None:
            rejections.reject(self.NAME, "malformed b3", values[0])
        return result

    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        sampled = "1" if span_context.trace_flags.sampled else "0"
        out[self.HEADER_KEY] = (
            f"{trace_hex(span_context.trace_id)}-{span_hex(span_context.span_id)}-{sampled}"
        )

    @classmethod
    def _parse(cls, value: str, rejections: Rejections) -> Extracted:
        if value in cls._STATES:
            return value != "0"  # sampling state alone
        if value.lower() in _LENIENT:  # a legacy word alone (b3: true): read, counted
            return _sampling(value, cls._STATES, cls.NAME, rejections)
        parts = value.split("-")
        if not 2 <= len(parts) <= 4:
            return None
        trace_id = parse_id(parts[0], _TRACE_LENGTHS)
        span_id = parse_id(parts[1], _SPAN_LENGTHS)
        if trace_id is None or span_id is None:
            return None
        if len(parts) == 4 and not _is_parent_id(parts[3]):
            return None
        # defer (absent or unreadable): the receiver decides; we report "not sampled by caller"
        sampled = False
        if len(parts) >= 3:
            sampled = bool(_sampling(parts[2], cls._STATES, cls.NAME, rejections))
        return remote_context(trace_id, span_id, sampled)


class B3MultiFormat(TraceFormat):
    NAME = "b3multi"
    TRACE_ID: Final = "x-b3-traceid"
    SPAN_ID: Final = "x-b3-spanid"
    PARENT_SPAN_ID: Final = "x-b3-parentspanid"
    SAMPLED: Final = "x-b3-sampled"
    FLAGS: Final = "x-b3-flags"
    FIELDS = frozenset({TRACE_ID, SPAN_ID, PARENT_SPAN_ID, SAMPLED, FLAGS})
    WRITES = frozenset({TRACE_ID, SPAN_ID, SAMPLED})
    _SAMPLED: Final = frozenset({"0", "1"})

    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        def first(name: str) -> str | None:
            values = carrier.get(name)
            return values[0].strip(" \t") if values else None

        trace, span, sampled_text, flags = (
            first(self.TRACE_ID), first(self.SPAN_ID), first(self.SAMPLED), first(self.FLAGS)
        )
        if trace is None and span is None and sampled_text is None and flags is None:
            return None
        if trace is None and span is None:
            # sampling state alone (None when only a non-debug Flags came)
            return self._decision(sampled_text, flags, rejections)
        trace_id = None if trace is None else parse_id(trace, _TRACE_LENGTHS)
        span_id = None if span is None else parse_id(span, _SPAN_LENGTHS)
        parent = first(self.PARENT_SPAN_ID)
        if trace_id is None or span_id is None or (
            parent is not None and not _is_parent_id(parent)
        ):
            rejections.reject(self.NAME, "malformed X-B3 ids", f"{trace}-{span}-{parent}")
            return None
        sampled = self._decision(sampled_text, flags, rejections)
        return remote_context(trace_id, span_id, bool(sampled))

    @classmethod
    def _decision(
        cls, sampled_text: str | None, flags: str | None, rejections: Rejections
    ) -> bool | None:
        sampled = None
        if sampled_text is not None:
            sampled = _sampling(sampled_text, cls._SAMPLED, cls.NAME, rejections)
        if flags == "1":
            sampled = True  # debug implies accept; other Flags values are ignored
        return sampled

    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        out[self.TRACE_ID] = trace_hex(span_context.trace_id)
        out[self.SPAN_ID] = span_hex(span_context.span_id)
        out[self.SAMPLED] = "1" if span_context.trace_flags.sampled else "0"
