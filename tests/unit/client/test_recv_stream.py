"""``HvSocket.recv_stream_into``: a relay's read across packet boundaries, where ``recv_into``
delivers at most one packet's payload (16 KiB) per call."""

from __future__ import annotations

import pytest

from guest_client.testing import socketpair

pytestmark = pytest.mark.unit


def test_recv_into_stops_at_16k_but_recv_stream_into_does_not() -> None:
    guest, host = socketpair(send_pages=64, recv_pages=64)
    with guest, host:
        payload = bytes(range(256)) * 256 * 3  # 192 KiB: twelve 16 KiB packets
        guest.sendall(payload)
        buffer = bytearray(len(payload))
        assert host.recv_into(buffer) == 16384
        got, largest = 16384, 0
        while got < len(payload):
            n = host.recv_stream_into(memoryview(buffer)[got:])
            assert n > 0
            got += n
            largest = max(largest, n)
        assert got == len(payload) and bytes(buffer) == payload
        assert largest > 16384  # one read took more than one packet


def test_recv_stream_into_sees_end_of_stream() -> None:
    guest, host = socketpair()
    with guest, host:
        guest.sendall(b"last")
        guest.shutdown(2)
        buffer = bytearray(64)
        assert host.recv_stream_into(buffer) == 4
        assert host.recv_stream_into(buffer) == 0
