"""The host service API end to end, with stub-only clients (as any language would use it)."""

from __future__ import annotations

import errno
import pathlib
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host, usage_error
from .rawclient import RawPartition, RelayStream

pytestmark = pytest.mark.integration

SERVICE = "3049197c-facb-11e6-bd58-64006a7986d3"
PARENT = "a42e7cda-d03f-480c-9cc2-a4de20abb878"
WILDCARD = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


def create_vm(
    host: HostProcess, name: str, personality: int = hvsock_pb2.PERSONALITY_LINUX
) -> hvsock_pb2.CreatePartitionResponse:
    channel, admin = host.admin()
    with channel:
        return admin.CreatePartition(
            hvsock_pb2.CreatePartitionRequest(name=name, personality=personality),
            metadata=host.metadata,
            timeout=10,
        )


def attach_vm(host: HostProcess, created: hvsock_pb2.CreatePartitionResponse) -> RawPartition:
    return RawPartition(
        host.target,
        hvsock_pb2.Hello(vm_id=created.partition.vm_id, token=created.token),
    )


def attach_host(host: HostProcess) -> RawPartition:
    return RawPartition(host.target, hvsock_pb2.Hello(host=True, token=host.token))


def open_pair(
    guest: RawPartition, root: RawPartition, *, relay: bool = False, listen: bool = True
) -> tuple[hvsock_pb2.Channel, hvsock_pb2.Channel]:
    """Host listens on SERVICE (unless it does already: ``listen=False``), the guest connects
    to (PARENT, SERVICE); both ends opened."""
    if listen:
        listening = root.request(
            listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE))
        )
        assert listening.WhichOneof("kind") == "listening", listening
        root.listener_id = listening.listening.listener_id
    connect_id = guest.send(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=PARENT, service_id=SERVICE), force_relay=relay
        )
    )
    offer = root.event().offer
    assert offer.listener_id == root.listener_id
    accepted = root.request(
        accept=hvsock_pb2.Accept(channel_id=offer.channel.channel_id, force_relay=relay)
    )
    assert accepted.WhichOneof("kind") == "opened", accepted
    connected = guest.answer(connect_id)
    assert connected.WhichOneof("kind") == "opened", connected
    return connected.opened, accepted.opened


def prove(partition: RawPartition) -> None:
    assert partition.prove_shared_memory().HasField("ack")


def test_guest_to_host_over_shared_memory(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    prove(guest)
    prove(root)
    g, h = open_pair(guest, root)
    assert g.data_path == h.data_path == hvsock_pb2.DATA_PATH_SHARED_MEMORY
    assert g.local.vm_id == vm.partition.vm_id and g.remote.service_id == SERVICE
    assert g.geometry.send_ring_pages == 2 and g.geometry.recv_ring_pages == 3
    assert h.geometry.send_ring_pages == 3 and h.geometry.recv_ring_pages == 2
    a, b = guest.map_end(g), root.map_end(h)
    try:
        assert len(host.segments()) == 1  # the host keeps the channel's segment mapped
        a.sendall(b"hello host")
        assert b.recv(100, timeout=5) == b"hello host"
        b.sendall(b"hello guest")
        assert a.recv(100, timeout=5) == b"hello guest"
        # Rescind from the admin API wakes and ends both ends.
        channel, admin = host.admin()
        with channel:
            admin.RescindChannel(
                hvsock_pb2.RescindChannelRequest(channel_id=g.channel_id, reason="test"),
                metadata=host.metadata,
                timeout=10,
            )
        notice = guest.event().notice
        assert notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED
        assert a.recv(100, timeout=5) == b""
        with pytest.raises(BrokenPipeError):
            a.sendall(b"x")
    finally:
        a.close()
        b.close()
    guest.close()
    root.close()


def test_guest_to_host_over_relay(host: HostProcess) -> None:
    vm = create_vm(host, "vm1")
    guest, root = attach_vm(host, vm), attach_host(host)
    g, h = open_pair(guest, root)  # nobody proved shared memory: relay
    assert g.data_path == h.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY

    payload = bytes(range(256)) * (4 * DEFAULT_RELAY_WINDOW // 256)  # beyond ring and window
    to_host = RelayStream(guest, g.channel_id)
    from_guest = RelayStream(root, h.channel_id)
    from_guest.send_fin()
    writer = threading.Thread(target=lambda: (to_host.send_all(payload), to_host.send_fin()))
    writer.start()
    assert from_guest.read_all() == payload
    writer.join()
    assert to_host.read_all() == b""  # the host sent FIN at once
    assert to_host.limits[0] < len(payload) <= to_host.limits[-1]  # credit grew as space freed


def test_the_relay_budget_bounds_the_windows_and_a_starved_end_still_delivers(
    tmp_path: pathlib.Path,
) -> None:
    # Room for one end's window and half another's: the guest's first end gets the window,
    # the host's its half, the second channel's ends are strict (their ring's room alone).
    budget = DEFAULT_RELAY_WINDOW * 3 // 2
    with run_host(tmp_path, f"--relay-window-budget={budget}") as host:
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        g1, h1 = open_pair(guest, root)
        g2, h2 = open_pair(guest, root, listen=False)
        assert g1.relay_send_limit >= DEFAULT_RELAY_WINDOW
        assert DEFAULT_RELAY_WINDOW // 2 <= h1.relay_send_limit < DEFAULT_RELAY_WINDOW
        assert g2.relay_send_limit < DEFAULT_RELAY_WINDOW // 2
        assert h2.relay_send_limit < DEFAULT_RELAY_WINDOW // 2
        # The starved end still moves bytes beyond its limit, in order, with none lost.
        payload = bytes(range(256)) * (2 * DEFAULT_RELAY_WINDOW // 256)
        to_host, from_guest = RelayStream(guest, g2.channel_id), RelayStream(root, h2.channel_id)
        writer = threading.Thread(target=lambda: (to_host.send_all(payload), to_host.send_fin()))
        writer.start()
        assert from_guest.read_all() == payload
        writer.join()
        assert len(to_host.limits) > 2  # it went at the peer's pace, grant by grant
        guest.close()
        root.close()


@pytest.mark.parametrize(
    ("flag", "loop_class"), [(None, "uvloop.Loop"), ("asyncio", "asyncio.unix_events.")]
)
def test_the_host_serves_relayed_data_on_either_event_loop(
    tmp_path: pathlib.Path, flag: str | None, loop_class: str
) -> None:
    extra = [f"--event-loop={flag}"] if flag else []  # none: the default (uvloop)
    with run_host(tmp_path, *extra) as host:
        serving = next(line for line in host.log if "serving on" in line)
        assert f"(event loop: {loop_class}" in serving
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        g, h = open_pair(guest, root)
        payload = bytes(range(256)) * (2 * DEFAULT_RELAY_WINDOW // 256)  # beyond ring and window
        to_host, from_guest = RelayStream(guest, g.channel_id), RelayStream(root, h.channel_id)
        writer = threading.Thread(target=lambda: (to_host.send_all(payload), to_host.send_fin()))
        writer.start()
        assert from_guest.read_all() == payload
        writer.join()
        guest.close()
        root.close()


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--relay-window-budget", "-1"], {}, "must be at least 0, not -1"),
        ([], {"HVSOCK_RELAY_WINDOW_BUDGET": "lots"}, "HVSOCK_RELAY_WINDOW_BUDGET"),
        (["--event-loop", "trio"], {}, "must be one of uvloop, asyncio, not 'trio'"),
        ([], {"HVSOCK_EVENT_LOOP": "twisted"}, "HVSOCK_EVENT_LOOP='twisted'"),
        (["--log-level", "chatty"], {}, "must be a logging level (CRITICAL, ERROR, WARNING"),
        ([], {"HVSOCK_LOG_LEVEL": "loud"}, "HVSOCK_LOG_LEVEL='loud'"),
        (["--log-format", "xml"], {}, "must be one of text, json, not 'xml'"),
    ],
)
def test_a_bad_setting_is_a_usage_error(
    tmp_path: pathlib.Path, args: list[str], env: dict[str, str], error: str
) -> None:
    assert error in usage_error(tmp_path, args, env)


def test_admin_needs_the_host_token(host: HostProcess) -> None:
    channel, admin = host.admin()
    with channel, pytest.raises(grpc.RpcError) as info:
        admin.ListPartitions(
            hvsock_pb2.ListPartitionsRequest(), metadata=(("x-hvsock-token", "nope"),), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_windows_guest_connect_to_missing_service_is_refused_with_errno(host: HostProcess) -> None:
    vm = create_vm(host, "win", hvsock_pb2.PERSONALITY_WINDOWS)
    guest = attach_vm(host, vm)
    answer = guest.request(
        connect=hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=PARENT, service_id=str(uuid.uuid4()))
        )
    )
    assert answer.error.errno.errno == errno.ECONNREFUSED
    assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.mark.parametrize("asked", [True, False], ids=["asked", "not-asked"])
def test_peer_fin_notices_go_only_to_sessions_that_ask(host: HostProcess, asked: bool) -> None:
    vm = create_vm(host, "vm1")
    guest = RawPartition(
        host.target,
        hvsock_pb2.Hello(vm_id=vm.partition.vm_id, token=vm.token, peer_fin_notices=asked),
    )
    root = attach_host(host)
    g, h = open_pair(guest, root)
    assert root.request(shutdown=hvsock_pb2.Shutdown(channel_id=h.channel_id)).HasField("ack")
    # Answered behind anything the shutdown queued for the guest (one stream, in order).
    assert guest.request(
        listen=hvsock_pb2.Listen(address=hvsock_pb2.Address(vm_id=WILDCARD, service_id=SERVICE))
    ).HasField("listening")
    notices = []
    while not guest.events.empty():
        notices.append(guest.events.get().notice)
    expected = [(g.channel_id, hvsock_pb2.ChannelNotice.KIND_PEER_FIN)] if asked else []
    assert [(n.channel_id, n.kind) for n in notices] == expected
    guest.close()
    root.close()
