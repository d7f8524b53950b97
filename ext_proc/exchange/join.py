"""`AccessLogJoin`: Envoy's access log (ALS) joined to ext_proc exchanges by request id.

Which exchanges wait for their entry, and for how long (`SpanFinalizer` does the
waiting), whether Envoy sends an access log at all, and when every waiting
exchange has been joined (shutdown).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb
from ext_proc.exchange.als import AccessLogService, FinalFacts, final_facts
from ext_proc.exchange.finalizer import Finish, SpanFinalizer
from ext_proc.request.seams import Bounded


class AccessLogJoin:
    """Envoy's access log (gRPC ALS) joined to ext_proc exchanges by request id.

    An exchange whose response was seen waits up to `timeout_s` for its entry; one
    whose stream closed before any response (a client abort, or an Envoy that skips
    the response phase: the lean envoy/envoy.yaml) waits up to `response_wait_s`, since
    the entry comes only when the request ends. A stream Envoy reset (client abort,
    message_timeout) counts as responded: its request is over or goes on untraced,
    so its entry is due at once, or was dropped (Envoy drops entries under the
    very overload that makes it time out). Envoy opens its ALS stream with the
    first entry it logs, so before that exchanges wait just the same; if no stream has
    come `probe_s` after the first exchange, Envoy is taken not to send one: waiting
    exchanges finish, and later ones finish at once (until a stream does come).

    In overload (Envoy timed out on the sidecar in the last `OVERLOAD_WINDOW_S`: an
    entry came without our answer's metadata), Envoy also drops access-log entries
    (``logs_dropped``), so an exchange that closes then waits `OVERLOAD_WAIT_S`, not
    `response_wait_s`: one whose entry was dropped stops counting as an active request
    soon after the overload. The price: a request of that time running longer ends
    without Envoy's facts, and its late entry is counted as un-asked (twice).
    """

    def __init__(self, timeout_s: float, response_wait_s: float,
                 loop_time: Callable[[], float] = time.monotonic,
                 probe_s: float = 10.0, *,
                 unasked: Callable[[list[log_pb.HTTPAccessLogEntry]], None] | None = None,
                 namespace: str = "extproc_otel") -> None:
        self.finalizer = SpanFinalizer(loop_time, timeout_s, on_finished=self._finished)
        self.awaiting = SpanFinalizer(loop_time, response_wait_s, max_kept=0,
                                      on_finished=self._finished)
        # the same, for exchanges that closed while Envoy was timing out on the sidecar:
        # then Envoy also drops access-log entries (logs_dropped), and an exchange waiting
        # for a dropped one would count as an active request for response_wait_s
        self.hurried = SpanFinalizer(loop_time, min(response_wait_s, self.OVERLOAD_WAIT_S),
                                     max_kept=0, on_finished=self._finished)
        self._overload_until = float("-inf")
        self._dropped_seen = 0
        # `unasked`: entries of requests Envoy did not ask us about (exchange/unasked.py)
        self._unasked = unasked
        self.service = AccessLogService(
            self.deliver, on_unasked=self._count_unasked if unasked is not None else None,
            namespace=namespace, awaited=self.awaited)
        # entries just counted as un-asked, by request id, oldest first: in overload an
        # entry can come before its exchange's first message is even read; the exchange
        # then finds it here instead of waiting response_wait_s for it. An OrderedDict:
        # `next(iter(d))` on a plain dict walks the slots of every entry deleted since
        # its last resize (~4.5 µs per un-asked entry at this size, against 0.3). Each
        # entry is kept serialized (~0.6 µs): a decoded entry keeps its whole access-log
        # message's arena alive, ~27 MiB for 16,384 entries from ~365 messages.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._now = loop_time
        self._probe_s = probe_s
        self._probe_until: float | None = None
        self._settled: asyncio.Event | None = None  # for `settled`
        # request ids of exchanges still open (their entry may come first: overload,
        # message_timeout, observability mode); an ordered set, oldest first
        self._open: OrderedDict[str, None] = OrderedDict()

    MAX_OPEN: Final = 65_536  # open exchanges remembered (a stream that never closes
    # cleanly must not grow the set: the oldest is forgotten)

    def opened(self, request_id: str | None) -> None:
        """An exchange for `request_id` is open: its entry is not an un-asked request's."""
        if request_id:
            self._open[request_id] = None
            if len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)

    OVERLOAD_WAIT_S: Final = 10.0  # the wait for an entry, in overload
    OVERLOAD_WINDOW_S: Final = 10.0  # overload lasts this long after its last sign

    def overloaded(self) -> bool:
        """Whether Envoy timed out on the sidecar lately: an entry came for an exchange
        without our answer's metadata (or before the exchange was read)."""
        now, dropped = self._now(), self.service.answers_dropped
        if dropped != self._dropped_seen:
            self._dropped_seen = dropped
            self._overload_until = now + self.OVERLOAD_WINDOW_S
        return now < self._overload_until

    MAX_RECENT: Final = 16_384  # un-asked entries remembered (~2 s at 8,000 req/s)

    def _count_unasked(self, entries: list[log_pb.HTTPAccessLogEntry]) -> None:
        recent = self._recent
        for entry in entries:
            request_id = entry.request.request_id
            if request_id:
                recent[request_id] = entry.SerializeToString()
        while len(recent) > self.MAX_RECENT:
            recent.popitem(last=False)
        if self._unasked is not None:
            self._unasked(entries)

    def defer(self, request_id: str, finish: Finish, *, responded: bool = True) -> None:
        self._open.pop(request_id, None)
        counted = self._recent.pop(request_id, None)
        if counted is not None:  # its entry came first, and was counted as un-asked
            self._overload_until = self._now() + self.OVERLOAD_WINDOW_S
            finish(final_facts(log_pb.HTTPAccessLogEntry.FromString(counted)))
            return
        awaiting = self.hurried if self.overloaded() else self.awaiting
        if not self.service.connected:
            now = self._now()
            if self._probe_until is None:
                self._probe_until = now + self._probe_s
                self._arm_probe()
            if now > self._probe_until:
                self._probe_expired()
                finish(None)  # no access log from this Envoy
            elif responded:
                self.finalizer.defer(request_id, finish)  # the first entry opens the stream
            else:
                awaiting.defer(request_id, finish)  # e.g. lean: the request runs on
        elif responded:
            self.finalizer.defer(request_id, finish)
        else:
            early = self.finalizer.take_kept(request_id)
            if early is not None:
                finish(early)
            else:
                awaiting.defer(request_id, finish)

    def _arm_probe(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (unit tests drive `defer` directly)
            return
        loop.call_later(self._probe_s, self._probe_expired)

    def _probe_expired(self) -> None:
        """No access-log stream within the probe: exchanges waiting for their request's
        end would wait `response_wait_s` for nothing; finish them now."""
        if not self.service.connected:
            self.awaiting.flush()
            self.hurried.flush()
            self._finished()

    def awaited(self, request_id: str) -> bool:
        """Whether an exchange, open or closed, waits for this request's entry."""
        return (request_id in self._open or self.awaiting.is_parked(request_id)
                or self.hurried.is_parked(request_id) or self.finalizer.is_parked(request_id))

    def deliver(self, facts: FinalFacts) -> None:
        if self.awaiting.is_parked(facts.request_id):
            self.awaiting.deliver(facts)
        elif self.hurried.is_parked(facts.request_id):
            self.hurried.deliver(facts)
        else:
            self.finalizer.deliver(facts)  # finishes a parked exchange, or keeps the entry

    def pending(self) -> int:
        return self.finalizer.pending() + self.awaiting.pending() + self.hurried.pending()

    def bounded(self) -> tuple[Bounded, ...]:
        return (Bounded("join.open", self._open.__len__, self.MAX_OPEN),
                Bounded("join.recent", self._recent.__len__, self.MAX_RECENT),
                *self.finalizer.bounded("join"), *self.awaiting.bounded("join.awaiting"),
                *self.hurried.bounded("join.hurried"))

    async def settled(self) -> None:
        """Return once no exchange waits for its entry: on shutdown, the requests still
        in flight (with envoy.yaml's lean mode, every request outlives its stream) have
        ended and been joined. Bound it with asyncio.timeout."""
        while self.pending():
            self._settled = asyncio.Event()
            await self._settled.wait()

    def _finished(self) -> None:
        if self._settled is not None and not self.pending():
            self._settled.set()

    def flush(self) -> None:
        self.finalizer.flush()
        self.awaiting.flush()
        self.hurried.flush()
