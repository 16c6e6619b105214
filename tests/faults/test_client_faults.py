"""Faults seen from programs: a peer killed mid-transfer, the host service stopped and
restarted, and a stress run with many connections on each data path."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2

from ..integration.hostproc import HostProcess, run_host

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = hv.service_id_for_port(7000)
DATA_PATHS = ["shm", "relay"]

# A VM program that connects to the host and streams data until it is killed.
_STREAMER = """
import sys, guest_client as hv
vm = hv.attach()
s = vm.socket()
s.connect((hv.HV_GUID_PARENT, sys.argv[1]))
print("connected", flush=True)
block = b"k" * 65536
while True:
    s.sendall(block)
"""


def create_vm(host: HostProcess, name: str = "vm") -> hvsock_pb2.CreatePartitionResponse:
    return host.create_vm(name)


def channels(host: HostProcess) -> list[hvsock_pb2.ChannelStatus]:
    channel, admin = host.admin()
    with channel:
        reply = admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=host.metadata, timeout=10
        )
    return list(reply.channels)


def partition(host: HostProcess, hello: hvsock_pb2.Hello, data_path: str) -> hv.Partition:
    return hv.Partition(host.target, hello, data_path=data_path)


def eventually(condition: object, within: float) -> float:
    """Poll a condition until it holds; returns how long it took (fails after ``within``)."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < within, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path, "--state", str(tmp_path / "state.sqlite")) as process:
        yield process


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_peer_killed_mid_transfer(host: HostProcess, data_path: str) -> None:
    vm = create_vm(host)
    root = partition(host, hvsock_pb2.Hello(host=True, token=host.token), data_path)
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, SERVICE))
    listener.listen()
    env = {
        **os.environ,
        "HVSOCK_HOST": host.target,
        "HVSOCK_VM_ID": vm.partition.vm_id,
        "HVSOCK_TOKEN": vm.token,
        "HVSOCK_DATA_PATH": data_path,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _STREAMER, SERVICE], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "connected\n"
        conn, _ = listener.accept()
        received = 0
        while received < 1 << 20:
            received += len(conn.recv(65536))
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ConnectionResetError):
            while conn.recv(65536):  # what was in flight may still arrive, then the end
                pass
            raise ConnectionResetError  # EOF is the other accepted outcome
        assert time.monotonic() - killed < 1.0
        eventually(lambda: not channels(host), within=1.0)
        assert host.no_segments_within() == []
        conn.close()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
        listener.close()
        root.close()


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_host_stopped_then_restarted(
    host: HostProcess, tmp_path: pathlib.Path, data_path: str
) -> None:
    vm_created = create_vm(host)
    hello = hvsock_pb2.Hello(vm_id=vm_created.partition.vm_id, token=vm_created.token)
    root = partition(host, hvsock_pb2.Hello(host=True, token=host.token), data_path)
    vm = partition(host, hello, data_path)
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, SERVICE))
    listener.listen()
    client = vm.socket()
    client.connect((hv.HV_GUID_PARENT, SERVICE))
    conn, _ = listener.accept()
    outcome: list[BaseException | bytes] = []

    def blocked_recv() -> None:
        try:
            outcome.append(client.recv(100))
        except OSError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=blocked_recv)
    reader.start()
    host.proc.kill()  # the harshest stop: no graceful rescind
    host.proc.wait()
    stopped = time.monotonic()
    reader.join(timeout=5)
    assert not reader.is_alive() and time.monotonic() - stopped < 1.0
    assert isinstance(outcome[0], ConnectionResetError)
    with pytest.raises(ConnectionResetError):
        client.sendall(b"x")

    with run_host(tmp_path, "--state", str(host.state), like=host) as again:
        assert vm.wait_attached(10) and root.wait_attached(10)
        assert vm.vm_id == vm_created.partition.vm_id  # the VM id survived the restart
        listener2 = root.socket()
        listener2.bind((hv.HV_GUID_WILDCARD, SERVICE))
        listener2.listen()
        fresh = vm.socket()
        fresh.connect((hv.HV_GUID_PARENT, SERVICE))
        server, _ = listener2.accept()
        fresh.sendall(b"back again")
        assert server.recv(100) == b"back again"
        for sock in (fresh, server, listener2, client, conn, listener):
            sock.close()
        vm.close()
        root.close()
        assert again.no_segments_within() == []


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_stress_32_connections_256_mib_echoed(host: HostProcess, data_path: str) -> None:
    total = int(os.environ.get("HVSOCK_STRESS_BYTES", 256 << 20))
    _echo_stress(host, (data_path, data_path), connections=32, total=total, block=65536)


#: (the VM's data path, the host partition's): the VM relayed with the host partition on shared
#: memory (the usual relay deployment), and both relayed (the host moves bytes between streams).
RELAY_CONFIGS = {"relay-vm": ("relay", "shm"), "relay": ("relay", "relay")}


@pytest.mark.parametrize("config", sorted(RELAY_CONFIGS))
def test_stress_1_gib_each_way_over_the_relay(host: HostProcess, config: str) -> None:
    """1 GiB from the VM to the host partition and the same back (an echo), over 4 connections.
    HVSOCK_RELAY_STRESS_BYTES sets the total for quick local runs."""
    total = int(os.environ.get("HVSOCK_RELAY_STRESS_BYTES", 1 << 30))
    _echo_stress(host, RELAY_CONFIGS[config], connections=4, total=total, block=262144)


def _echo_stress(
    host: HostProcess, paths: tuple[str, str], *, connections: int, total: int, block: int
) -> None:
    """``total`` bytes from a VM (data path ``paths[0]``) to an echo server in the host
    partition (``paths[1]``) and back, over ``connections`` connections with 64-page rings and
    random send sizes up to ``block``; the SHA-256 of each direction is checked at its
    receiver, and every channel is gone afterwards."""
    vm_path, root_path = paths
    vm_created = create_vm(host)
    root = partition(host, hvsock_pb2.Hello(host=True, token=host.token), root_path)
    vm = partition(
        host,
        hvsock_pb2.Hello(vm_id=vm_created.partition.vm_id, token=vm_created.token),
        vm_path,
    )
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, SERVICE))
    listener.listen(64)
    per_connection = total // connections
    errors: list[BaseException] = []
    #: connection seed -> SHA-256 of what the echo server received (the VM -> host direction).
    server_digests: dict[int, bytes] = {}
    client_digests: dict[int, bytes] = {}

    def echo_server() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: hv.HvSocket) -> None:
        try:
            received = hashlib.sha256()
            buffer = bytearray(block)
            head = bytearray()  # each stream starts with its connection's seed
            while n := conn.recv_into(buffer):
                data = memoryview(buffer)[:n]
                received.update(data)
                if len(head) < 4:
                    head += data[: 4 - len(head)]
                conn.sendall(data)
            # Recorded before the FIN: the client's EOF may end the test at once.
            server_digests[int.from_bytes(head, "little")] = received.digest()
            conn.shutdown(hv.SHUT_WR)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    def client(seed: int) -> None:
        try:
            rng = random.Random(seed)
            sock = vm.socket()
            # Bulk transfer: the largest rings a connection may ask for (64 pages each way).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 63 * 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 63 * 4096)
            sock.connect((hv.HV_GUID_PARENT, SERVICE))
            sent, received = hashlib.sha256(), hashlib.sha256()

            def reader() -> None:
                buffer = bytearray(block)
                while n := sock.recv_into(buffer):
                    received.update(memoryview(buffer)[:n])

            thread = threading.Thread(target=reader)
            thread.start()
            # The first bytes name the connection (the server keys its digest by them).
            head = seed.to_bytes(4, "little")
            sent.update(head)
            sock.sendall(head)
            left = per_connection - len(head)
            data = rng.randbytes(block)
            while left:
                size = min(rng.randint(1, block), left)
                start = rng.randint(0, block - size)
                chunk = memoryview(data)[start : start + size]
                sent.update(chunk)
                sock.sendall(chunk)
                left -= size
            sock.shutdown(hv.SHUT_WR)
            thread.join()
            sock.close()
            client_digests[seed] = sent.digest()
            assert received.digest() == sent.digest(), f"connection {seed}: echo corrupted"
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=echo_server)
    server.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=900)
    server.join(timeout=60)
    assert not errors, errors[:3]
    assert not any(thread.is_alive() for thread in clients), "a connection never finished"
    assert server_digests == client_digests  # the VM -> host direction on its own
    listener.close()
    vm.close()
    root.close()
    eventually(lambda: not channels(host), within=15.0)


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_listeners_after_the_host_restarts(
    host: HostProcess, tmp_path: pathlib.Path, data_path: str
) -> None:
    """A listener whose host went away reports it once (ECONNRESET), then stops looking
    readable, so an event loop does not spin on it; a bridge listens again by itself."""
    from hvsock_tools.bridge import Bridge, HvEndpoint, PlainEndpoint, run_in_thread

    vm_created = create_vm(host)
    vm_id = vm_created.partition.vm_id
    vm = partition(host, hvsock_pb2.Hello(vm_id=vm_id, token=vm_created.token), data_path)
    root = partition(host, hvsock_pb2.Hello(host=True, token=host.token), data_path)
    plain = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        while True:
            try:
                conn, _ = plain.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    published = hv.service_id_for_port(7100)
    bridge = Bridge(
        HvEndpoint(hv.HV_GUID_WILDCARD.lower(), published),
        PlainEndpoint("127.0.0.1", plain.getsockname()[1]),
        vm,
    )
    watched = vm.socket()
    watched.bind((hv.HV_GUID_WILDCARD, SERVICE))
    watched.listen()
    watched.setblocking(False)

    def round_trip(payload: bytes) -> bytes:
        with root.socket() as client:
            client.settimeout(10)
            client.connect((vm_id, published))
            client.sendall(payload)
            client.shutdown(hv.SHUT_WR)
            return b"".join(iter(lambda: client.recv(65536), b""))

    with run_in_thread(bridge):
        assert round_trip(b"before") == b"before"
        host.proc.kill()
        host.proc.wait()
        assert select.select([watched], [], [], 5)[0] == [watched]  # the reset, once
        with pytest.raises(ConnectionResetError):
            watched.accept()
        assert select.select([watched], [], [], 0)[0] == []  # and not again
        with run_host(tmp_path, "--state", str(host.state), like=host) as again:
            assert vm.wait_attached(10) and root.wait_attached(10)

            def bridge_listens() -> bool:
                channel, admin = again.admin()
                with channel:
                    listed = admin.ListPartitions(
                        hvsock_pb2.ListPartitionsRequest(), metadata=again.metadata, timeout=10
                    )
                return any(p.vm_id == vm_id and p.listener_count == 1 for p in listed.partitions)

            eventually(bridge_listens, 10)
            assert round_trip(b"after") == b"after"
    watched.close()
    plain.close()
    vm.close()
    root.close()
