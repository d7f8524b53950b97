"""The demo gRPC upstream: ``demo.v1.Users`` on grpc.aio.

``python -m ext_proc.dev.demo.grpc_service --listen 127.0.0.1:PORT``

``GetUser`` echoes every invocation metadata entry it received in
``received_metadata`` (``-bin`` values as unpadded base64; repeated keys joined
with ","), ``Fail`` aborts with the requested status. Each RPC continues the
W3C trace from its metadata with a SERVER span (rpc semantic conventions) and
writes one correlated JSON log line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from loguru import logger
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ext_proc._gen.demo.v1 import users_pb2, users_pb2_grpc
from ext_proc.dev.demo import SEED_USERS, service_args
from ext_proc.request.headers import CARRIER_GETTER, Carrier

SERVICE_NAME: Final = "users-grpc"
RPC_SERVICE_NAME: Final = "demo.v1.Users"
GRACE_S: Final = 2.0

RPC_SYSTEM: Final = "rpc.system"
RPC_SYSTEM_NAME: Final = "rpc.system.name"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
RPC_RESPONSE_STATUS_CODE: Final = "rpc.response.status_code"
ERROR_TYPE: Final = "error.type"

#: Server-side codes that mark the span as an error (rpc semantic conventions).
SERVER_ERROR_CODES: Final = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
_CODES_BY_NUMBER: Final = {code.value[0]: code for code in grpc.StatusCode}


def received_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """Invocation metadata as text: binary values base64 (unpadded), repeats joined by ","."""
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            text = base64.b64encode(value).decode("ascii").rstrip("=")
        else:
            text = value
        out[key] = f"{out[key]},{text}" if key in out else text
    return out


def _carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> Carrier:
    carrier: Carrier = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            carrier.setdefault(key.lower(), []).append(value)
    return carrier


@dataclass
class _Call:
    """The outcome of one RPC, filled in by the handler before it returns or aborts."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


class UsersServicer(users_pb2_grpc.UsersServicer):
    def __init__(self, tracer: trace.Tracer, users: Mapping[int, tuple[str, str]]) -> None:
        self._tracer, self._users = tracer, users
        self._propagator = TraceContextTextMapPropagator()

    async def GetUser(
        self, request: users_pb2.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> users_pb2.User:
        async with self._rpc("GetUser", context) as call:
            entry = self._users.get(request.id)
            if entry is None:
                await _abort(context, call, grpc.StatusCode.NOT_FOUND, "user not found")
            name, email = entry
            return users_pb2.User(
                id=request.id, name=name, email=email,
                received_metadata=received_metadata(context.invocation_metadata()))

    async def Fail(
        self, request: users_pb2.FailRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> users_pb2.User:
        async with self._rpc("Fail", context) as call:
            code = _CODES_BY_NUMBER.get(request.code)
            if code is None or code is grpc.StatusCode.OK:
                await _abort(context, call, grpc.StatusCode.INVALID_ARGUMENT,
                             "code must be a gRPC status 1..16")
            await _abort(context, call, code, request.message)

    @asynccontextmanager
    async def _rpc(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Call]:
        started = time.perf_counter()
        parent = self._propagator.extract(
            _carrier(context.invocation_metadata()), getter=CARRIER_GETTER)
        call = _Call()
        attributes = {RPC_SYSTEM: "grpc", RPC_SYSTEM_NAME: "grpc", RPC_SERVICE: RPC_SERVICE_NAME,
                      RPC_METHOD: method}
        full = f"{RPC_SERVICE_NAME}/{method}"
        with self._tracer.start_as_current_span(
            full, context=parent, kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                yield call
            except Exception as exc:
                if call.code is grpc.StatusCode.OK:  # not one of our aborts: a real failure
                    call.code, call.message = grpc.StatusCode.UNKNOWN, type(exc).__name__
                raise
            finally:
                span.set_attribute(RPC_GRPC_STATUS_CODE, call.code.value[0])
                span.set_attribute(RPC_RESPONSE_STATUS_CODE, call.code.name)
                if call.code in SERVER_ERROR_CODES:
                    span.set_attribute(ERROR_TYPE, call.code.name)
                    span.set_status(Status(StatusCode.ERROR, call.message))
                logger.info("rpc", method=full, path=f"/{full}", status=call.code.value[0],
                            grpc_status=call.code.name,
                            duration_ms=round((time.perf_counter() - started) * 1000, 3))


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], call: _Call, code: grpc.StatusCode, message: str
) -> NoReturn:
    call.code, call.message = code, message
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def serve(provider: TracerProvider, host: str, port: int) -> int:
    tracer = provider.get_tracer("ext_proc.dev.demo.grpc_service")
    users = {uid: (name, email) for uid, name, email in SEED_USERS}
    server = grpc.aio.server()
    users_pb2_grpc.add_UsersServicer_to_server(UsersServicer(tracer, users), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("listening", host=host, port=bound)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop(GRACE_S)
        await asyncio.to_thread(provider.shutdown)
        logger.info("stopped")
        await logger.complete()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.dev.demo.grpc_service")
    parser.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT (port 0: any)")
    _, address, provider = service_args(parser, argv, SERVICE_NAME)
    return asyncio.run(serve(provider, *address))


if __name__ == "__main__":
    raise SystemExit(main())
