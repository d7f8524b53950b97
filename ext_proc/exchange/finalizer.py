"""`SpanFinalizer`: join an exchange whose ext_proc stream closed with Envoy's access log.

The ext_proc stream close cannot tell a complete response from one cut short
after its headers; the access log entry (`FinalFacts`) can, but it arrives
later, in batches (or, rarely, before the stream closes). The finalizer parks a
closed exchange's ``finish`` until its entry arrives or ``timeout_s`` passes,
and keeps early entries for a while so a later `defer` finishes at once.

Everything runs on the event loop: one ``call_later`` timer for the oldest
parked exchange (all share one timeout, so they expire in arrival order), no
threads, no polling. Memory is bounded: on overflow the oldest parked exchange
is finished with None and the oldest kept entry is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from loguru import logger

from ext_proc.exchange.als import FinalFacts
from ext_proc.request.seams import Bounded

Finish = Callable[[FinalFacts | None], None]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]


@dataclass(slots=True)
class _Parked:
    request_id: str
    deadline: float
    finish: Finish


@dataclass(slots=True)
class _Kept:
    request_id: str
    deadline: float
    facts: FinalFacts


_T = TypeVar("_T", _Parked, _Kept)


class _AgedIndex(Generic[_T]):
    """Items in arrival order, also found by request id (oldest first per id)."""

    __slots__ = ("_by_id", "_items", "_seq")

    def __init__(self) -> None:
        self._items: OrderedDict[int, _T] = OrderedDict()
        self._by_id: dict[str, deque[int]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: _T) -> None:
        seq = next(self._seq)
        self._items[seq] = item
        self._by_id.setdefault(item.request_id, deque()).append(seq)

    def pop_id(self, request_id: str) -> _T | None:
        seqs = self._by_id.get(request_id)
        if not seqs:
            return None
        seq = seqs.popleft()
        if not seqs:
            del self._by_id[request_id]
        return self._items.pop(seq)

    def oldest(self) -> _T | None:
        return next(iter(self._items.values()), None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def pop_oldest(self) -> _T | None:
        if not self._items:
            return None
        _, item = self._items.popitem(last=False)
        seqs = self._by_id[item.request_id]
        seqs.popleft()  # the oldest overall is also the oldest of its id
        if not seqs:
            del self._by_id[item.request_id]
        return item

    def drain(self) -> Iterator[_T]:
        while (item := self.pop_oldest()) is not None:
            yield item


class SpanFinalizer:
    """Parks closed exchanges until Envoy's access log entry for them arrives."""

    MAX_PARKED: Final = 20_000
    MAX_KEPT: Final = 20_000

    def __init__(self, loop_time: Callable[[], float], timeout_s: float, *,
                 max_parked: int = MAX_PARKED, max_kept: int = MAX_KEPT,
                 keep_s: float | None = None, call_later: CallLater | None = None,
                 on_finished: Callable[[], None] | None = None) -> None:
        self._now = loop_time
        self._on_finished = on_finished  # after parked exchanges were finished
        self._timeout_s = timeout_s
        self._keep_s = timeout_s if keep_s is None else keep_s
        self._max_parked = max(1, max_parked)
        self._max_kept = max(0, max_kept)
        self._call_later = call_later  # None: the running loop's, resolved when first needed
        self._parked: _AgedIndex[_Parked] = _AgedIndex()
        self._kept: _AgedIndex[_Kept] = _AgedIndex()
        self._timer: Cancellable | None = None
        # counters, for metrics
        self.joined = 0  # finished with their access log entry
        self.timed_out = 0  # finished with None: no entry within timeout_s
        self.overflowed = 0  # finished with None early: too many parked
        self.flushed = 0  # finished with None by flush()
        self.unjoinable = 0  # deferred without a request id: finished with None at once
        self.unmatched = 0  # entries dropped unused (expired, or too many kept)

    def pending(self) -> int:
        """Exchanges parked and waiting for their entry."""
        return len(self._parked)

    def bounded(self, name: str) -> tuple[Bounded, ...]:
        """`name`.parked and, when it keeps early entries, `name`.kept."""
        parked = Bounded(f"{name}.parked", self.pending, self._max_parked)
        if self._max_kept == 0:
            return (parked,)
        return parked, Bounded(f"{name}.kept", self.kept, self._max_kept)

    def kept(self) -> int:
        """Entries that arrived before their exchange's stream closed."""
        return len(self._kept)

    def defer(self, request_id: str, finish: Finish) -> None:
        """Park a closed exchange; `finish` runs exactly once, with its facts or None."""
        if not request_id:
            self.unjoinable += 1
            self._run(finish, None)
            return
        now = self._now()
        self._expire_kept(now)
        early = self._kept.pop_id(request_id)
        if early is not None:
            self.joined += 1
            self._run(finish, early.facts)
            return
        if len(self._parked) >= self._max_parked:
            oldest = self._parked.pop_oldest()
            if oldest is not None:
                self.overflowed += 1
                self._run(oldest.finish, None)
        self._parked.add(_Parked(request_id, now + self._timeout_s, finish))
        self._arm()

    def deliver(self, facts: FinalFacts) -> None:
        """Finish the parked exchange these facts belong to, or keep them for a while."""
        parked = self._parked.pop_id(facts.request_id)
        if parked is not None:
            self.joined += 1
            if not self._parked:
                self._disarm()
            self._run(parked.finish, facts)
            if self._on_finished is not None:
                self._on_finished()
            return
        if self._max_kept == 0:
            self.unmatched += 1
            return
        now = self._now()
        self._expire_kept(now)
        if len(self._kept) >= self._max_kept:
            self._kept.pop_oldest()
            self.unmatched += 1
        self._kept.add(_Kept(facts.request_id, now + self._keep_s, facts))

    def is_parked(self, request_id: str) -> bool:
        return request_id in self._parked

    def take_kept(self, request_id: str) -> FinalFacts | None:
        """An entry that arrived before its exchange closed, if one is kept."""
        kept = self._kept.pop_id(request_id)
        return kept.facts if kept is not None else None

    def flush(self) -> None:
        """Finish every parked exchange now with None and forget kept entries (shutdown)."""
        self._disarm()
        for parked in self._parked.drain():
            self.flushed += 1
            self._run(parked.finish, None)
        for _ in self._kept.drain():
            self.unmatched += 1

    # -- internals -------------------------------------------------------------

    def _expire_kept(self, now: float) -> None:
        while (oldest := self._kept.oldest()) is not None and oldest.deadline <= now:
            self._kept.pop_oldest()
            self.unmatched += 1

    def _arm(self) -> None:
        if self._timer is not None:
            return
        oldest = self._parked.oldest()
        if oldest is None:
            return
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(max(0.0, oldest.deadline - self._now()), self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        now = self._now()
        while (oldest := self._parked.oldest()) is not None and oldest.deadline <= now:
            self._parked.pop_oldest()
            self.timed_out += 1
            self._run(oldest.finish, None)
        self._arm()
        if self._on_finished is not None:
            self._on_finished()

    @staticmethod
    def _run(finish: Finish, facts: FinalFacts | None) -> None:
        try:
            finish(facts)
        except Exception:
            logger.opt(exception=True).error(
                "span finish failed", request_id=facts.request_id if facts else None)
