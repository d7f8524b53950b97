"""Admin HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``, ``/config``.

A deliberately tiny HTTP/1.1 server on asyncio streams (one request per
connection, GET/HEAD only, bounded header size and read time), so it shares
the event loop without blocking it; a scrape's collection and rendering run in
a worker thread. Loopback by default (see `AdminSettings`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from loguru import logger

from ext_proc.config.core import split_host_port
from ext_proc.config.telemetry import AdminSettings

Scrape = Callable[[str | None], tuple[str, bytes]]
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class AdminEndpoints:
    """What the endpoint reports; callables are read per request."""

    ready: Callable[[], bool]
    # the effective config, secrets already masked; read per request (sampling rules reload)
    config: Callable[[], dict[str, object]] | None = None
    scrape: Scrape | None = None  # (Accept header) -> (content type, body)


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    accept: str | None


def parse_request(head: bytes) -> _Request | None:
    """The request line and Accept header of an HTTP/1.x request head; None if malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    accept = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "accept":
            accept = value.strip()
    return _Request(parts[0], parts[1].split("?", 1)[0], accept)


class AdminServer:
    """Serves `AdminEndpoints` on ``settings.listen``; `start` returns the bound port."""

    MAX_HEAD: Final = 16 * 1024
    READ_TIMEOUT_S: Final = 5.0

    def __init__(self, settings: AdminSettings, endpoints: AdminEndpoints) -> None:
        if settings.listen is None:
            raise ValueError("admin.listen is not set")
        self._host, self._port = split_host_port(settings.listen)
        self._settings = settings
        self._endpoints = endpoints
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=self.MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("admin endpoint started", host=self._host, port=self.port)
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._reply(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _TEXT, b"")
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            request = parse_request(head)
            if request is None:
                await self._reply(writer, HTTPStatus.BAD_REQUEST, _TEXT, b"bad request\n")
                return
            status, ctype, body = await self._route(request)
            await self._reply(writer, status, ctype, body, head_only=request.method == "HEAD")
        except (ConnectionError, OSError):
            pass
        except Exception:
            logger.opt(exception=True).error("admin request failed")
        finally:
            writer.close()

    async def _route(self, request: _Request) -> tuple[HTTPStatus, str, bytes]:
        if request.method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, _TEXT, b"method not allowed\n"
        ep = self._endpoints
        if request.path == "/healthz":
            return HTTPStatus.OK, _TEXT, b"ok\n"
        if request.path == "/readyz":
            if ep.ready():
                return HTTPStatus.OK, _TEXT, b"ready\n"
            return HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, b"not ready\n"
        if request.path == "/metrics" and ep.scrape is not None and self._settings.metrics:
            ctype, body = await asyncio.to_thread(ep.scrape, request.accept)
            return HTTPStatus.OK, ctype, body
        if request.path == "/config" and ep.config is not None and self._settings.config:
            return HTTPStatus.OK, _JSON, (json.dumps(ep.config(), indent=2) + "\n").encode()
        return HTTPStatus.NOT_FOUND, _TEXT, b"not found\n"

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: HTTPStatus, ctype: str, body: bytes,
                     *, head_only: bool = False) -> None:
        head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + body)
        await writer.drain()
