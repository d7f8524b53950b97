"""Envoy's timings of one request, from its access-log entry (`AccessLogCommon`).

Kept apart from `phases` (which records them) so that `als` can read them without
importing what `phases` needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ext_proc._gen.envoy.data.accesslog.v3 import accesslog_pb2 as log_pb


@dataclass(slots=True)
class Timings:
    """Envoy's timings of one request: `start_ns` (epoch) and offsets from it in ns;
    None: it did not happen (or Envoy did not log it)."""

    start_ns: int
    first_upstream_tx: int | None
    first_upstream_rx: int | None
    last_upstream_rx: int | None
    first_downstream_tx: int | None
    last_downstream_tx: int | None

    @property
    def upstream_s(self) -> float | None:
        """The upstream phase's duration (first byte sent to last byte received), seconds."""
        if self.first_upstream_tx is None or self.last_upstream_rx is None:
            return None
        return max(0, self.last_upstream_rx - self.first_upstream_tx) / 1e9


def upstream_seconds(common: log_pb.AccessLogCommon) -> float | None:
    """`Timings.upstream_s` straight from an entry, without building `Timings` (the
    un-asked path counts every request Envoy did not ask about)."""
    if not (common.HasField("time_to_first_upstream_tx_byte")
            and common.HasField("time_to_last_upstream_rx_byte")):
        return None
    first, last = common.time_to_first_upstream_tx_byte, common.time_to_last_upstream_rx_byte
    return max(0.0, (last.seconds - first.seconds) + (last.nanos - first.nanos) / 1e9)


# the offsets Timings holds, in its field order
_OFFSETS: Final = ("time_to_first_upstream_tx_byte", "time_to_first_upstream_rx_byte",
                   "time_to_last_upstream_rx_byte", "time_to_first_downstream_tx_byte",
                   "time_to_last_downstream_tx_byte")


def timings(common: log_pb.AccessLogCommon) -> Timings | None:
    """The timings of an entry's common properties; None without a start time (Envoy
    always logs one). ~2 us per entry (Duration.ToNanoseconds would cost 1 us more)."""
    if not common.HasField("start_time"):
        return None
    has = common.HasField
    offsets: list[int | None] = [None] * len(_OFFSETS)
    for i, name in enumerate(_OFFSETS):
        if has(name):
            value = getattr(common, name)
            offsets[i] = value.seconds * 1_000_000_000 + value.nanos
    start = common.start_time
    return Timings(start.seconds * 1_000_000_000 + start.nanos, *offsets)
