"""render_traces: structure of the terminal trace tree."""

from __future__ import annotations

import json
from typing import Any

from ext_proc.dev.demo.receiver import ReceivedSpan
from ext_proc.dev.demo.tree import parse_log_line, render_traces

T1 = "11" * 16
T2 = "22" * 16
MS = 1_000_000


def span(
    name: str, span_id: str, parent: str = "", *, trace_id: str = T1, start: int = 0,
    end: int = 10, service: str = "svc", kind: int = 2, status: int = 0, message: str = "",
    **attributes: Any,
) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name, kind=kind,
        start_ns=start * MS, end_ns=end * MS,
        attributes={k.replace("__", "."): v for k, v in attributes.items()},
        status_code=status, status_message=message, resource={"service.name": service},
        scope="test",
    )


GATEWAY = span("GET /api/users", "a" * 16, "f" * 16, start=0, end=12, service="gateway",
               http__response__status_code=200, url__path="/api/users")
USERS = span("GET /api/users", "b" * 16, "a" * 16, start=2, end=10, service="users")
DB = span("SELECT users", "c" * 16, "b" * 16, start=3, end=4, service="users", kind=3,
          db__operation__name="SELECT")
LATE = span("late sibling", "d" * 16, "a" * 16, start=11, end=12, service="gateway",
            kind=1, status=2, message="boom")
OTHER = span("GET /other", "e" * 16, trace_id=T2, start=-5, end=-4, service="gateway",
             status=1)


def test_tree_structure_roots_siblings_and_remote_parent() -> None:
    # Input order scrambled on purpose: rendering sorts by start time.
    out = render_traces([DB, LATE, USERS, GATEWAY, OTHER])
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {T2}  1 span")  # the earlier trace comes first
    assert lines[1] == "└─ gateway  GET /other  SERVER  1.00 ms  OK"
    assert lines[2] == ""
    assert lines[3] == f"trace {T1}  4 spans  12.00 ms"
    assert lines[4] == ("└─ gateway  GET /api/users  SERVER  12.00 ms  "
                        "http.response.status_code=200 url.path=/api/users  "
                        "(parent ffffffff… remote)")
    assert lines[5] == "   ├─ users  GET /api/users  SERVER  8.00 ms"
    assert lines[6] == "   │  └─ users  SELECT users  CLIENT  1.00 ms  db.operation.name=SELECT"
    assert lines[7] == "   └─ gateway  late sibling  INTERNAL  1.00 ms  ERROR (boom)"
    assert len(lines) == 8
    assert "\x1b[" not in out


def test_logs_go_under_their_span_and_orphans_under_the_header() -> None:
    logs: list[dict[str, Any]] = [
        {"trace_id": T1, "span_id": "c" * 16, "message": "db query", "service": "users",
         "rows": 1},
        {"trace_id": T1, "span_id": "a" * 16, "msg": "access", "service": "gateway"},
        {"trace_id": T1, "span_id": "9" * 16, "message": "lost span"},
        {"trace_id": "33" * 16, "span_id": "a" * 16, "message": "unknown trace"},
    ]
    lines = render_traces([GATEWAY, USERS, DB], logs).splitlines()
    assert lines[1] == "│  · lost span"
    assert lines[2].startswith("└─ gateway  GET /api/users")
    assert lines[3] == "   │  · gateway: access"
    assert lines[4].startswith("   └─ users  GET /api/users")
    assert lines[5].startswith("      └─ users  SELECT users")
    assert lines[6] == "            · users: db query  rows=1"
    assert "unknown trace" not in "\n".join(lines)


def test_color_marks_errors_and_empty_input() -> None:
    colored = render_traces([LATE], color=True)
    assert "\x1b[31mERROR (boom)\x1b[0m" in colored
    assert render_traces([]) == ""


def test_parent_cycle_is_rendered_once_without_looping() -> None:
    x = span("x", "1" * 16, "2" * 16)
    y = span("y", "2" * 16, "1" * 16, start=1)
    lines = render_traces([x, y]).splitlines()
    assert sum(" x " in line for line in lines) == 1
    assert sum(" y " in line for line in lines) == 1


def test_parse_log_line_accepts_flat_and_loguru_serialized() -> None:
    flat = {"message": "hi", "trace_id": T1, "span_id": "a" * 16}
    assert parse_log_line(json.dumps(flat)) == flat
    loguru_line = json.dumps({"text": "hi\n", "record": {
        "message": "hi", "extra": {"trace_id": T1, "span_id": "a" * 16, "service": "gw"}}})
    assert parse_log_line(loguru_line) == {
        "message": "hi", "trace_id": T1, "span_id": "a" * 16, "service": "gw"}
    assert parse_log_line("not json") is None
    assert parse_log_line("[1, 2]") is None
