"""The engine's tests run over each HTTP/2 layer (`server.http2_layer`): the builtin
one (the default) and the h2 library (the fallback)."""

from __future__ import annotations

import pytest

from ext_proc.h2grpc import server

_ENGINE_MODULES = ("test_h2grpc", "test_h2grpc_direct", "test_h2grpc_wire")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in _ENGINE_MODULES:
        metafunc.fixturenames.append("http2_layer")
        metafunc.parametrize("http2_layer", server.HTTP2_LAYERS, indirect=True)


@pytest.fixture
def http2_layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Servers built without `http2_layer` take this one."""
    monkeypatch.setattr(server, "HTTP2_LAYER", request.param)
    return str(request.param)
