"""The h2 library's connection state, as the server side of the sidecar needs it:
lenient header checks, GOAWAY that lets open streams finish, a bounded memory of
closed streams, and the SETTINGS it announces."""

from __future__ import annotations

from typing import Final

import h2.config
import h2.connection
import h2.settings

_CONFIG: Final = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    # No per-header checks on the way out: our few headers are constants. None on the
    # way in either: h2 would answer a header value with surrounding spaces (which
    # grpc accepts) with a connection error, ending every stream of that Envoy
    # worker; only :path is read here, and the servicers parse what they use.
    validate_outbound_headers=False, normalize_outbound_headers=False,
    validate_inbound_headers=False, normalize_inbound_headers=False)
_WINDOW: Final = 1 << 20  # per-stream receive window we announce


class _DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection states, except that a GOAWAY (either way) does not end the
    streams already open: HTTP/2 lets them finish (RFC 9113, 6.8), h2 would call
    every later frame of theirs a protocol error and drop the connection."""

    _transitions = {  # noqa: RUF012 (h2 declares it as an instance attribute)
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{(h2.connection.ConnectionState.CLOSED, event): (None,
                                                            h2.connection.ConnectionState.CLOSED)
           for (state, event) in h2.connection.H2ConnectionStateMachine._transitions
           if state is h2.connection.ConnectionState.SERVER_OPEN},
    }


# Closed streams each connection remembers, to tell a late frame on a stream it reset
# (answered RST_STREAM) from a protocol error (connection error). h2 keeps 65,536: an
# OrderedDict of ~150 bytes an entry, ~10 MB per connection once that many streams
# have passed, which was the sidecar's whole memory "warm-up" (#21). 8,192 is seconds
# of history at any rate one connection serves here.
CLOSED_STREAMS_KEPT: Final = 8192


class _H2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


def server_connection(max_concurrent_streams: int) -> h2.connection.H2Connection:
    """A server-side h2 connection state announcing our limits and windows."""
    connection = _H2Connection(_CONFIG)
    connection.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
    })
    connection.state_machine = _DrainingStateMachine()
    return connection
