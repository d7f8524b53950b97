"""Loguru setup: JSON (default) or console lines, every line correlated.

A patcher copies the current OpenTelemetry span's trace_id/span_id into each
record unless the call bound them explicitly, so any line logged while a stream
is processed carries that stream's ids. Values go in as kwargs (``extra``),
never into the message text.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC
from typing import TYPE_CHECKING, Any, Final, TextIO

from loguru import logger
from opentelemetry import trace

from ext_proc.config import LogSettings

if TYPE_CHECKING:
    from loguru import Message, Record

_RESERVED: Final = frozenset({"ts", "level", "msg"})


def _correlate(record: Record) -> None:
    extra = record["extra"]
    if "trace_id" in extra:
        return
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        extra["trace_id"] = format(ctx.trace_id, "032x")
        extra["span_id"] = format(ctx.span_id, "016x")


def json_line(record: Record) -> str:
    """One log record as a compact JSON object (no trailing newline)."""
    doc: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="microseconds"),
        "level": record["level"].name,
        "msg": record["message"],
    }
    for key, value in record["extra"].items():
        doc[key if key not in _RESERVED else f"extra.{key}"] = value
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        doc["exception"] = f"{exc.type.__name__}: {exc.value}"
    return json.dumps(doc, default=str, separators=(",", ":"))


class _JsonSink:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, message: Message) -> None:
        self._stream.write(json_line(message.record) + "\n")
        self._stream.flush()


_CONSOLE_FORMAT: Final = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message} "
    "<dim>{extra}</dim>"
)


def install_correlation() -> None:
    """Make every record carry the current span's trace_id/span_id."""
    logger.configure(patcher=_correlate)


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Replace loguru's handlers with ours; called once by the app at startup."""
    logger.remove()
    out = stream if stream is not None else sys.stdout
    install_correlation()
    if settings.format == "json":
        logger.add(_JsonSink(out), level=settings.level, format="{message}",
                   backtrace=False, diagnose=False)
    else:
        logger.add(out, level=settings.level, format=_CONSOLE_FORMAT,
                   backtrace=False, diagnose=False, colorize=out.isatty())
