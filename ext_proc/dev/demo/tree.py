"""Render received spans (and correlated log lines) as trace trees in a terminal.

::

    trace 4bf92f3577b34da6a3ce929d0e0e4736  3 spans  12.3 ms
    └─ gateway  GET /api/users  SERVER  12.3 ms  http.response.status_code=200
       │  · gateway: access
       └─ users  GET /api/users  SERVER  8.1 ms  http.response.status_code=200
          └─ users  SELECT users  CLIENT  0.4 ms  db.operation.name=SELECT
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ext_proc.dev.demo.receiver import ReceivedSpan

KINDS: Final = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER",
                5: "CONSUMER"}
KEY_ATTRIBUTES: Final = ("envoy.phase", "http.response.status_code", "url.path",
                         "rpc.grpc.status_code", "db.operation.name", "error.type")
STATUS_ERROR: Final = 2
STATUS_OK: Final = 1
MESSAGE_KEYS: Final = ("msg", "message")

_BRANCH: Final = "├─ "
_LAST: Final = "└─ "
_PIPE: Final = "│  "
_GAP: Final = "   "
_LOG_MARK: Final = "· "
_REMOTE_PREFIX: Final = 8

_RESET: Final = "\x1b[0m"
_BOLD: Final = "\x1b[1m"
_DIM: Final = "\x1b[2m"
_RED: Final = "\x1b[31m"
_GREEN: Final = "\x1b[32m"
_CYAN: Final = "\x1b[36m"


class _Painter:
    def __init__(self, color: bool) -> None:
        self._color = color

    def __call__(self, text: str, style: str) -> str:
        return f"{style}{text}{_RESET}" if self._color and text else text


def parse_log_line(line: str) -> dict[str, Any] | None:
    """A JSON log line as a flat dict, or None.

    Accepts flat lines (``{"message": ..., "trace_id": ...}``) and loguru's
    ``serialize=True`` shape (``{"text": ..., "record": {"message", "extra"}}``).
    """
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    record = data.get("record")
    if isinstance(record, dict):
        extra = record.get("extra")
        flat: dict[str, Any] = dict(extra) if isinstance(extra, dict) else {}
        flat.setdefault("message", record.get("message", ""))
        return flat
    return data


def _log_message(log: Mapping[str, Any]) -> str:
    for key in MESSAGE_KEYS:
        if key in log:
            return str(log[key])
    return ""


def _log_text(log: Mapping[str, Any], paint: _Painter) -> str:
    service = log.get("service")
    prefix = f"{service}: " if service else ""
    skip = {"trace_id", "span_id", "trace_flags", "service", "time", "ts", "level", *MESSAGE_KEYS}
    fields = " ".join(f"{k}={v}" for k, v in log.items() if k not in skip)
    return paint(_LOG_MARK + prefix + _log_message(log) + (f"  {fields}" if fields else ""), _DIM)


def _span_text(span: ReceivedSpan, paint: _Painter, remote_parent: bool) -> str:
    service = str(span.resource.get("service.name", "?"))
    parts = [paint(service, _CYAN), paint(span.name, _BOLD), KINDS.get(span.kind, str(span.kind)),
             f"{(span.end_ns - span.start_ns) / 1e6:.2f} ms"]
    if span.status_code == STATUS_ERROR:
        detail = f" ({span.status_message})" if span.status_message else ""
        parts.append(paint("ERROR" + detail, _RED))
    elif span.status_code == STATUS_OK:
        parts.append(paint("OK", _GREEN))
    attrs = [f"{key}={span.attributes[key]}" for key in KEY_ATTRIBUTES if key in span.attributes]
    if attrs:
        parts.append(" ".join(attrs))
    if remote_parent:
        parts.append(paint(f"(parent {span.parent_span_id[:_REMOTE_PREFIX]}… remote)", _DIM))
    return "  ".join(parts)


class _TraceRenderer:
    """Draws one trace: spans by parent, siblings by start time, logs under spans."""

    def __init__(self, spans: Sequence[ReceivedSpan], logs: Sequence[Mapping[str, Any]],
                 paint: _Painter) -> None:
        self._paint = paint
        self._ids = {span.span_id for span in spans}
        self._children: dict[str, list[ReceivedSpan]] = {}
        for span in sorted(spans, key=lambda s: (s.start_ns, s.end_ns)):
            self._children.setdefault(self._parent_key(span), []).append(span)
        self._logs: dict[str, list[Mapping[str, Any]]] = {}
        for log in logs:
            span_id = str(log.get("span_id") or "")
            self._logs.setdefault(span_id if span_id in self._ids else "", []).append(log)
        self._seen: set[int] = set()
        self._lines: list[str] = []

    def _parent_key(self, span: ReceivedSpan) -> str:
        parent = span.parent_span_id
        return parent if parent and parent in self._ids and parent != span.span_id else ""

    def render(self, header: str) -> list[str]:
        self._lines.append(header)
        roots = self._children.get("", [])
        orphans = self._logs.get("", [])
        for log in orphans:
            self._lines.append(("│  " if roots else _GAP) + _log_text(log, self._paint))
        self._draw(roots, "")
        # Spans caught in a parent cycle are unreachable from a root: show them flat.
        leftovers = [s for kids in self._children.values() for s in kids
                     if id(s) not in self._seen]
        self._draw(leftovers, "")
        return self._lines

    def _draw(self, spans: Sequence[ReceivedSpan], indent: str) -> None:
        for index, span in enumerate(spans):
            if id(span) in self._seen:
                continue
            self._seen.add(id(span))
            last = index == len(spans) - 1
            remote = bool(span.parent_span_id) and span.parent_span_id not in self._ids
            self._lines.append(indent + (_LAST if last else _BRANCH)
                               + _span_text(span, self._paint, remote))
            child_indent = indent + (_GAP if last else _PIPE)
            kids = self._children.get(span.span_id, [])
            for log in self._logs.get(span.span_id, []):
                self._lines.append(child_indent + (_PIPE if kids else _GAP)
                                   + _log_text(log, self._paint))
            self._draw(kids, child_indent)


def render_traces(
    spans: Sequence[ReceivedSpan],
    logs: Sequence[Mapping[str, Any]] = (),
    *,
    color: bool = False,
) -> str:
    """Every trace in ``spans`` as an indented tree, earliest trace first.

    ``logs`` are dicts with ``trace_id``, ``span_id`` and ``msg``/``message``
    (optionally ``service``); each is drawn under its span, or under the trace
    header when its span is not among ``spans``. Logs of unknown traces are
    left out.
    """
    paint = _Painter(color)
    traces: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    logs_by_trace: dict[str, list[Mapping[str, Any]]] = {}
    for log in logs:
        trace_id = str(log.get("trace_id") or "")
        if trace_id in traces:
            logs_by_trace.setdefault(trace_id, []).append(log)
    blocks: list[str] = []
    for trace_id, members in sorted(traces.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        start = min(s.start_ns for s in members)
        end = max(s.end_ns for s in members)
        noun = "span" if len(members) == 1 else "spans"
        header = (f"{paint('trace', _BOLD)} {trace_id}  {len(members)} {noun}  "
                  f"{(end - start) / 1e6:.2f} ms")
        renderer = _TraceRenderer(members, logs_by_trace.get(trace_id, []), paint)
        blocks.append("\n".join(renderer.render(header)))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
