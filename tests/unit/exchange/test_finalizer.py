"""`SpanFinalizer`: every parked exchange finishes exactly once, joined or not."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.finalizer import SpanFinalizer


@dataclass
class _Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeLoop:
    """A clock and call_later that move only when the test says so."""

    now: float = 0.0
    timers: list[_Timer] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        assert delay >= 0
        timer = _Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> int:
        return sum(not t.cancelled for t in self.timers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := sorted((t for t in self.timers if not t.cancelled and t.when <= self.now),
                            key=lambda t: t.when):
            timer = due[0]
            self.timers.remove(timer)
            timer.callback()
        self.timers = [t for t in self.timers if not t.cancelled]


class Finishes:
    """Records every finish call, by exchange name."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, FinalFacts | None]] = []

    def __call__(self, name: str) -> Callable[[FinalFacts | None], None]:
        return lambda facts: self.calls.append((name, facts))

    def of(self, name: str) -> list[FinalFacts | None]:
        return [facts for who, facts in self.calls if who == name]


def facts(request_id: str, code: int = 200, *flags: str) -> FinalFacts:
    return FinalFacts(request_id, code, flags, "via_upstream", 10)


def make(timeout_s: float = 1.0, *, max_parked: int = SpanFinalizer.MAX_PARKED,
         max_kept: int = SpanFinalizer.MAX_KEPT, keep_s: float | None = None,
         ) -> tuple[SpanFinalizer, FakeLoop, Finishes]:
    loop = FakeLoop()
    fin = SpanFinalizer(loop.time, timeout_s, max_parked=max_parked, max_kept=max_kept,
                        keep_s=keep_s, call_later=loop.call_later)
    return fin, loop, Finishes()


def test_entry_after_close_finishes_with_its_facts() -> None:
    fin, loop, done = make()
    fin.defer("a", done("a"))
    assert fin.pending() == 1 and done.calls == []
    fin.deliver(facts("a", 503, "UR"))
    assert done.of("a") == [facts("a", 503, "UR")]
    assert (fin.pending(), fin.joined, loop.armed()) == (0, 1, 0)
    loop.advance(5)
    assert len(done.calls) == 1 and fin.timed_out == 0


def test_entry_before_close_finishes_the_later_defer_at_once() -> None:
    fin, loop, done = make()
    fin.deliver(facts("a"))
    assert fin.kept() == 1 and fin.pending() == 0
    fin.defer("a", done("a"))
    assert done.of("a") == [facts("a")]
    assert (fin.kept(), fin.pending(), fin.joined, loop.armed()) == (0, 0, 1, 0)


def test_timeout_finishes_with_none_and_a_late_entry_does_not_finish_again() -> None:
    fin, loop, done = make(timeout_s=2.0)
    fin.defer("a", done("a"))
    loop.advance(1.999)
    assert done.calls == []
    loop.advance(0.001)
    assert done.of("a") == [None] and fin.timed_out == 1 and fin.pending() == 0
    fin.deliver(facts("a"))  # late: kept, then expires unused
    loop.advance(2.0)
    fin.deliver(facts("other"))  # expiry is checked on the next call
    assert done.of("a") == [None]
    assert fin.unmatched == 1 and fin.kept() == 1


def test_one_timer_rearms_for_the_next_oldest() -> None:
    fin, loop, done = make(timeout_s=1.0)
    fin.defer("a", done("a"))
    loop.advance(0.5)
    fin.defer("b", done("b"))
    assert loop.armed() == 1
    loop.advance(0.5)
    assert done.of("a") == [None] and done.of("b") == []
    assert loop.armed() == 1
    loop.advance(0.5)
    assert done.of("b") == [None] and fin.timed_out == 2 and loop.armed() == 0


def test_delivering_the_head_leaves_the_others_on_time() -> None:
    fin, loop, done = make(timeout_s=1.0)
    fin.defer("a", done("a"))
    loop.advance(0.25)
    fin.defer("b", done("b"))
    fin.deliver(facts("a"))
    loop.advance(0.75)  # a's old deadline: b is not due yet
    assert done.of("b") == []
    loop.advance(0.25)
    assert done.of("b") == [None] and done.of("a") == [facts("a")]


def test_same_request_id_twice_joins_oldest_first() -> None:
    fin, _, done = make()
    fin.defer("dup", done("first"))
    fin.defer("dup", done("second"))
    fin.deliver(facts("dup", 200))
    assert done.of("first") == [facts("dup", 200)] and done.of("second") == []
    fin.deliver(facts("dup", 502))
    assert done.of("second") == [facts("dup", 502)] and fin.pending() == 0


def test_parked_overflow_finishes_the_oldest_with_none() -> None:
    fin, _, done = make(max_parked=2)
    for name in "abc":
        fin.defer(name, done(name))
    assert done.calls == [("a", None)]
    assert (fin.overflowed, fin.pending()) == (1, 2)
    fin.deliver(facts("a"))  # too late for a: kept, never finishes it again
    assert done.of("a") == [None]


def test_kept_entries_are_bounded_in_number_and_time() -> None:
    fin, loop, done = make(timeout_s=1.0, max_kept=2, keep_s=0.5)
    for name in "abc":
        fin.deliver(facts(name))
    assert (fin.kept(), fin.unmatched) == (2, 1)
    fin.defer("a", done("a"))  # a was dropped: it parks
    assert done.of("a") == [] and fin.pending() == 1
    loop.advance(0.5)
    fin.defer("b", done("b"))  # b expired
    assert done.of("b") == [] and fin.kept() == 0 and fin.unmatched == 3


def test_no_request_id_finishes_at_once() -> None:
    fin, loop, done = make()
    fin.defer("", done("x"))
    assert done.of("x") == [None] and fin.unjoinable == 1 and loop.armed() == 0


def test_flush_finishes_everything_with_none() -> None:
    fin, loop, done = make()
    fin.defer("a", done("a"))
    fin.defer("b", done("b"))
    fin.deliver(facts("c"))
    fin.flush()
    assert sorted(done.calls, key=lambda c: c[0]) == [("a", None), ("b", None)]
    assert (fin.pending(), fin.kept(), fin.flushed, loop.armed()) == (0, 0, 2, 0)
    loop.advance(10)
    assert len(done.calls) == 2


def test_a_failing_finish_does_not_stop_the_others() -> None:
    fin, loop, done = make()

    def broken(_: FinalFacts | None) -> None:
        raise RuntimeError("finish bug")

    fin.defer("a", broken)
    fin.defer("b", done("b"))
    loop.advance(1.0)
    assert done.of("b") == [None] and fin.timed_out == 2


def test_a_finish_may_defer_again() -> None:
    fin, loop, done = make()
    fin.defer("a", lambda _: fin.defer("b", done("b")))
    loop.advance(1.0)
    assert fin.pending() == 1 and loop.armed() == 1
    loop.advance(1.0)
    assert done.of("b") == [None]


_OPS = st.lists(st.one_of(
    st.tuples(st.just("defer"), st.sampled_from("abcdef")),
    st.tuples(st.just("deliver"), st.sampled_from("abcdefg")),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.1, 0.5, 1.0])),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS, max_parked=st.integers(1, 4), max_kept=st.integers(0, 4))
def test_every_deferred_exchange_finishes_exactly_once(
        ops: list[tuple[str, object]], max_parked: int, max_kept: int) -> None:
    fin, loop, _ = make(timeout_s=1.0, max_parked=max_parked, max_kept=max_kept)
    finished: Counter[int] = Counter()
    deferred = 0
    for op, arg in ops:
        if op == "defer":
            token = deferred
            deferred += 1

            def finish(got: FinalFacts | None, token: int = token, rid: object = arg) -> None:
                assert got is None or got.request_id == rid
                finished[token] += 1

            fin.defer(str(arg), finish)
        elif op == "deliver":
            fin.deliver(facts(str(arg)))
        else:
            loop.advance(float(arg))  # type: ignore[arg-type]
        assert fin.pending() <= max_parked and fin.kept() <= max_kept
    fin.flush()
    assert finished == Counter(range(deferred))
    assert fin.joined + fin.timed_out + fin.overflowed + fin.flushed == deferred
    assert loop.armed() == 0


async def test_on_a_real_loop_the_timeout_fires_without_polling() -> None:
    loop = asyncio.get_running_loop()
    fin = SpanFinalizer(loop.time, 0.05)
    results: dict[str, FinalFacts | None] = {}
    b_done = asyncio.Event()

    def finish_b(got: FinalFacts | None) -> None:
        results["b"] = got
        b_done.set()

    def finish_a(got: FinalFacts | None) -> None:
        results["a"] = got

    fin.defer("a", finish_a)
    fin.defer("b", finish_b)
    fin.deliver(facts("a", 204))
    await asyncio.wait_for(b_done.wait(), 5)
    assert results == {"a": facts("a", 204), "b": None}
    assert (fin.joined, fin.timed_out, fin.pending()) == (1, 1, 0)
