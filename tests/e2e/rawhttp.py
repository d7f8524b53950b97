"""Raw-socket HTTP/1.1 upstreams that misbehave on purpose (for ending tests)."""

from __future__ import annotations

import contextlib
import socket


def read_request_head(sock: socket.socket) -> bytes | None:
    """Bytes up to the end of the request headers; None if the peer closed first."""
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
        return data
    return None


def stall(sock: socket.socket, seconds: float) -> None:
    """Wait up to `seconds` for the peer (returns early if it gives up): a recv timeout,
    so an upstream can hang mid-response without sleeping."""
    sock.settimeout(seconds)
    with contextlib.suppress(TimeoutError, OSError):
        sock.recv(1)
