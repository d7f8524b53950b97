"""Envoy's timings of one request, from its access-log entry (`AccessLogCommon`).

Kept apart from `phases` (which records them) so that `als` can read them without
importing what `phases` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _offset(common: log_pb.AccessLogCommon, name: str) -> int | None:
    return getattr(common, name).ToNanoseconds() if common.HasField(name) else None


def timings(common: log_pb.AccessLogCommon) -> Timings | None:
    """The timings of an entry's common properties; None without a start time (Envoy
    always logs one)."""
    if not common.HasField("start_time"):
        return None
    return Timings(
        common.start_time.ToNanoseconds(),
        _offset(common, "time_to_first_upstream_tx_byte"),
        _offset(common, "time_to_first_upstream_rx_byte"),
        _offset(common, "time_to_last_upstream_rx_byte"),
        _offset(common, "time_to_first_downstream_tx_byte"),
        _offset(common, "time_to_last_downstream_tx_byte"))
