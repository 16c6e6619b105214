"""One socket suite for every transport: in-memory pair, shared-memory rings, gRPC relay.

``any_env`` runs a test on all three; ``host_env`` on the two that go through a real
``hvsock-host`` process (connection set-up, routing, personalities need the host). The relay
runs three times: relayed at both ends with the host's default relay window (the host passes
frames from stream to stream), the same strict ("relay-strict": every socket asks for window
0, a ring's back-pressure byte for byte, through HVSOCK_RELAY_WINDOW), and "relay-vm": only
the VM's end relayed, the host partition on shared memory (the usual deployment: the host
pumps the relayed end through the channel's rings).
"""

from __future__ import annotations

import itertools
import pathlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import guest_client as hv
from guest_client.testing import socketpair
from hvsock.v1 import hvsock_pb2

from ..integration.hostproc import HostProcess, run_host

#: Partition names are unique on a host, and a host serves a whole module: number them.
_VM_NUMBERS = itertools.count(1)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("host")) as process:
        yield process


@dataclass
class Env:
    transport: str
    host: HostProcess | None = None
    partitions: list[hv.Partition] = field(default_factory=list)
    sockets: list[hv.HvSocket] = field(default_factory=list)
    _ports: int = 5000

    # -- partitions -----------------------------------------------------------------------

    def _data_path(self, vm: bool) -> str:
        relayed = self.transport.startswith("relay") and (vm or self.transport != "relay-vm")
        return "relay" if relayed else "shm"

    def vm(self, personality: str = "linux", name: str = "vm") -> hv.Partition:
        assert self.host is not None
        # Names are unique on a host, and the host outlives a test: number them.
        created = self.host.create_vm(f"{name}-{next(_VM_NUMBERS)}", personality)
        partition = hv.Partition(
            self.host.target,
            hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token),
            data_path=self._data_path(vm=True),
        )
        self.partitions.append(partition)
        return partition

    def root(self) -> hv.Partition:
        assert self.host is not None
        partition = hv.Partition(
            self.host.target,
            hvsock_pb2.Hello(host=True, token=self.host.token),
            data_path=self._data_path(vm=False),
        )
        self.partitions.append(partition)
        return partition

    def service(self) -> str:
        Env._ports += 1
        return hv.service_id_for_port(Env._ports)

    def track(self, sock: hv.HvSocket) -> hv.HvSocket:
        self.sockets.append(sock)
        return sock

    # -- connected pairs ------------------------------------------------------------------

    def pair(self) -> tuple[hv.HvSocket, hv.HvSocket]:
        """(guest end, host end) of a fresh connection."""
        if self.transport == "memory":
            guest, host = socketpair()
            self.track(guest)
            self.track(host)
            return guest, host
        root, vm = self.root(), self.vm()
        service = self.service()
        listener = self.track(root.socket())
        listener.bind((hv.HV_GUID_WILDCARD, service))
        listener.listen()
        client = self.track(vm.socket())
        client.connect((hv.HV_GUID_PARENT, service))
        server, _ = listener.accept()
        self.track(server)
        return client, server

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for partition in self.partitions:
            partition.close()


def _strict(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "relay-strict":
        monkeypatch.setenv("HVSOCK_RELAY_WINDOW", "0")


@pytest.fixture(params=["memory", "shm", "relay", "relay-strict", "relay-vm"])
def any_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    host = request.getfixturevalue("host") if request.param != "memory" else None
    _strict(request, monkeypatch)
    env = Env(request.param, host)
    yield env
    env.close()


@pytest.fixture(params=["shm", "relay", "relay-strict", "relay-vm"])
def host_env(
    request: pytest.FixtureRequest, host: HostProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    _strict(request, monkeypatch)
    env = Env(request.param, host)
    yield env
    env.close()


def run_in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


__all__ = ["Env", "pathlib", "run_in_thread"]
