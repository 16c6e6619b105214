"""Programs outlive the host service (issue 16): when the host dies -- killed, or stopped
gracefully -- every socket open at that moment fails with ConnectionResetError, whether a call
was blocked in it (send on a full ring, recv on an empty one) or comes later, on both data
paths; and ``wait_attached()`` returns only once a new host has accepted the session, so the
next connect works.

The findings this guards: a blocked sender got BrokenPipeError ("channel rescinded": the peer's
process had heard of the lost host first and rescinded the shared ring), and after a graceful
stop ``wait_attached()`` returned while the old host was still draining, so the next connect
failed with EIO once it exited.
"""

from __future__ import annotations

import pathlib
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import guest_client as hv
from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2

from ..integration.hostproc import HostProcess, run_host

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = hv.service_id_for_port(7300)
#: A sender that would fill any default ring many times over.
BULK = b"b" * (4 * DEFAULT_RELAY_WINDOW)  # more than a relayed sender may have in flight


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path, "--state", str(tmp_path / "state.sqlite")) as process:
        yield process


def partition(host: HostProcess, hello: hvsock_pb2.Hello, data_path: str) -> hv.Partition:
    return hv.Partition(host.target, hello, data_path=data_path)


class Blocked:
    """A call run on its own thread; what it raised (or returned) when it ended."""

    def __init__(self, name: str, call: Callable[[], object]) -> None:
        self.name = name
        self.outcome: object = None
        self.started = threading.Event()

        def run() -> None:
            self.started.set()
            try:
                self.outcome = call()
            except BaseException as exc:  # the outcome under test, whatever it is
                self.outcome = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def result(self, within: float) -> object:
        self.thread.join(within)
        assert not self.thread.is_alive(), "the call is still blocked"
        return self.outcome


def until_not_writable(sock: hv.HvSocket, within: float = 30) -> None:
    """Poll (with a deadline) until the socket's send ring is full: a sender is blocked."""
    deadline = time.monotonic() + within
    while select.select([], [sock], [], 0)[1]:
        assert time.monotonic() < deadline, "the sender never filled the ring"
        time.sleep(0.005)


@pytest.mark.parametrize("how", ["kill", "term"])
@pytest.mark.parametrize("data_path", ["shm", "relay"])
def test_sockets_reset_and_the_partition_attaches_to_the_next_host(
    host: HostProcess, tmp_path: pathlib.Path, data_path: str, how: str
) -> None:
    created = host.create_vm("survivor")
    root = partition(host, hvsock_pb2.Hello(host=True, token=host.token), data_path)
    vm = partition(
        host, hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token), data_path
    )
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, SERVICE))
    listener.listen()
    pairs = []
    for _ in range(3):
        client = vm.socket()
        client.connect((hv.HV_GUID_PARENT, SERVICE))
        server, _ = listener.accept()
        pairs.append((client, server))
    (sender, sender_peer), (reader, reader_peer), (idle, idle_peer) = pairs
    assert {sender.data_path, reader.data_path} == {data_path}

    sending = Blocked("send", lambda: sender.sendall(BULK))  # the peer never reads: blocks
    until_not_writable(sender)
    receiving = Blocked("recv", lambda: reader.recv(100))  # nothing ever comes: blocks
    peer_receiving = Blocked(
        "peer recv", lambda: reader_peer.recv(100)
    )  # the host program's side too

    if how == "kill":
        host.proc.kill()
    else:
        host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(timeout=30) is not None
    gone = time.monotonic()

    for blocked in (sending, receiving, peer_receiving):
        outcome = blocked.result(within=5)
        assert isinstance(outcome, ConnectionResetError), (blocked.name, outcome)
    assert time.monotonic() - gone < 5
    # Every later call on a socket open at that moment is a reset too, idle ones included.
    for sock in (sender, reader, idle, sender_peer, idle_peer):
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    assert vm.wait_lost(5) and root.wait_lost(5)
    # No host runs now: the partitions must not claim to be attached.
    assert not vm.wait_attached(0.5) and not root.wait_attached(0)
    with pytest.raises(ConnectionResetError):
        vm.socket().connect((hv.HV_GUID_PARENT, SERVICE))

    with run_host(tmp_path, "--state", str(host.state), like=host) as again:
        assert vm.wait_attached(30) and root.wait_attached(30)
        # Attached means a host accepted the session: the first connect works.
        listener2 = root.socket()
        listener2.bind((hv.HV_GUID_WILDCARD, SERVICE))
        listener2.listen()
        fresh = vm.socket()
        fresh.connect((hv.HV_GUID_PARENT, SERVICE))
        accepted, _ = listener2.accept()
        fresh.sendall(b"after the restart")
        assert accepted.recv(100) == b"after the restart"
        for sock in (fresh, accepted, listener2, listener, *(s for pair in pairs for s in pair)):
            sock.close()
        vm.close()
        root.close()
        assert again.no_segments_within() == []
