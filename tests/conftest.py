"""Shared test helpers: loguru -> caplog bridge, an OTLP receiver, HTTP client."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from loguru import logger

from ext_proc.dev.demo.receiver import OtlpReceiver


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Loguru records reach pytest's caplog (loguru's migration guide)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0,
                            filter=lambda record: record["level"].no >= caplog.handler.level)
    yield caplog
    logger.remove(handler_id)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/gRPC receiver on a free loopback port, for one test (modules that
    share one across their tests define a module-scoped `receiver` of their own)."""
    rx = OtlpReceiver()
    rx.start()
    yield rx
    rx.stop()


@pytest.fixture
def in_process_sidecar(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that run the sidecar in this process: no metrics export (nothing
    listens on the OTLP default) and no default loguru handler in the output."""
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    logger.remove()
    yield
    logger.remove()


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(base: str, path: str, headers: list[tuple[str, str]] | None = None,
                 method: str = "GET", timeout: float = 20.0) -> Reply:
    """One request on a fresh connection; duplicate header names are sent as given."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers or []:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        out: dict[str, list[str]] = {}
        for name, value in resp.getheaders():
            out.setdefault(name.lower(), []).append(value)
        return Reply(resp.status, out, body)
    finally:
        conn.close()
