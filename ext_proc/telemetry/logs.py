"""Loguru setup: JSON (default) or console lines, every line correlated.

A patcher copies the current OpenTelemetry span's trace_id/span_id into each
record unless the call bound them explicitly, so any line logged while a stream
is processed carries that stream's ids. Values go in as kwargs (``extra``),
never into the message text.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
from collections.abc import Iterable
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


class JsonSink:
    """JSON lines. Access lines (one per request) are written in batches: a flush (a
    syscall) per line cost more than the rest of their work (make bench). They reach
    `stream` when 64 are waiting, every `interval_s` (a daemon thread), with any other
    line (those are written at once), and when loguru stops the sink."""

    BATCH: Final = 64

    def __init__(self, stream: TextIO, interval_s: float = 0.1) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(interval_s,),
                                        name="log-flush", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def write(self, message: Message) -> None:
        record = message.record
        line = json_line(record) + "\n"
        with self._lock:
            self._lines.append(line)
            if len(self._lines) < self.BATCH and record["message"] == ACCESS_MESSAGE:
                return
            self._drain()

    def write_access(self, line: str) -> None:
        """An access line built by `AccessLog` itself (no newline): batched like above."""
        with self._lock:
            self._lines.append(line + "\n")
            if len(self._lines) >= self.BATCH:
                self._drain()

    def write_access_many(self, lines: Iterable[str]) -> None:
        """Several of `write_access`'s lines, under one lock."""
        with self._lock:
            self._lines.extend(line + "\n" for line in lines)
            if len(self._lines) >= self.BATCH:
                self._drain()

    def _drain(self) -> None:  # with the lock held
        if self._lines:
            self._stream.write("".join(self._lines))
            self._lines.clear()
            self._stream.flush()

    def _tick(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            with self._lock:
                self._drain()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._drain()


ACCESS_MESSAGE: Final = "access"

# The JSON sink while it is loguru's only sink and INFO lines pass: then access lines
# skip loguru (its record, frame lookup, patcher and formatting cost ~100 us per
# request in make bench) and go to the sink as ready JSON. None otherwise.
_direct: JsonSink | None = None


def direct_sink() -> JsonSink | None:
    """Where `AccessLog` may write its lines directly; None: log them through loguru."""
    return _direct


def sink_added() -> None:
    """Another loguru sink (OTLP logs) wants access lines too: stop bypassing loguru."""
    global _direct
    _direct = None


_CONSOLE_FORMAT: Final = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message} "
    "<dim>{extra}</dim>"
)


class _StdlibToLoguru(logging.Handler):
    """Lines of libraries that use stdlib logging (the OTel SDK's exporters, grpc) go
    through our sinks too, so stdout stays one JSON object per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(source=record.name).log(
            level, record.getMessage())


def install_correlation() -> None:
    """Make every record carry the current span's trace_id/span_id."""
    logger.configure(patcher=_correlate)


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Replace loguru's handlers with ours; called once by the app at startup."""
    global _direct
    _direct = None
    logger.remove()
    out = stream if stream is not None else sys.stdout
    install_correlation()
    logging.basicConfig(handlers=[_StdlibToLoguru()], level=logging.WARNING, force=True)
    if settings.format == "json":
        sink = JsonSink(out)
        logger.add(sink, level=settings.level, format="{message}",
                   backtrace=False, diagnose=False)
        if logger.level(settings.level.upper()).no <= logger.level("INFO").no:
            _direct = sink
    else:
        logger.add(out, level=settings.level, format=_CONSOLE_FORMAT,
                   backtrace=False, diagnose=False, colorize=out.isatty())
