"""``grpc-trace-bin``: OpenCensus BinaryEncoding of a trace context, base64 on the wire.

Layout (census-instrumentation/opencensus-specs encodings/BinaryEncoding.md, version 0)::

    00 | 00 trace_id[16] | 01 span_id[8] | 02 options[1]        = 29 bytes

Every field is optional on the wire; decoding reads fields until the end of the
input or the first unknown field id (not an error). Envoy joins repeated metadata
with commas; the first value that decodes to a valid context wins.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from opentelemetry.trace import SpanContext

from ext_proc.policy.propagation._base import Carrier, Extracted, TraceFormat, remote_context
from ext_proc.policy.propagation.rejections import Rejections


class GrpcTraceBinFormat(TraceFormat):
    NAME = "grpc-trace-bin"
    HEADER_KEY: Final = "grpc-trace-bin"
    FIELDS = frozenset({HEADER_KEY})
    WRITES = FIELDS

    VERSION: Final = 0
    TRACE_ID_FIELD: Final = 0
    SPAN_ID_FIELD: Final = 1
    OPTIONS_FIELD: Final = 2
    _FIELD_LEN: Final = {TRACE_ID_FIELD: 16, SPAN_ID_FIELD: 8, OPTIONS_FIELD: 1}
    _ENCODED_LEN: Final = 29
    _MAX_TEXT: Final = 1024  # base64 characters of one value, unknown tail included
    _BASE64: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")

    def extract(self, carrier: Carrier, rejections: Rejections) -> Extracted:
        values = carrier.get(self.HEADER_KEY)
        if not values:
            return None
        for header in values:
            for part in header.split(","):
                context = self.decode_text(part)
                if context is not None:
                    return context
        rejections.reject(self.NAME, "no valid grpc-trace-bin value", values[0])
        return None

    def inject(self, span_context: SpanContext, out: dict[str, str]) -> None:
        out[self.HEADER_KEY] = self.encode_text(span_context)

    @classmethod
    def encode(cls, span_context: SpanContext) -> bytes:
        return b"".join((
            bytes((cls.VERSION, cls.TRACE_ID_FIELD)), span_context.trace_id.to_bytes(16, "big"),
            bytes((cls.SPAN_ID_FIELD,)), span_context.span_id.to_bytes(8, "big"),
            bytes((cls.OPTIONS_FIELD, span_context.trace_flags & 1)),
        ))

    @classmethod
    def encode_text(cls, span_context: SpanContext) -> str:
        """Standard-alphabet base64 without padding."""
        return base64.b64encode(cls.encode(span_context)).decode("ascii").rstrip("=")

    @classmethod
    def decode_text(cls, text: str) -> SpanContext | None:
        raw = cls._b64decode(text.strip(" \t"))
        return None if raw is None else cls.decode(raw)

    @classmethod
    def decode(cls, raw: bytes) -> SpanContext | None:
        """The context in `raw`, or None (unknown version, truncated field, missing or zero id)."""
        if not raw or raw[0] != cls.VERSION:
            return None
        fields: dict[int, bytes] = {}
        pos = 1
        while pos < len(raw):
            field_id = raw[pos]
            length = cls._FIELD_LEN.get(field_id)
            if length is None:
                break  # first unknown field id: the rest is a newer version's tail
            value = raw[pos + 1 : pos + 1 + length]
            if len(value) != length:
                return None
            fields.setdefault(field_id, value)
            pos += 1 + length
        trace = fields.get(cls.TRACE_ID_FIELD)
        span = fields.get(cls.SPAN_ID_FIELD)
        if trace is None or span is None:
            return None
        trace_id, span_id = int.from_bytes(trace, "big"), int.from_bytes(span, "big")
        if not trace_id or not span_id:
            return None
        options = fields.get(cls.OPTIONS_FIELD, b"\x00")[0]
        return remote_context(trace_id, span_id, bool(options & 1))

    @classmethod
    def _b64decode(cls, text: str) -> bytes | None:
        if len(text) > cls._MAX_TEXT or cls._BASE64.fullmatch(text) is None:
            return None
        body = text.rstrip("=")
        if len(body) % 4 == 1:
            return None
        try:
            return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
