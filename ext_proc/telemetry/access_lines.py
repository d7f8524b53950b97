"""The sidecar's access log: one correlated line per exchange."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

from loguru import logger

from ext_proc.request.seams import ExchangeRecord
from ext_proc.telemetry import logs
from ext_proc.telemetry.logs import ACCESS_MESSAGE


class AccessLog:
    """A `StreamObserver` writing ``access`` lines with the span's ids (null for a
    request Envoy did not ask the sidecar about: it has no span).

    The line is the same either way: built here and handed to the JSON sink when
    that is the only sink (`logs.direct_sink`), else logged through loguru."""

    def stream_started(self, method: str | None, route: str | None) -> None:
        return

    @staticmethod
    def fields(record: ExchangeRecord) -> dict[str, Any]:
        ctx = record.span_context
        valid = ctx.is_valid  # not: a request Envoy did not ask us about (no span)
        fields: dict[str, Any] = {
            "trace_id": format(ctx.trace_id, "032x") if valid else None,
            "span_id": format(ctx.span_id, "016x") if valid else None,
            "trace_flags": format(int(ctx.trace_flags), "02x") if valid else None,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "duration_ms": round(record.duration_s * 1000, 3),
            "request_id": record.request_id,
        }
        if record.tenant is not None:
            fields["tenant"] = record.tenant
        return fields

    def stream_finished(self, record: ExchangeRecord) -> None:
        sink = logs.direct_sink()
        if sink is None:
            logger.bind(**self.fields(record)).info(ACCESS_MESSAGE)
            return
        sink.write_access(self.line(record))

    def streams_finished(self, records: Sequence[ExchangeRecord]) -> None:
        """`stream_finished` for a batch: the lines handed to the sink together."""
        sink = logs.direct_sink()
        if sink is None:
            for record in records:
                logger.bind(**self.fields(record)).info(ACCESS_MESSAGE)
            return
        lines = []
        for record in records:
            try:  # one record that cannot be written must not cost the others
                lines.append(self.line(record))
            except Exception:
                logger.opt(exception=True).error("access line failed",
                                                 request_id=record.request_id)
        sink.write_access_many(lines)

    @staticmethod
    def line(record: ExchangeRecord) -> str:
        """The JSON line of `record`: what ``json.dumps`` makes of the ``ts``/``level``/
        ``msg`` header and `fields`, written out directly (2.8 against 6.5 µs; a finite
        float's JSON is its repr)."""
        ctx = record.span_context
        ids = (f'"trace_id":"{ctx.trace_id:032x}","span_id":"{ctx.span_id:016x}",'
               f'"trace_flags":"{int(ctx.trace_flags):02x}"' if ctx.is_valid else _NO_IDS)
        line = (f'{{"ts":"{timestamp()}",'
                f'"level":"INFO","msg":"{ACCESS_MESSAGE}",{ids},"method":{_text(record.method)},'
                f'"path":{_text(record.path)},'
                f'"status":{"null" if record.status is None else int(record.status)},'
                f'"duration_ms":{_number(round(record.duration_s * 1000, 3))},'
                f'"request_id":{_text(record.request_id)}')
        if record.tenant is not None:
            line += f',"tenant":{_text(record.tenant)}'
        return line + "}"


_NO_IDS: Final = '"trace_id":null,"span_id":null,"trace_flags":null'  # no span: not asked


def _text(value: str | None) -> str:
    return "null" if value is None else _escape(str(value))


_escape = json.encoder.encode_basestring_ascii  # json.dumps' own (C) string encoder


def _number(value: float) -> str:
    return repr(value) if value - value == 0 else json.dumps(value)  # nan/inf as json does


_second: list[Any] = [None, ""]  # (the second, its ISO 8601 text), the last formatted


def timestamp() -> str:
    """Now in UTC, as ``datetime.now(UTC).isoformat(timespec="microseconds")`` writes it
    (the part up to the second is formatted once a second: a batch of access-log
    entries writes many lines in the same second)."""
    now = time.time_ns()
    second, micros = divmod(now // 1000, 1_000_000)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{micros:06d}+00:00"
