"""The server: listeners, method table, start and stop (the grpc.aio.Server surface
the sidecar uses, so generated ``add_*Servicer_to_server`` functions work as is)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

from loguru import logger

from ext_proc.config.core import split_host_port
from ext_proc.h2grpc.connection import KEPT_METADATA, Connection
from ext_proc.h2grpc.direct import DirectMethod
from ext_proc.h2grpc.h2state import CLOSED_STREAMS_KEPT, KEPT_HEADER_BLOCKS
from ext_proc.telemetry.throttle import Throttle

HTTP2_LAYERS: Final = ("builtin", "h2")
HTTP2_LAYER = "builtin"  # the default (the suite runs the engine's tests with each)


class _Details(NamedTuple):  # grpc.HandlerCallDetails for generic handlers
    method: str
    invocation_metadata: tuple[()]


class Server:
    def __init__(self, *, max_concurrent_streams: int = 10_000,
                 max_receive_message_length: int = 4 * 1024 * 1024,
                 reuse_port: bool = False, max_backlog: int = 1 << 30,
                 sheddable: Iterable[str] = (), http2_layer: str | None = None) -> None:
        """`max_backlog`: once that many calls wait for their handler to start, new
        calls to a `sheddable` method ("/package.Service/Method") are answered
        UNAVAILABLE at once instead of joining the queue (load shedding).
        `http2_layer`: "builtin" (ext_proc.h2grpc.http2) or "h2" (the h2 library);
        None: HTTP2_LAYER."""
        self.http2_layer = http2_layer or HTTP2_LAYER
        if self.http2_layer not in HTTP2_LAYERS:
            raise ValueError(f"http2_layer: {self.http2_layer!r} is not one of {HTTP2_LAYERS}")
        self.max_concurrent_streams = max_concurrent_streams
        self.max_backlog = max_backlog
        self.sheddable = frozenset(path.encode() for path in sheddable)
        self.backlog = 0  # calls created whose handler has not started yet
        self.shed = 0  # calls refused because of the backlog
        self.protocol_errors = 0  # connections or streams ended by bad HTTP/2 input
        self._error_log = Throttle()
        self.max_receive_message_length = max_receive_message_length
        self._reuse_port = reuse_port
        self._methods: dict[bytes, Any] = {}
        self.direct: dict[bytes, DirectMethod] = {}
        self._generic: list[Any] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._listeners: list[asyncio.Server] = []
        self.connections: set[Connection] = set()
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()  # set when a connection's pending output emptied

    def bounded(self) -> tuple[tuple[str, Callable[[], int], int], ...]:
        """(name, size, capacity) of what it keeps between frames beyond the calls
        themselves: calls waiting for their handler; per connection (the fullest one's
        size, the bound of each), decoded metadata, HPACK blocks and closed streams
        remembered."""
        return (("server.backlog", lambda: self.backlog, self.max_backlog),
                ("server.header_blocks",
                 lambda: max((c.kept_metadata() for c in self.connections), default=0),
                 KEPT_METADATA),
                ("server.hpack_blocks",
                 lambda: max((c.kept_blocks() for c in self.connections), default=0),
                 2 * KEPT_HEADER_BLOCKS),  # received and sent
                ("server.closed_streams",
                 lambda: max((c.closed_streams() for c in self.connections), default=0),
                 CLOSED_STREAMS_KEPT))

    # -- registration (what generated code calls) -------------------------------

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = handler

    def add_direct_method(self, path: str, method: DirectMethod) -> None:
        """Serve `path` ("/package.Service/Method") as direct calls (h2grpc.direct);
        it takes precedence over a handler registered for the same path."""
        self.direct[path.encode()] = method

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self._generic.extend(handlers)

    def handler(self, path: bytes) -> Any:
        """The RpcMethodHandler for a :path, or None (UNIMPLEMENTED)."""
        found = self._methods.get(path)
        if found is None and self._generic and len(self._methods) < 4096:
            details = _Details(path.decode("latin-1"), ())
            try:
                found = next((h for g in self._generic
                              if (h := g.service(details)) is not None), None)
            except Exception:
                logger.opt(exception=True).error("generic handler lookup failed",
                                                 method=details.method)
                return None
            if found is not None:
                self._methods[path] = found
        return found

    # -- listening --------------------------------------------------------------

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, context: ssl.SSLContext) -> int:
        return self._bind(address, context)

    def _bind(self, address: str, context: ssl.SSLContext | None) -> int:
        """Bind every address `address` resolves to (one port); returns the port."""
        host, port = split_host_port(address)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        seen: set[Any] = set()
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError:
                sock.close()
                raise
            port = sock.getsockname()[1]  # the first bind picks it when 0
            self._sockets.append((sock, context))
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, context in self._sockets:
            self._listeners.append(await loop.create_server(
                lambda: Connection(self), sock=sock, ssl=context, backlog=1024))

    def protocol_error(self, what: str, peer: str, error: BaseException) -> None:
        """Count bad input from a peer; log it at DEBUG at most every 10 s."""
        self.protocol_errors += 1
        suppressed = self._error_log.ready()
        if suppressed is None:
            return
        logger.opt(exception=error).debug(what, peer=peer, error=str(error),
                                          suppressed=suppressed)

    def output_drained(self) -> None:
        """A connection has no response bytes waiting for window any more."""
        self._drained.set()

    def close(self) -> None:
        """Stop listening and send every connection a GOAWAY: no new calls; the open
        ones go on (`stop` waits for them)."""
        for listener in self._listeners:
            listener.close()
        for connection in list(self.connections):
            connection.goaway()

    async def stop(self, grace: float | None) -> None:
        """`close`; in-flight calls get `grace` seconds, then are cancelled."""
        self.close()
        tasks = [call.task for c in self.connections for call in c.calls.values()
                 if call.task is not None]
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        if grace and tasks:
            await asyncio.wait(tasks, timeout=grace)
        # answers still to send, or direct calls still open (they end with the peer)
        while any(c.pending_output or c.calls for c in self.connections):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), left)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self.connections):
            connection.close(abort=True)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()
