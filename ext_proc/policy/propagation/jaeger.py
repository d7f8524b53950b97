"""Jaeger ``uber-trace-id`` and ``uberctx-*`` baggage (Jaeger client docs, "Propagation Format").

``uber-trace-id: {trace-id}:{span-id}:{parent-span-id}:{flags}``: trace id of up
to 32 hex digits and span id of up to 16, shorter values 0-padded on the left,
0 invalid; parent span id deprecated (ignored, 0 valid); flags one or two hex
digits, bit 1 sampled, bit 2 debug (implies sampled). The value may arrive
URL-encoded (``%3A`` separators). Baggage: ``uberctx-{key}: {url-encoded value}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final
from urllib.parse import quote, unquote

from opentelemetry.trace import SpanContext

from ext_proc.policy.propagation import baggage
from ext_proc.policy.propagation._base import (
    ANY_HEX,
    Carrier,
    Extracted,
    TraceFormat,
    parse_id,
    remote_context,
    span_hex,
    trace_hex,
)
from ext_proc.policy.propagation.rejections import Rejections

_SAMPLED: Final = 0x01
_DEBUG: Final = 0x02


class JaegerFormat(TraceFormat):
    NAME = "jaeger"
    HEADER_KEY: Final = "uber-trace-id"
    BAGGAGE_PREFIX: Final = "uberctx-"
    FIELDS = frozenset({HEADER_KEY})  # plus the dynamic uberctx-* names
    WRITES = FIELDS
    _TRACE_LENGTHS: Final = tuple(range(1, 33))
    _SPAN_LENGTHS: Final = tuple(range(1, 17))
    _FLAGS: Final = re.compile(r"[0-9a-fA-F]{1,2}")
    _MAX_LEN: Final = 256

    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        values = carrier.get(self.HEADER_KEY)
        if not values:
            return None
        context = self._parse(values[0])
        if context is None:
            rejections.reject(self.NAME, "malformed uber-trace-id", values[0])
        return context

    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        flags = _SAMPLED if span_context.trace_flags.sampled else 0
        out[self.HEADER_KEY] = (
            f"{trace_hex(span_context.trace_id)}:{span_hex(span_context.span_id)}:0:{flags:02x}"
        )

    @classmethod
    def _parse(cls, raw: str) -> SpanContext | None:
        value = raw.strip(" \t")
        if len(value) > cls._MAX_LEN:
            return None
        if "%" in value:
            value = unquote(value, errors="replace")
        parts = value.split(":")
        if len(parts) != 4:
            return None
        trace, span, parent, flags = parts
        trace_id = parse_id(trace, cls._TRACE_LENGTHS, ANY_HEX)
        span_id = parse_id(span, cls._SPAN_LENGTHS, ANY_HEX)
        if trace_id is None or span_id is None:
            return None
        if len(parent) not in cls._SPAN_LENGTHS or ANY_HEX.fullmatch(parent) is None:
            return None
        if cls._FLAGS.fullmatch(flags) is None:
            return None
        bits = int(flags, 16)
        return remote_context(trace_id, span_id, bool(bits & (_SAMPLED | _DEBUG)))

    @classmethod
    def baggage_members(cls, carrier: Carrier) -> Iterator[str]:
        """W3C baggage members for each ``uberctx-*`` header (first value of each)."""
        for name, values in carrier.items():
            if not name.startswith(cls.BAGGAGE_PREFIX) or not values:
                continue
            key = name[len(cls.BAGGAGE_PREFIX) :]
            value = unquote(values[0].strip(" \t"), errors="replace")
            member = baggage.member_from_text(key, value)
            if member is not None:
                yield member

    @classmethod
    def baggage_headers(cls, members: Iterable[str]) -> dict[str, str]:
        """``uberctx-{key}: url-encoded value`` for each member; properties are dropped."""
        headers: dict[str, str] = {}
        for member in members:
            key = baggage.member_key(member)
            value = baggage.member_value(member)
            if key is None or value is None:
                continue
            headers.setdefault(cls.BAGGAGE_PREFIX + key.lower(), quote(value, safe=""))
        return headers
