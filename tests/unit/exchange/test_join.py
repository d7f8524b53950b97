"""AccessLogJoin: which exchanges wait for Envoy's access-log entry, and for how long."""

from __future__ import annotations

import asyncio

import pytest

from ext_proc.exchange.als import FinalFacts
from ext_proc.exchange.join import AccessLogJoin


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


async def test_settled_returns_once_every_waiting_exchange_is_joined() -> None:
    join = AccessLogJoin(1.0, 300.0, Clock())
    join.service.connected = True
    await asyncio.wait_for(join.settled(), 1)  # nothing waits: at once
    got: list[FinalFacts | None] = []
    join.defer("in-flight", got.append, responded=False)  # lean: request still running
    join.defer("done", got.append)
    settled = asyncio.ensure_future(join.settled())
    join.deliver(facts("done"))
    with pytest.raises(TimeoutError):  # still one exchange waiting: it does not return
        await asyncio.wait_for(asyncio.shield(settled), 0.05)
    join.deliver(facts("in-flight"))
    await asyncio.wait_for(settled, 1)
    assert {f.request_id for f in got if f} == {"done", "in-flight"}


async def test_settled_also_counts_exchanges_that_time_out() -> None:
    join = AccessLogJoin(0.01, 300.0)
    join.service.connected = True
    got: list[FinalFacts | None] = []
    join.defer("lost", got.append)  # its entry never comes
    await asyncio.wait_for(join.settled(), 5)
    assert got == [None]


async def test_before_the_stream_opens_a_running_request_waits_for_its_end() -> None:
    clock = Clock()
    join = AccessLogJoin(1.0, 300.0, clock, probe_s=10.0)
    got: list[FinalFacts | None] = []
    join.defer("slow", got.append, responded=False)  # lean: the first request runs on
    assert join.awaiting.pending() == 1 and join.finalizer.pending() == 0
    clock.now += 5.0  # longer than timeout_s, within the probe
    join.service.connected = True  # its entry opens Envoy's stream
    join.deliver(facts("slow"))
    assert got == [facts("slow")]
    join.flush()


async def test_no_stream_within_the_probe_releases_the_running_requests() -> None:
    clock = Clock()
    join = AccessLogJoin(1.0, 300.0, clock, probe_s=10.0)
    got: list[FinalFacts | None] = []
    join.defer("a", got.append, responded=False)
    clock.now += 11.0
    join.defer("b", got.append, responded=False)  # the probe has expired: no access log
    assert got == [None, None] and join.pending() == 0


def entry_without_our_answer(request_id: str) -> object:
    """An ALS message with one final entry that carries no metadata of ours (Envoy gave
    up on the sidecar's answer: message_timeout)."""
    from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2 as pb
    message = pb.StreamAccessLogsMessage()
    entry = message.http_logs.log_entry.add()
    entry.request.request_id = request_id
    entry.response.response_code.value = 200
    return message


async def test_in_overload_a_closed_exchange_waits_only_overload_wait_s() -> None:
    clock = Clock()
    join = AccessLogJoin(1.0, 300.0, clock, unasked=lambda entries: None)
    join.service.connected = True
    got: list[FinalFacts | None] = []
    join.defer("calm", got.append, responded=False)  # no sign of overload: the long wait
    assert join.awaiting.is_parked("calm") and not join.overloaded()
    join.opened("timed-out")
    join.service.handle(entry_without_our_answer("timed-out"))  # Envoy dropped our answer
    assert join.service.answers_dropped == 1 and join.overloaded()
    join.defer("lost", got.append, responded=False)  # its entry may be dropped too
    assert join.hurried.is_parked("lost") and not join.awaiting.is_parked("lost")
    assert join.awaited("lost") and join.pending() == 2
    clock.now += AccessLogJoin.OVERLOAD_WAIT_S + 0.1
    join.hurried._on_timer()  # what the loop's timer runs
    join.awaiting._on_timer()
    assert got == [None]  # "lost" ended; "calm" still waits for its request's end
    assert join.awaiting.is_parked("calm")
    assert not join.overloaded()  # the window closed: later exchanges wait as before
    join.defer("after", got.append, responded=False)
    assert join.awaiting.is_parked("after")
    join.deliver(facts("calm"))
    assert got[-1] == facts("calm")
    join.flush()


async def test_an_entry_that_beat_its_exchange_is_a_sign_of_overload() -> None:
    clock = Clock()
    counted: list[object] = []
    join = AccessLogJoin(1.0, 300.0, clock, unasked=counted.extend)
    join.service.connected = True
    join.service.handle(entry_without_our_answer("first"))  # no exchange open yet
    assert len(counted) == 1 and not join.overloaded()  # un-asked, as far as we know
    got: list[FinalFacts | None] = []
    join.defer("first", got.append, responded=False)  # it was asked, answered too late
    assert got and got[0] is not None and got[0].request_id == "first"
    assert join.overloaded()
    join.flush()


async def test_a_remembered_entry_is_its_own_bytes_not_its_whole_message() -> None:
    """`join.recent` is full at 1 % with the prefilter: a decoded entry there would keep
    its whole access-log message alive (upb keeps a message's arena while any part of it
    is referenced), ~27 MiB at the bound. It keeps the entry's own bytes, and an exchange
    that finds its entry there gets the facts the entry itself gives."""
    from ext_proc._gen.envoy.service.accesslog.v3 import als_pb2 as pb
    from ext_proc.exchange.als import final_facts
    join = AccessLogJoin(1.0, 300.0, Clock(), unasked=lambda entries: None)
    join.service.connected = True
    message = pb.StreamAccessLogsMessage()
    for i in range(50):
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = f"r{i}"
        entry.request.path = f"/{i}/" + "x" * 2000
        entry.response.response_code.value = 200 + i
        entry.common_properties.time_to_last_downstream_tx_byte.FromNanoseconds(1000 * i)
        entry.common_properties.start_time.FromNanoseconds(10**18 + i)
    join.service.handle(message)
    kept = join._recent["r7"]
    assert isinstance(kept, bytes)
    assert len(kept) == message.http_logs.log_entry[7].ByteSize() < message.ByteSize() // 40
    want = final_facts(message.http_logs.log_entry[7])
    got: list[FinalFacts | None] = []
    join.defer("r7", got.append, responded=False)
    assert got == [want] and want is not None and want.response_code == 207
    assert want.timings is not None and want.duration_ns == 7000
    join.flush()
