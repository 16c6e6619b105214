"""Pause / resume and StallRing hold a channel's data on both data paths, then let it all through.

On the relay path the host stops pumping the stalled end; on the shared-memory path it sets the
segment header's stalled word, which the client honours before each send and receive.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

import guest_client as hv
from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2

from ..conformance.conftest import Env, host, host_env
from .test_host_badinput import admin_call, wait_for_no_channels

pytestmark = pytest.mark.integration

__all__ = ["host", "host_env"]  # fixtures

CHUNK = 8192
#: Far beyond any ring plus the relay window: a send that never blocks would pass it.
BOUND = DEFAULT_RELAY_WINDOW + (4 << 20)


def _vm_id(sock: hv.HvSocket) -> str:
    return sock.partition.vm_id


def _send_until_blocked(sock: hv.HvSocket, digest: hashlib._Hash) -> int:
    """Send random chunks until a send times out; return how many bytes went."""
    sock.settimeout(0.5)
    total = 0
    while total < BOUND:
        chunk = os.urandom(CHUNK)
        try:
            n = sock.send(chunk)
        except TimeoutError:
            return total
        digest.update(chunk[:n])
        total += n
    raise AssertionError(f"{total} bytes sent into a stalled channel without blocking")


def _read_exactly(sock: hv.HvSocket, n: int, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = sock.recv(min(65536, n - got))
        assert part, f"EOF after {got} of {n} bytes"
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _channel_id(env: Env, vm_id: str) -> int:
    assert env.host is not None
    channels = admin_call(
        env.host, "ListChannels", hvsock_pb2.ListChannelsRequest(vm_id=vm_id)
    ).channels
    assert len(channels) == 1, channels
    return int(channels[0].channel_id)


def test_pause_stalls_the_vms_channels_and_resume_delivers_everything(host_env: Env) -> None:
    client, server = host_env.pair()  # client: the VM's end; server: the host partition's
    assert host_env.host is not None
    vm_id = _vm_id(client)
    client.sendall(b"ping")
    assert _read_exactly(server, 4) == b"ping"

    admin_call(host_env.host, "PausePartition", hvsock_pb2.PausePartitionRequest(vm_id=vm_id))
    to_vm, to_host = hashlib.sha256(), hashlib.sha256()
    # The peer's sends fill the ring the paused VM no longer reads, then block.
    sent_to_vm = _send_until_blocked(server, to_vm)
    assert sent_to_vm > 0
    # Nothing reaches the paused VM although data is waiting for it.
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(100)
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    # The paused VM's own sends block too (at once on shared memory, after the relay's
    # buffers on the relay path).
    sent_to_host = _send_until_blocked(client, to_host)
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):
        server.recv(100)

    admin_call(host_env.host, "ResumePartition", hvsock_pb2.ResumePartitionRequest(vm_id=vm_id))
    got: dict[str, bytes] = {}
    reader = threading.Thread(
        target=lambda: got.setdefault("host", _read_exactly(server, sent_to_host)), daemon=True
    )
    reader.start()
    assert hashlib.sha256(_read_exactly(client, sent_to_vm)).digest() == to_vm.digest()
    reader.join(timeout=30)
    assert hashlib.sha256(got["host"]).digest() == to_host.digest()

    # And the channel carries on as normal.
    client.settimeout(5)
    server.sendall(b"after")
    assert _read_exactly(client, 5) == b"after"


def test_stall_ring_holds_one_direction_then_resumes_by_itself(host_env: Env) -> None:
    client, server = host_env.pair()  # client connected: it is the connector
    assert host_env.host is not None
    channel_id = _channel_id(host_env, _vm_id(client))
    payload = os.urandom(20000)

    start = time.monotonic()
    admin_call(
        host_env.host,
        "StallRing",
        hvsock_pb2.StallRingRequest(
            channel_id=channel_id,
            direction=hvsock_pb2.StallRingRequest.DIRECTION_TO_CONNECTOR,
            duration_ms=800,
        ),
    )
    sender = threading.Thread(target=lambda: server.sendall(payload), daemon=True)
    sender.start()
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(100)
    # The other direction is not stalled.
    client.sendall(b"still flowing")
    assert _read_exactly(server, 13, timeout=0.5) == b"still flowing"

    received = _read_exactly(client, len(payload), timeout=10)
    elapsed = time.monotonic() - start
    assert received == payload
    assert 0.6 <= elapsed < 5, elapsed
    sender.join(timeout=10)


def test_stall_ring_both_ways_and_close_while_paused(host_env: Env) -> None:
    client, server = host_env.pair()
    assert host_env.host is not None
    vm_id = _vm_id(client)
    channel_id = _channel_id(host_env, vm_id)
    admin_call(
        host_env.host,
        "StallRing",
        hvsock_pb2.StallRingRequest(
            channel_id=channel_id,
            direction=hvsock_pb2.StallRingRequest.DIRECTION_BOTH,
            duration_ms=300,
        ),
    )
    server.settimeout(0.1)
    with pytest.raises(TimeoutError):
        server.recv(1)
    time.sleep(0.4)
    client.settimeout(5)
    server.settimeout(5)
    client.sendall(b"a")
    server.sendall(b"b")
    assert (_read_exactly(server, 1), _read_exactly(client, 1)) == (b"a", b"b")

    # A stall does not keep a channel alive: closing while paused still tears it down.
    admin_call(host_env.host, "PausePartition", hvsock_pb2.PausePartitionRequest(vm_id=vm_id))
    server.close()
    client.close()
    admin_call(host_env.host, "ResumePartition", hvsock_pb2.ResumePartitionRequest(vm_id=vm_id))
    wait_for_no_channels(host_env.host, vm_id)
