"""The demo HTTP "users" upstream.

``python -m ext_proc.dev.demo.users_service --listen 127.0.0.1:PORT [--db PATH]``

It continues the incoming W3C trace with a SERVER span per request and, for
``/api/users`` and ``/api/users/{id}``, a CLIENT child span around a real
sqlite3 query. ``/echo...`` answers with the request line and every header it
received (tests use it as the upstream that records headers), ``/status/{code}``
answers that status, ``/slow?ms=N`` waits N ms (at most 10 s), ``/healthz``.
Logs: one flat JSON line per request on stdout, correlated with the span.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from loguru import logger
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ext_proc.dev.demo import SEED_USERS, service_args
from ext_proc.request.headers import CARRIER_GETTER, Carrier

SERVICE_NAME: Final = "users"
MAX_SLOW_MS: Final = 10_000
POLL_S: Final = 0.05  # serve_forever's shutdown poll: how fast SIGTERM is honoured

# Semantic-convention keys (stable HTTP and database conventions).
HTTP_METHOD: Final = "http.request.method"
HTTP_ROUTE: Final = "http.route"
HTTP_STATUS: Final = "http.response.status_code"
URL_PATH: Final = "url.path"
URL_QUERY: Final = "url.query"
URL_SCHEME: Final = "url.scheme"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
USER_AGENT: Final = "user_agent.original"
PROTOCOL_VERSION: Final = "network.protocol.version"
ERROR_TYPE: Final = "error.type"
DB_SYSTEM_NAME: Final = "db.system.name"
DB_OPERATION: Final = "db.operation.name"
DB_QUERY_TEXT: Final = "db.query.text"
DB_COLLECTION: Final = "db.collection.name"

_USER_RE: Final = re.compile(r"^/api/users/(?P<id>[^/]+)$")
_STATUS_RE: Final = re.compile(r"^/status/(?P<code>\d{3})$")


class UserStore:
    """The sqlite ``users`` table; every query runs inside a CLIENT span."""

    TABLE: Final = "users"
    SELECT_ALL: Final = "SELECT id, name, email FROM users ORDER BY id"
    SELECT_ONE: Final = "SELECT id, name, email FROM users WHERE id = ?"

    def __init__(self, conn: sqlite3.Connection, tracer: trace.Tracer) -> None:
        self._conn, self._tracer, self._lock = conn, tracer, threading.Lock()

    @classmethod
    def open(cls, path: str, tracer: trace.Tracer) -> UserStore:
        conn = sqlite3.connect(path, check_same_thread=False)
        with conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS users "
                "(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)"
            )
            conn.executemany("INSERT OR IGNORE INTO users VALUES (?, ?, ?)", SEED_USERS)
        return cls(conn, tracer)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def all(self) -> list[dict[str, Any]]:
        return self._select(self.SELECT_ALL, ())

    def get(self, user_id: int) -> dict[str, Any] | None:
        rows = self._select(self.SELECT_ONE, (user_id,))
        return rows[0] if rows else None

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        attributes = {DB_SYSTEM_NAME: "sqlite", DB_OPERATION: "SELECT",
                      DB_COLLECTION: self.TABLE, DB_QUERY_TEXT: sql}
        with self._tracer.start_as_current_span(
            f"SELECT {self.TABLE}", kind=SpanKind.CLIENT, attributes=attributes
        ):
            with self._lock:
                rows = self._conn.execute(sql, params).fetchall()
            logger.info("db query", db_operation="SELECT", db_collection=self.TABLE,
                        rows=len(rows))
        return [{"id": r[0], "name": r[1], "email": r[2]} for r in rows]


class UsersApp:
    """Routing and tracing for one request; shared by all handler threads."""

    def __init__(self, tracer: trace.Tracer, store: UserStore, stop: threading.Event) -> None:
        self._tracer, self._store, self._stop = tracer, store, stop
        self._propagator = TraceContextTextMapPropagator()

    def handle(self, req: UsersHandler) -> None:
        started = time.perf_counter()
        url = urlsplit(req.path)
        carrier: Carrier = {}
        for name, value in req.headers.items():
            carrier.setdefault(name.lower(), []).append(value)
        body = req.read_body()
        route, status, payload = self._route(req.command, url.path, url.query, carrier, body)
        parent = self._propagator.extract(carrier, getter=CARRIER_GETTER)
        attributes: dict[str, Any] = {
            HTTP_METHOD: req.command, URL_PATH: url.path, URL_SCHEME: "http",
            SERVER_ADDRESS: req.server.server_address[0], SERVER_PORT: req.server.server_address[1],
            CLIENT_ADDRESS: req.client_address[0], PROTOCOL_VERSION: "1.1",
        }
        if url.query:
            attributes[URL_QUERY] = url.query
        if route is not None:
            attributes[HTTP_ROUTE] = route
        if "user-agent" in carrier:
            attributes[USER_AGENT] = carrier["user-agent"][0]
        name = f"{req.command} {route}" if route else req.command
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            if route in ("/api/users", "/api/users/{id}"):
                try:
                    status, payload = self._users(url.path)
                except sqlite3.Error as exc:
                    span.record_exception(exc)
                    logger.opt(exception=True).error("query failed", path=url.path)
                    status, payload = 500, {"error": "database error"}
            elif route == "/slow":
                self._stop.wait(_slow_ms(url.query) / 1000)
            span.set_attribute(HTTP_STATUS, status)
            if status >= 500:
                span.set_attribute(ERROR_TYPE, str(status))
                span.set_status(Status(StatusCode.ERROR))
            req.reply(status, payload)
            logger.info("request", method=req.command, path=url.path, status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 3))

    def _route(
        self, method: str, path: str, query: str, carrier: Carrier, body: bytes
    ) -> tuple[str | None, int, Any]:
        """(route template, status, JSON payload) for everything but the DB routes."""
        if path.startswith("/echo"):
            return "/echo", 200, {
                "method": method, "path": path, "query": query, "headers": carrier,
                "body": body.decode("utf-8", "replace")}
        if method not in ("GET", "HEAD"):
            return None, 405, {"error": "method not allowed"}
        if path == "/api/users":
            return "/api/users", 200, None
        if _USER_RE.match(path):
            return "/api/users/{id}", 200, None
        if match := _STATUS_RE.match(path):
            code = int(match.group("code"))
            if 200 <= code <= 599:
                return "/status/{code}", code, {"status": code}
            return "/status/{code}", 400, {"error": "status must be 200..599"}
        if path == "/slow":
            return "/slow", 200, {"slept_ms": _slow_ms(query)}
        if path == "/healthz":
            return "/healthz", 200, {"status": "ok"}
        return None, 404, {"error": "not found", "path": path}

    def _users(self, path: str) -> tuple[int, Any]:
        match = _USER_RE.match(path)
        if match is None:
            return 200, {"users": self._store.all()}
        user_id = _int_or_none(match.group("id"))
        user = self._store.get(user_id) if user_id is not None else None
        if user is None:
            return 404, {"error": "user not found", "id": match.group("id")}
        return 200, user


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 19 else None


def _slow_ms(query: str) -> int:
    values = parse_qs(query).get("ms", ["0"])
    ms = _int_or_none(values[0]) or 0
    return min(ms, MAX_SLOW_MS)


class UsersServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen backlog: socketserver's 5 refuses connections when Envoy opens dozens at
    # once (a burst of concurrent requests), and Envoy answers those 503 itself
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: UsersApp) -> None:
        self.app = app
        super().__init__(address, UsersHandler)


class UsersHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without this, Nagle holds the body until
    # the delayed ACK (~40 ms on every reused keep-alive connection)
    disable_nagle_algorithm = True
    server: UsersServer

    def _dispatch(self) -> None:
        self.server.app.handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def read_body(self) -> bytes:
        length = _int_or_none(self.headers.get("content-length", "0").strip()) or 0
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, payload: Any) -> None:
        body = b"" if status in (204, 304) else json.dumps(payload).encode()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's stderr access log: our JSON line replaces it."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.dev.demo.users_service")
    parser.add_argument("--listen", default="127.0.0.1:8080",
                        help="HOST:PORT (port 0: any); envoy/envoy.yaml expects 127.0.0.1:8080")
    parser.add_argument("--db", default=":memory:", help="sqlite database file")
    args, address, provider = service_args(parser, argv, SERVICE_NAME)
    tracer = provider.get_tracer("ext_proc.dev.demo.users_service")
    stop = threading.Event()
    store = UserStore.open(args.db, tracer)
    server = UsersServer(address, UsersApp(tracer, store, stop))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, args=(POLL_S,), name="users-http",
                              daemon=True)
    thread.start()
    logger.info("listening", host=address[0], port=server.server_address[1])
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        provider.shutdown()
        store.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logger.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
