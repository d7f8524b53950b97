"""The sidecar's access log: one correlated line per exchange."""

from __future__ import annotations

from loguru import logger

from ext_proc.logs import ACCESS_MESSAGE
from ext_proc.seams import ExchangeRecord


class AccessLog:
    """A `StreamObserver` writing ``access`` lines with the span's ids."""

    def stream_started(self, method: str | None, route: str | None) -> None:
        return

    def stream_finished(self, record: ExchangeRecord) -> None:
        ctx = record.span_context
        extra = {"tenant": record.tenant} if record.tenant is not None else {}
        logger.bind(
            trace_id=format(ctx.trace_id, "032x"),
            span_id=format(ctx.span_id, "016x"),
            trace_flags=format(int(ctx.trace_flags), "02x"),
            method=record.method,
            path=record.path,
            status=record.status,
            duration_ms=round(record.duration_s * 1000, 3),
            request_id=record.request_id,
            **extra,
        ).info(ACCESS_MESSAGE)
