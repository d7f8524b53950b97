"""AccessLogJoin: which exchanges wait for Envoy's access-log entry, and for how long."""

from __future__ import annotations

from ext_proc.access_log_service import FinalFacts
from ext_proc.finalizer import AccessLogJoin


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def facts(request_id: str, code: int | None = 200) -> FinalFacts:
    return FinalFacts(request_id, code, (), None, 12, duration_ns=5_000_000)


async def test_before_envoys_stream_opens_the_first_exchanges_still_wait() -> None:
    clock = Clock()
    join = AccessLogJoin(1.0, 300.0, clock, probe_s=10.0)
    got: list[FinalFacts | None] = []
    join.defer("a", got.append, responded=False)  # e.g. lean mode's very first request
    assert got == [] and join.pending() == 1
    join.service.connected = True  # the entry's arrival opens the ALS stream
    join.deliver(facts("a"))
    assert got == [facts("a")] and join.pending() == 0
    join.flush()


async def test_an_envoy_without_access_log_stops_costing_waits() -> None:
    clock = Clock()
    join = AccessLogJoin(1.0, 300.0, clock, probe_s=10.0)
    got: list[FinalFacts | None] = []
    join.defer("a", got.append)
    clock.now += 11.0  # nothing came within the probe window
    join.defer("b", got.append)
    assert got == [None]  # "b" finished at once
    join.flush()
    assert got == [None, None]  # "a" finished at shutdown, each exactly once


async def test_connected_exchanges_join_in_either_order() -> None:
    join = AccessLogJoin(1.0, 300.0, Clock())
    join.service.connected = True
    got: list[FinalFacts | None] = []
    join.deliver(facts("early", code=None))  # Envoy logged an abort before our close
    join.defer("early", got.append, responded=False)
    join.defer("late", got.append, responded=False)
    assert join.awaiting.pending() == 1
    join.deliver(facts("late", code=404))
    assert [f.request_id if f else None for f in got] == ["early", "late"]
    assert join.pending() == 0
    join.flush()
