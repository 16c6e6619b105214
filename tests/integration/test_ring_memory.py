"""Ring memory against hostile programs, on a live host (issue: hostile clients).

Ring segments are sealed anonymous files handed over as descriptors, so: nothing to find by
name, nothing any holder can shrink under the host, nothing left when an end never maps its
rings, and a program whose end cannot be opened loses that channel only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import guest_client as hv
from guest_client import _pipe
from guest_client._handover import Handover
from hvsock.v1 import hvsock_pb2
from ring import RingCorruptError
from ring._constants import OFF_DATA_SEQ, OFF_WRITE_INDEX
from ring._impl import atomic_load, atomic_store, futex_wake
from ring.handover import unix_address

from .hostproc import HostProcess, run_host
from .test_host_api import attach_host, attach_vm, create_vm, open_pair
from .test_host_badinput import assert_healthy, wait_for_no_channels

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


def _pair(host: HostProcess, name: str = "vm1") -> tuple[hv.Partition, hv.Partition]:
    created = host.create_vm(name)
    vm = hv.Partition(
        host.target, hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token)
    )
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    assert vm.shm and root.shm
    return vm, root


def _listener(root: hv.Partition, **options: int) -> tuple[hv.HvSocket, str]:
    service = str(uuid.uuid4())
    listener = root.socket()
    for name, value in options.items():
        listener.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    listener.bind((hv.HV_GUID_WILDCARD, service))
    listener.listen(16)
    return listener, service


def _connected(
    vm: hv.Partition, listener: hv.HvSocket, service: str
) -> tuple[hv.HvSocket, hv.HvSocket]:
    client = vm.socket()
    client.settimeout(TIMEOUT)
    client.connect((hv.HV_GUID_PARENT, service))
    listener.settimeout(TIMEOUT)
    server, _ = listener.accept()
    server.settimeout(TIMEOUT)
    return client, server


def _own_ring_mappings() -> list[str]:
    """/proc/self/map_files entries of this process's ring segments, however they were mapped."""
    entries = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:hvsock"):
                entries.append(f"/proc/self/map_files/{fields[0]}")
    return entries


def _named_segments(place: str, pids: set[int]) -> set[str]:
    """Files under ``place`` (and one level down) named as ring segments and probes of a
    process in ``pids`` were (``hvsock-<pid>-<128 bits>``, ``hvsock-probe-<pid>-...``): other
    hosts on this machine are none of this test's business."""
    pattern = re.compile(r"hvsock-(?:probe-)?(\d+)-[0-9a-f-]+")

    def ours(name: str) -> bool:
        match = pattern.fullmatch(name)
        return match is not None and int(match.group(1)) in pids

    found = set()
    with os.scandir(place) as entries:
        for entry in entries:
            if ours(entry.name):
                found.add(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError), os.scandir(entry.path) as inner:
                    found.update(e.path for e in inner if ours(e.name))
    return found


def test_no_ring_segment_is_reachable_by_name_during_1000_opens(host: HostProcess) -> None:
    vm, root = _pair(host)
    listener, service = _listener(root)
    seen: set[str] = set()
    scans = 0
    stop = threading.Event()
    places = [d for d in ("/dev/shm", os.environ.get("HVSOCK_SHM_DIR")) if d]

    def scan() -> None:
        nonlocal scans
        while not stop.is_set():
            for place in places:
                seen.update(_named_segments(place, {host.proc.pid, os.getpid()}))
            scans += 1

    scanner = threading.Thread(target=scan)
    scanner.start()
    host_files: set[str] = set()
    try:
        for i in range(1000):
            client, server = _connected(vm, listener, service)
            assert client.data_path == server.data_path == "shm"
            if i % 100 == 0:  # what the host holds open while channels are open
                for fd in os.listdir(f"/proc/{host.proc.pid}/fd"):
                    with contextlib.suppress(OSError):
                        host_files.add(os.readlink(f"/proc/{host.proc.pid}/fd/{fd}"))
            client.close()
            server.close()
    finally:
        stop.set()
        scanner.join()
    assert scans > 100
    assert not seen, sorted(seen)
    assert not [f for f in host_files if f.startswith("/dev/shm")], host_files
    assert any(f.startswith("/memfd:hvsock-channel") for f in host_files), host_files
    vm.close()
    root.close()


def test_truncating_any_ring_mapping_is_refused_and_the_host_survives(host: HostProcess) -> None:
    vm, root = _pair(host)
    listener, service = _listener(root)
    pairs = [_connected(vm, listener, service) for _ in range(3)]
    mappings = _own_ring_mappings()
    assert len(mappings) >= 3
    for path in mappings:
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 1 << 30)
        finally:
            os.close(fd)
    # The host, its diagnostics (which read every ring's indices) and the channels still work.
    assert len(host.segments()) == 3
    channel, admin = host.admin()
    with channel:
        listed = admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=host.metadata, timeout=10
        )
    assert len(listed.channels) == 3
    for client, server in pairs:
        client.sendall(b"still here")
        assert server.recv(100) == b"still here"
        client.close()
        server.close()
    assert host.proc.poll() is None
    vm.close()
    root.close()


def test_an_end_that_never_maps_its_rings_is_reset_within_the_connect_timeout(
    host: HostProcess,
) -> None:
    vm = create_vm(host, "vm1")
    guest = attach_vm(host, vm)
    assert guest.prove_shared_memory().HasField("ack")
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    listener, service = _listener(root)
    connect_id = guest.send(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=hv.HV_GUID_PARENT, service_id=service)
        )
    )
    opened = guest.answer(connect_id).opened
    assert opened.data_path == hvsock_pb2.DATA_PATH_SHARED_MEMORY
    listener.settimeout(TIMEOUT)
    server, _ = listener.accept()
    # The guest holds its descriptor but never maps it: within the connect timeout (2 s) the
    # host resets the channel, the peer sees the reset, and the memory goes with the channel.
    server.settimeout(TIMEOUT)
    start = time.monotonic()
    assert server.recv(100) == b""
    assert time.monotonic() - start < 2.0 + 1.0
    with pytest.raises(BrokenPipeError):
        server.sendall(b"x")
    notice = guest.event().notice
    assert notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED
    assert "did not map its rings" in notice.reason
    wait_for_no_channels(host)
    assert host.no_segments_within() == []
    server.close()
    guest.close()
    root.close()


def test_failing_to_open_one_end_fails_that_channel_only(
    host: HostProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm, root = _pair(host)
    listener, service = _listener(root)
    real = _pipe.ShmPipe
    failing_end: list[int] = [1]  # the acceptor's end (the connector's is 0)

    def flaky(segment: hvsock_pb2.SharedMemorySegment, fd: int) -> _pipe.ShmPipe:
        if failing_end and segment.end == failing_end[0]:
            failing_end.clear()
            raise OSError(errno.EMFILE, "Too many open files")
        return real(segment, fd)

    monkeypatch.setattr(_pipe, "ShmPipe", flaky)
    # The host program's accept side fails to map its end (on the attach reader thread): the
    # channel is reset, which the connector sees as any rescind (EOF, then EPIPE), and the
    # next connect to the same listener works.
    client = vm.socket()
    client.settimeout(TIMEOUT)
    client.connect((hv.HV_GUID_PARENT, service))
    assert client.recv(100) == b""
    with pytest.raises(BrokenPipeError):
        client.sendall(b"x")
    client.close()
    client, server = _connected(vm, listener, service)
    client.sendall(b"next one")
    assert server.recv(100) == b"next one"
    # A connector that cannot map its end gets the error from connect() itself.
    failing_end.append(0)
    failing = vm.socket()
    failing.settimeout(TIMEOUT)
    with pytest.raises(OSError) as info:
        failing.connect((hv.HV_GUID_PARENT, service))
    assert info.value.errno == errno.EMFILE
    failing.close()
    for sock in (client, server, listener):
        sock.close()
    vm.close()
    root.close()
    wait_for_no_channels(host)
    assert host.no_segments_within() == []


def test_descriptor_socket_refuses_strangers_and_second_connections(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest = attach_vm(host, vm)
    address = guest.welcome.shm_socket
    assert address == str(host.shm_socket)
    assert os.stat(address).st_mode & 0o777 == 0o600
    # A wrong secret: closed without a descriptor.
    with pytest.raises(ConnectionResetError):
        Handover(address, "not-a-session")
    # The right one, twice: the second connection of one session is refused.
    first = Handover(address, guest.welcome.session)
    with pytest.raises(ConnectionResetError):
        Handover(address, guest.welcome.session)
    # A wrong nonce on the attach stream is refused; the right one is accepted.
    assert guest.request(
        prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=b"x" * 32)
    ).HasField("error")
    assert guest.request(
        prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=first.nonce)
    ).HasField("ack")
    # An oversized hello is cut off.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(TIMEOUT)
        raw.connect(unix_address(address))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            raw.sendall(b"y" * 4096)
            raw.sendall(b"y" * 4096)
            assert raw.recv(16) == b""
            raise ConnectionResetError
    # Bytes after the secret break the protocol: the connection is dropped and the session's
    # later channels use the relay.
    first._sock.sendall(b"junk")
    root = attach_host(host)
    deadline = time.monotonic() + TIMEOUT
    while True:
        g, _h = open_pair(guest, root)
        if g.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY:
            break
        assert time.monotonic() < deadline
    first.close()
    guest.close()
    root.close()
    assert_healthy(host)


def test_relayed_reader_of_a_corrupt_ring_gets_ring_corrupt_error(host: HostProcess) -> None:
    created = host.create_vm("vm1")
    vm = hv.Partition(
        host.target,
        hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token),
        data_path="relay",
    )
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    listener, service = _listener(root)
    client, server = _connected(vm, listener, service)
    assert (client.data_path, server.data_path) == ("relay", "shm")
    server.sendall(b"before")
    assert client.recv(100) == b"before"
    # The host program (on shared memory) spoils the ring it writes: an unaligned write index
    # in its control page, written through its own mapping as a hostile program could.
    pipe = server._end.pipe
    assert isinstance(pipe, _pipe.ShmPipe)
    control = pipe.channel._slices[pipe.channel.end]
    index = struct.unpack_from("<I", control, OFF_WRITE_INDEX)[0]
    struct.pack_into("<I", control, OFF_WRITE_INDEX, index + 3)
    # ... and signals, as a writer does (a new data sequence number, then the futex wake).
    atomic_store(control, OFF_DATA_SEQ, atomic_load(control, OFF_DATA_SEQ) + 1)
    futex_wake(control, OFF_DATA_SEQ)
    with pytest.raises(RingCorruptError):
        client.recv(100)
    assert host.proc.poll() is None
    wait_for_no_channels(host)
    vm.close()
    root.close()


def test_a_program_that_cannot_reach_the_descriptor_socket_uses_the_relay(
    host: HostProcess, tmp_path: pathlib.Path
) -> None:
    created = host.create_vm("vm1")
    hello = hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token)
    elsewhere = str(tmp_path / "not-mounted-here.sock")
    vm = hv.Partition(host.target, hello, shm_socket=elsewhere)
    root = hv.Partition(host.target, hvsock_pb2.Hello(host=True, token=host.token))
    assert not vm.shm and root.shm
    listener, service = _listener(root)
    client, server = _connected(vm, listener, service)
    assert (client.data_path, server.data_path) == ("relay", "shm")
    client.sendall(b"over the relay")
    assert server.recv(100) == b"over the relay"
    for sock in (client, server, listener):
        sock.close()
    # Forcing shared memory where it cannot work is a clear error, not a silent relay.
    with pytest.raises(OSError) as info:
        hv.Partition(host.target, hello, shm_socket=elsewhere, data_path="shm")
    assert info.value.errno == errno.EOPNOTSUPP
    vm.close()
    root.close()
    # ... and the session it opened is gone, not leaked.
    channel, admin = host.admin()
    with channel:
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = admin.GetPartition(
                hvsock_pb2.GetPartitionRequest(vm_id=created.partition.vm_id),
                metadata=host.metadata,
                timeout=10,
            )
            if got.partition.session_count == 0:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.02)
