"""Several attachments (sessions) of one partition against a live host, through guest_client.

A VM is one partition with many processes, each opening its own hv sockets: an echo program and
an agent started later (``docker compose exec``) in the same VM container attach as the same VM;
on the host a host program and an ``hvsock bridge`` both attach the host partition.  Each
attach stream is a session owning its own sockets; ending one leaves the others working.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host
from .rawclient import RelayStream
from .test_host_api import attach_host, attach_vm, open_pair
from .test_host_badinput import (
    stray_reset,
    wait_for_no_channels,
    wait_for_sessions,
)

pytestmark = pytest.mark.integration

DATA_PATHS = ["shm", "relay"]
TIMEOUT = 30.0

# A VM program that serves an echo on one service until its stdin closes or it is killed.
_ECHO = """
import sys, guest_client as hv
vm = hv.attach()
s = vm.socket()
s.bind((hv.HV_GUID_WILDCARD, sys.argv[1]))
s.listen()
print("listening", flush=True)
conn, _ = s.accept()
while data := conn.recv(65536):
    conn.sendall(data)
conn.close()
print("done", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


@pytest.fixture(params=DATA_PATHS)
def data_path(
    request: pytest.FixtureRequest, host: HostProcess, monkeypatch: pytest.MonkeyPatch
) -> str:
    """guest_client.attach() reads the data path and the shared-memory directory from the
    environment, as a program in a VM container does."""
    monkeypatch.setenv("HVSOCK_DATA_PATH", request.param)
    return str(request.param)


def create_vm(host: HostProcess, name: str = "vm") -> hvsock_pb2.CreatePartitionResponse:
    return host.create_vm(name)


def get_partition(host: HostProcess, vm_id: str) -> hvsock_pb2.Partition:
    channel, admin = host.admin()
    with channel:
        return admin.GetPartition(
            hvsock_pb2.GetPartitionRequest(vm_id=vm_id), metadata=host.metadata, timeout=10
        ).partition


def service() -> str:
    return str(uuid.uuid4())


def listening(partition: hv.Partition, vm_id: str, service_id: str) -> hv.HvSocket:
    sock = partition.socket()
    sock.bind((vm_id, service_id))
    sock.listen()
    sock.settimeout(TIMEOUT)
    return sock


def connected(partition: hv.Partition, vm_id: str, service_id: str) -> hv.HvSocket:
    sock = partition.socket()
    sock.settimeout(TIMEOUT)
    sock.connect((vm_id, service_id))
    return sock


def accepted(listener: hv.HvSocket) -> hv.HvSocket:
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    return conn


def round_trip(a: hv.HvSocket, b: hv.HvSocket, payload: bytes) -> None:
    """``payload`` from a to b and back (sent from a thread: it may be larger than a ring)."""
    for src, dst, data in ((a, b, payload), (b, a, payload[::-1])):
        failures: list[BaseException] = []
        sender = threading.Thread(target=_send_all, args=(src, data, failures), daemon=True)
        sender.start()
        assert recv_exactly(dst, len(data)) == data
        sender.join(TIMEOUT)
        assert not sender.is_alive() and not failures, failures


def _send_all(sock: hv.HvSocket, data: bytes, failures: list[BaseException]) -> None:
    try:
        sock.sendall(data)
    except BaseException as exc:  # reported by the test thread
        failures.append(exc)


def recv_exactly(sock: hv.HvSocket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def test_two_attachments_of_one_vm_in_one_process(host: HostProcess, data_path: str) -> None:
    vm = create_vm(host)
    vm_id = vm.partition.vm_id
    root = hv.attach_host(host.target, token=host.token)
    echo = hv.attach(host.target, vm_id=vm_id, token=vm.token)  # the VM's echo program
    agent = hv.attach(host.target, vm_id=vm_id, token=vm.token)  # exec'd into the same VM
    sockets: list[hv.HvSocket] = []
    try:
        assert echo.vm_id == agent.vm_id == vm_id and echo.session != agent.session
        assert get_partition(host, vm_id).session_count == 2

        # The host connects to the echo program's listener ...
        echo_service, host_service = service(), service()
        echo_listener = listening(echo, hv.HV_GUID_WILDCARD, echo_service)
        to_echo = connected(root, vm_id, echo_service)
        at_echo = accepted(echo_listener)
        # ... and the agent connects to a host listener.
        host_listener = listening(root, hv.HV_GUID_CHILDREN, host_service)
        from_agent = connected(agent, hv.HV_GUID_PARENT, host_service)
        at_host = accepted(host_listener)
        sockets += [echo_listener, to_echo, at_echo, host_listener, from_agent, at_host]
        round_trip(to_echo, at_echo, b"to the echo program " * 1000)
        round_trip(from_agent, at_host, b"from the agent " * 1000)
        # One VM, one address space: the agent cannot bind the echo program's service.
        clash = agent.socket()
        with pytest.raises(OSError) as info:
            clash.bind((hv.HV_GUID_WILDCARD, echo_service))
            clash.listen()
        assert info.value.errno == 98  # EADDRINUSE
        clash.close()

        # The echo program goes away: its connection ends, the agent's goes on.
        echo.close()
        assert to_echo.recv(100) == b""  # rescinded by the host: EOF
        round_trip(from_agent, at_host, b"still here " * 1000)
        wait_for_sessions(host, vm_id, 1)
        partition = get_partition(host, vm_id)
        assert partition.attached and partition.listener_count == 0
        assert partition.channel_count == 1
        # Its service is free again, for the agent this time.
        again = listening(agent, hv.HV_GUID_WILDCARD, echo_service)
        sockets.append(again)
        to_agent = connected(root, vm_id, echo_service)
        sockets += [to_agent, accepted(again)]
        round_trip(to_agent, sockets[-1], b"agent listens now")
    finally:
        for sock in sockets:
            sock.close()
        for partition in (agent, echo, root):
            partition.close()
    wait_for_sessions(host, vm_id, 0)
    wait_for_no_channels(host)
    assert host.no_segments_within() == []


def test_an_attachment_in_another_process_ends_alone(host: HostProcess, data_path: str) -> None:
    """The docker testbed's case: an echo program runs as the VM; an agent is started in the
    same VM container later and attaches as the same VM; the echo program dies."""
    vm = create_vm(host)
    vm_id = vm.partition.vm_id
    echo_service, host_service = service(), service()
    env = {
        **os.environ,
        "HVSOCK_HOST": host.target,
        "HVSOCK_VM_ID": vm_id,
        "HVSOCK_TOKEN": vm.token,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, echo_service],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    root = hv.attach_host(host.target, token=host.token)
    agent: hv.Partition | None = None
    sockets: list[hv.HvSocket] = []
    try:
        assert child.stdout is not None and child.stdout.readline() == "listening\n"
        agent = hv.attach(host.target, vm_id=vm_id, token=vm.token)
        host_listener = listening(root, hv.HV_GUID_WILDCARD, host_service)
        from_agent = connected(agent, hv.HV_GUID_PARENT, host_service)
        at_host = accepted(host_listener)
        to_echo = connected(root, vm_id, echo_service)
        sockets += [host_listener, from_agent, at_host, to_echo]
        to_echo.sendall(b"ping " * 200)  # fits the rings: the echo needs no reader meanwhile
        assert recv_exactly(to_echo, 1000) == b"ping " * 200
        round_trip(from_agent, at_host, b"agent " * 2000)
        assert get_partition(host, vm_id).session_count == 2

        child.kill()
        child.wait()
        assert to_echo.recv(100) == b""  # the host rescinded the dead process's channel
        wait_for_sessions(host, vm_id, 1)
        round_trip(from_agent, at_host, b"agent, after the echo died " * 500)
        assert get_partition(host, vm_id).listener_count == 0
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        for sock in sockets:
            sock.close()
        if agent is not None:
            agent.close()
        root.close()
    wait_for_no_channels(host)


def test_loopback_between_two_attachments_of_a_vm(host: HostProcess, data_path: str) -> None:
    vm = create_vm(host)
    server = hv.attach(host.target, vm_id=vm.partition.vm_id, token=vm.token)
    client = hv.attach(host.target, vm_id=vm.partition.vm_id, token=vm.token)
    sockets: list[hv.HvSocket] = []
    try:
        loop_service = service()
        listener = listening(server, hv.HV_GUID_LOOPBACK, loop_service)
        out = connected(client, hv.HV_GUID_LOOPBACK, loop_service)
        inbound = accepted(listener)
        sockets += [listener, out, inbound]
        round_trip(out, inbound, bytes(range(256)) * 400)
        out.shutdown(hv.SHUT_WR)
        assert inbound.recv(10) == b""
        inbound.sendall(b"half-closed, still answering")
        assert recv_exactly(out, 28) == b"half-closed, still answering"
    finally:
        for sock in sockets:
            sock.close()
        client.close()
        server.close()
    wait_for_no_channels(host)


def test_two_host_attachments(host: HostProcess, data_path: str) -> None:
    """A host program and an hvsock bridge both attach the host partition."""
    vm = create_vm(host)
    vm_id = vm.partition.vm_id
    program = hv.attach_host(host.target, token=host.token)
    bridge = hv.attach_host(host.target, token=host.token)
    guest = hv.attach(host.target, vm_id=vm_id, token=vm.token)
    sockets: list[hv.HvSocket] = []
    try:
        assert program.is_host and bridge.is_host and program.session != bridge.session
        program_service, bridge_service, guest_service = service(), service(), service()
        program_listener = listening(program, hv.HV_GUID_WILDCARD, program_service)
        bridge_listener = listening(bridge, hv.HV_GUID_CHILDREN, bridge_service)
        guest_listener = listening(guest, hv.HV_GUID_WILDCARD, guest_service)
        to_program = connected(guest, hv.HV_GUID_PARENT, program_service)
        at_program = accepted(program_listener)
        to_bridge = connected(guest, hv.HV_GUID_PARENT, bridge_service)
        at_bridge = accepted(bridge_listener)
        from_bridge = connected(bridge, vm_id, guest_service)
        at_guest = accepted(guest_listener)
        sockets += [program_listener, bridge_listener, guest_listener]
        sockets += [to_program, at_program, to_bridge, at_bridge, from_bridge, at_guest]
        round_trip(to_program, at_program, b"program " * 1000)
        round_trip(to_bridge, at_bridge, b"bridge " * 1000)
        round_trip(from_bridge, at_guest, b"bridge out " * 1000)

        bridge.close()
        assert to_bridge.recv(10) == b"" and at_guest.recv(10) == b""
        round_trip(to_program, at_program, b"program, after the bridge left " * 500)
        wait_for_sessions(host, hv.HV_GUID_PARENT.lower(), 1)
        host_partition = get_partition(host, hv.HV_GUID_PARENT)
        assert host_partition.attached and host_partition.listener_count == 1
        # The bridge's service can be bound by the program now.
        sockets.append(listening(program, hv.HV_GUID_CHILDREN, bridge_service))
    finally:
        for sock in sockets:
            sock.close()
        guest.close()
        bridge.close()
        program.close()
    wait_for_no_channels(host)


def test_a_session_cannot_reach_its_siblings_channel_ends(host: HostProcess) -> None:
    """Sessions of one VM are separate processes: one cannot act on, or read, the channel
    ends of another (to it they do not exist)."""
    vm = create_vm(host)
    owner, sibling, root = attach_vm(host, vm), attach_vm(host, vm), attach_host(host)
    streams: list[RelayStream] = []
    try:
        mine, theirs = open_pair(owner, root, relay=True)
        channel_id = mine.channel_id
        # No frames for a sibling's relayed end ...
        reset = stray_reset(sibling, hvsock_pb2.RelayFrame(channel_id=channel_id, data=b"x"))
        assert reset.code == grpc.StatusCode.NOT_FOUND.value[0], reset
        assert "no relayed end" in reset.message
        # ... no shutdown, and a close of it changes nothing (close is idempotent, not an error).
        refused = sibling.request(shutdown=hvsock_pb2.Shutdown(channel_id=channel_id))
        assert refused.HasField("error") and refused.error.errno.name == "ENOENT"
        assert sibling.request(close=hvsock_pb2.Close(channel_id=channel_id)).HasField("ack")
        # The owner's end works as before, in both directions.
        streams += [RelayStream(owner, channel_id), RelayStream(root, theirs.channel_id)]
        streams[0].send_all(b"from the owner")
        streams[0].send_fin()
        assert streams[1].read_all() == b"from the owner"
        streams[1].send_all(b"to the owner")
        streams[1].send_fin()
        assert streams[0].read_all() == b"to the owner"
    finally:
        for stream in streams:
            stream.close()
        for partition in (sibling, owner, root):
            partition.close()
    wait_for_no_channels(host)
