"""W3C Trace Context: ``traceparent`` and ``tracestate`` (https://www.w3.org/TR/trace-context-2/).

We own both parsers instead of reusing `TraceContextTextMapPropagator`:

- it reads only the first ``traceparent`` when two arrive (the test suite's
  ``test_traceparent_duplicated`` requires a restart);
- `TraceState` uses the older key grammar (no ``@`` except one tenant separator,
  no digit-led simple keys), and drops the whole tracestate on a duplicate key,
  whereas the current grammar is ``key = (lcalpha / DIGIT) 0*255 keychar`` with
  ``@`` a keychar, and duplicates may be kept or de-duplicated (test suite
  ``test_tracestate_key_illegal_vendor_format``, ``test_tracestate_duplicated_keys``).

`SpecTraceState` holds members validated here, so `TraceState`'s stricter checks
do not silently drop them when the SDK copies the parent's tracestate to our span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from ext_proc.policy.propagation._base import (
    Carrier,
    Extracted,
    TraceFormat,
    remote_context,
    span_hex,
    trace_hex,
)
from ext_proc.policy.propagation.rejections import Rejections


class SpecTraceState(TraceState):
    """A `TraceState` whose members were already validated against the spec grammar."""

    def __init__(self, entries: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._dict = dict(entries)


def traceparent_value(span_context: SpanContext) -> str:
    """``00-<trace>-<span>-<flags>``; flags other than sampled and random are zeroed (§3.2.2.5)."""
    flags = span_context.trace_flags & TraceContextFormat.KNOWN_FLAGS
    return f"00-{trace_hex(span_context.trace_id)}-{span_hex(span_context.span_id)}-{flags:02x}"


class TraceContextFormat(TraceFormat):
    NAME = "tracecontext"
    TRACEPARENT: Final = "traceparent"
    TRACESTATE: Final = "tracestate"
    FIELDS = frozenset({TRACEPARENT, TRACESTATE})
    WRITES = FIELDS

    KNOWN_FLAGS: Final = TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID
    MAX_TRACEPARENT: Final = 4096  # only prohibitively large future versions are refused
    MAX_MEMBERS: Final = 32
    _OWS: Final = " \t"
    # version-format of version 00, plus an optional "-..." tail for higher versions.
    _TRACEPARENT: Final = re.compile(
        r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL
    )
    _KEY: Final = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
    _VALUE: Final = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")

    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        values = carrier.get(self.TRACEPARENT)
        if not values:
            return None
        if len(values) > 1:
            rejections.reject(self.NAME, "several traceparent headers", values[0])
            return None
        parsed = self._parse_traceparent(values[0])
        if parsed is None:
            rejections.reject(self.NAME, "malformed traceparent", values[0])
            return None
        trace_id, span_id, flags = parsed
        context = remote_context(trace_id, span_id, bool(flags & 1), flags)
        states = carrier.get(self.TRACESTATE)
        if not states:
            return context
        trace_state = self._parse_tracestate(states, rejections)
        if trace_state is None:
            return context
        return SpanContext(
            trace_id, span_id, is_remote=True,
            trace_flags=context.trace_flags, trace_state=trace_state,
        )

    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        out[self.TRACEPARENT] = traceparent_value(span_context)
        if span_context.trace_state:
            out[self.TRACESTATE] = span_context.trace_state.to_header()

    @classmethod
    def _parse_traceparent(cls, raw: str) -> tuple[int, int, int] | None:
        value = raw.strip(cls._OWS)
        if len(value) > cls.MAX_TRACEPARENT:
            return None
        match = cls._TRACEPARENT.fullmatch(value)
        if match is None:
            return None
        version, trace, span, flags, tail = match.groups()
        if version == "ff" or (version == "00" and tail is not None):
            return None
        trace_id, span_id = int(trace, 16), int(span, 16)
        if not trace_id or not span_id:
            return None
        return trace_id, span_id, int(flags, 16) & cls.KNOWN_FLAGS

    @classmethod
    def _parse_tracestate(
        cls, headers: list[str], rejections: Rejections
    ) -> SpecTraceState | None:
        """Members of all headers in order; any bad member or >32 members discards it all."""
        members: dict[str, str] = {}
        count = 0
        for header in headers:
            for raw in header.split(","):
                member = raw.strip(cls._OWS)
                if not member:
                    continue  # empty and OWS-only members are allowed
                count += 1
                if count > cls.MAX_MEMBERS:
                    rejections.reject(cls.NAME, "tracestate over 32 members")
                    return None
                key, sep, value = member.partition("=")
                if not (sep and cls._KEY.fullmatch(key) and cls._VALUE.fullmatch(value)):
                    rejections.reject(cls.NAME, "malformed tracestate member", member)
                    return None
                members.setdefault(key, value)  # the left-most duplicate is the newest
        return SpecTraceState(members.items()) if members else None
