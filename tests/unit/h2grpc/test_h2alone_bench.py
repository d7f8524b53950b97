"""bench/h2alone.py: the HTTP/2 layer's cost alone, and the 'frames only' floor it is
compared with, which must do the real work of these frames to be a fair floor."""

from __future__ import annotations

import h2.events
import h2.exceptions
import pytest

from bench import h2alone
from bench.h2alone import FramesOnly, Peer, check, measure, report


def test_every_layer_receives_the_same_requests_and_answers_alike() -> None:
    check(bursts=3)


def test_the_check_fails_a_floor_that_skips_work(monkeypatch: pytest.MonkeyPatch) -> None:
    send_data = FramesOnly.send_data
    monkeypatch.setattr(FramesOnly, "send_data",
                        lambda self, sid, data: send_data(self, sid, data[:-1]))
    with pytest.raises(AssertionError, match="frames only's answers"):
        check(bursts=1)


def test_the_peer_refuses_frames_a_server_must_not_send(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_end_stream(self: FramesOnly, sid: int, headers: list[tuple[bytes, bytes]],
                      end_stream: bool = False) -> None:
        self._frame(1, 4, sid, self.encoder.encode(headers))  # trailers never end the stream

    monkeypatch.setattr(FramesOnly, "send_headers", no_end_stream)
    with pytest.raises(h2.exceptions.ProtocolError, match="END_STREAM"):
        check(bursts=1)


def test_the_floor_counts_flow_control_both_ways() -> None:
    floor, peer = FramesOnly(), Peer()
    floor.start()
    floor.receive(peer.client.data_to_send())
    peer.read(floor.data_to_send())
    sid = peer.client.get_next_available_stream_id()
    peer.client.send_headers(sid, h2alone.REQUEST_HEADERS)
    chunk = b"x" * 16_000
    for _ in range(40):  # 640 kB: past half of the 1 MiB stream window we announced
        peer.client.send_data(sid, chunk)
    received = floor.receive(peer.client.data_to_send())
    assert sum(len(x) for kind, _, x in received if kind == "data") == 640_000
    updates = [e for e in peer.read(floor.data_to_send())
               if isinstance(e, h2.events.WindowUpdated)]
    assert {e.stream_id for e in updates} == {sid}  # the stream's window came back ...
    assert peer.client.local_flow_control_window(sid) > (1 << 20) - 640_000
    # ... and the floor never sends past the peer's window (65,535 by default)
    with pytest.raises(ValueError, match="window"):
        floor.send_data(sid, b"y" * 70_000)


def test_a_short_measurement_reports_every_layer_against_h2() -> None:
    results = measure(rounds=2, bursts=2)
    assert set(results) == set(h2alone.LAYERS)
    assert all(len(rounds) == 2 and all(t_in > 0 and t_out > 0 for t_in, t_out in rounds)
               for rounds in results.values())
    table = report(results).splitlines()
    assert len(table) == 2 + len(h2alone.LAYERS)
    assert table[2].startswith("| h2 |") and table[2].endswith("| 1.00x |")
