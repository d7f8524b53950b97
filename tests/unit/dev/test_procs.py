"""`free_port`: ports outside the kernel's ephemeral range, so an outbound connection
cannot take one between the pick and the child's bind."""

from __future__ import annotations

import socket

from ext_proc.dev.procs import _ephemeral_range, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(10_000 <= port < low for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free, as promised


def test_a_taken_port_is_never_handed_out() -> None:
    taken = []
    try:
        for _ in range(300):  # hold many ports, so some of the picks would collide
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            taken.append(sock)
        held = {sock.getsockname()[1] for sock in taken}
        assert len(held) == 300 and free_port() not in held
    finally:
        for sock in taken:
            sock.close()
