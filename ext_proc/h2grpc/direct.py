"""Direct calls: a bidirectional stream served by plain method calls from the
connection's own callbacks, with no task, request queue or async generator per
stream.

A method registered with `Server.add_direct_method` gets, per stream, a
`DirectStream` from its ``open``. Every request message is handed to
``message`` as soon as its bytes are read, and the answer goes into the write
batch of that read. Once the batch is written, each stream that answered gets
``answered``: the place for work that must not delay any answer. ``end`` comes
exactly once, when the peer closes the stream (``cancelled`` False), resets it or
goes away (True); ``unanswered`` tells whether the peer closed it before our last
answer could reach it. Each stream's callbacks run in a `contextvars.Context` of its
own, as a task would run them.

For the ext_proc stream this saves the per-stream task and the hops between
the generator, the request iterator and the loop (bench/README.md).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import grpc
from loguru import logger

from ext_proc.h2grpc.call import RESPONSE_HEADERS, AbortError, Headers, Replies, trailers

if TYPE_CHECKING:
    from ext_proc.h2grpc.connection import Connection

Metadata = tuple[tuple[str, Any], ...]


class DirectStream(Protocol):
    def message(self, request: Any) -> Any | None:
        """Answer one request message (None: no answer)."""

    def answered(self) -> None:
        """After this stream's answers so far were written (for recording)."""

    def end(self, cancelled: bool, unanswered: bool) -> None:
        """The stream is over: closed by the peer, or reset (`cancelled`).
        `unanswered`: the peer closed it in the same read as a message, so before our
        answer to that message reached it (for ext_proc: Envoy gave up waiting)."""


class DirectMethod(NamedTuple):
    open: Callable[[Metadata], DirectStream | None]  # None: refuse, UNAVAILABLE
    request_deserializer: Callable[[bytes], Any]
    response_serializer: Callable[[Any], bytes]
    refusal: str = "unavailable"  # grpc-message of a refused stream


class DirectCall(Replies):
    """One stream of a `DirectMethod`: what `Connection` needs of a call."""

    task = None  # no task: the server's stop has nothing to cancel
    waiting = False  # never in the backlog

    def __init__(self, connection: Connection, stream_id: int, method: DirectMethod,
                 stream: DirectStream, context: contextvars.Context) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._method = method
        self._stream = stream
        self._context = context
        self.buffer = bytearray()  # request bytes not yet a whole message
        self.headers_sent = False
        self.finished = False  # our trailers are out, or the stream is gone
        self.failed = False
        self.half_closed = False
        self._cancelled = False
        self._closed_unanswered = False
        self._unanswered = False  # `answered` is due
        self._in_flight = False  # an answer of this read is not written yet
        self._ended = False  # `end` is due or done
        self._end_told = False
        self._queued = False  # in the connection's list of calls to settle

    @classmethod
    def open(cls, connection: Connection, stream_id: int, method: DirectMethod,
             headers: Headers) -> DirectCall | None:
        """The call, or None when `method` refused it (trailers sent)."""
        context = contextvars.copy_context()
        try:
            stream = context.run(method.open, connection.metadata(headers))
        except Exception:
            logger.opt(exception=True).error("gRPC handler failed", stream_id=stream_id)
            stream, refusal = None, (grpc.StatusCode.UNKNOWN, "Unexpected error in handler")
        else:
            refusal = (grpc.StatusCode.UNAVAILABLE, method.refusal)
        if stream is None:
            connection.send_headers(stream_id, RESPONSE_HEADERS + trailers(*refusal),
                                    end_stream=True)
            return None
        return cls(connection, stream_id, method, stream, context)

    def cancelled(self) -> bool:
        return self._cancelled

    # -- fed by the connection ------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        """One whole request message: answer it now."""
        if self._unanswered:  # a second message in one read: the first is answered and
            self._connection.flush()  # recorded before this one is handled
            self._in_flight = False
            self._settle()
        try:
            request = self._method.request_deserializer(payload)
        except Exception:
            self.fail(AbortError(grpc.StatusCode.INTERNAL, "could not parse request message"))
            return
        try:
            response = self._context.run(self._stream.message, request)
            data = None if response is None else self._method.response_serializer(response)
        except Exception:
            logger.opt(exception=True).error("gRPC handler failed", stream_id=self.stream_id)
            self.fail(AbortError(grpc.StatusCode.UNKNOWN, "Unexpected error in handler"))
            return
        self._unanswered = True
        self._queue()
        if data is None:
            return
        self._in_flight = True
        self._send_message(data)

    def end_of_requests(self) -> None:
        """The peer closed its side: the call ends OK."""
        self.half_closed = True
        self._closed_unanswered = self._in_flight  # read with the message: before our answer
        self._finish(grpc.StatusCode.OK, "", cancelled=False)

    def fail(self, error: AbortError) -> None:
        """A bad request message (or a handler failure) ends the call with `error`."""
        self.failed = self.half_closed = True
        self.buffer.clear()
        self._finish(error.code, error.details, cancelled=False)

    def reset(self) -> None:
        """The peer reset the stream, or the connection is gone."""
        if self.finished:  # it had ended already: that ending stands
            return
        self.finished = True
        self._cancelled = True
        self._ended = True
        self._connection.forget(self)
        self._queue()

    def _finish(self, code: grpc.StatusCode, details: str, cancelled: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self._send_trailers(code, details)
        self._cancelled = cancelled
        self._ended = True
        self._connection.forget(self)
        self._queue()

    # -- after the batch is written ---------------------------------------------

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            self._connection.settle_later(self)

    def settle(self) -> None:
        """Run what is due, in order: `answered`, then `end` (once)."""
        self._queued = False
        self._in_flight = False
        self._settle()

    def _settle(self) -> None:
        if self._unanswered:
            self._unanswered = False
            self._run(self._stream.answered)
        if self._ended and not self._end_told:
            self._end_told = True
            self._run(self._stream.end, self._cancelled, self._closed_unanswered)

    def _run(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._context.run(callback, *args)
        except Exception:
            logger.opt(exception=True).error("gRPC handler failed", stream_id=self.stream_id)
