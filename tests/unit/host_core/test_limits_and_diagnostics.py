"""max_socket_number, diagnostics snapshots, traffic reports and the lifecycle event log."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from host_service.core import (
    CHILDREN,
    HOST_VM_ID,
    LOOPBACK,
    PARENT,
    WILDCARD,
    Address,
    ChannelState,
    ConnectionOffered,
    ConnectionRefused,
    NoBuffers,
    NotFound,
    PartitionChanged,
    RingGeometry,
    Side,
    service_id_for_port,
)

if TYPE_CHECKING:
    from .conftest import World

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)


def test_max_socket_number_counts_listeners_and_channel_ends(make: Callable[..., World]) -> None:
    world = make(max_socket_number=3)
    guest = world.guest()
    world.core.listen(guest, WILDCARD, SVC, 0)
    world.core.connect(guest, PARENT, service_id_for_port(1), 0)
    world.core.connect(guest, PARENT, service_id_for_port(2), 0)
    assert world.core.get_partition(guest.vm_id).sockets == 3
    with pytest.raises(NoBuffers, match="max_socket_number") as info:
        world.core.connect(guest, PARENT, service_id_for_port(3), 0)
    assert (info.value.errno, info.value.status) == (105, "RESOURCE_EXHAUSTED")
    with pytest.raises(NoBuffers):
        world.core.listen(guest, PARENT, service_id_for_port(9), 0)
    # Sockets come back when channels go.
    world.core.on_timer(2.0)
    assert world.core.get_partition(guest.vm_id).sockets == 1
    world.core.connect(guest, PARENT, service_id_for_port(3), 2.0)


def test_acceptor_at_its_limit_behaves_like_a_full_backlog(make: Callable[..., World]) -> None:
    world = make(max_socket_number=2)
    world.core.listen(world.host, CHILDREN, SVC, 0)
    first = world.guest("a", personality="windows")
    world.core.connect(first, PARENT, SVC, 0)  # the host: listener + one offered end = 2
    with pytest.raises(ConnectionRefused):
        world.core.connect(world.guest("b", personality="windows"), PARENT, SVC, 0)
    linux = world.guest("c")
    _, events = world.core.connect(linux, PARENT, SVC, 0)
    assert world.of_type(events, ConnectionOffered) == []


def test_loopback_needs_room_for_both_ends(make: Callable[..., World]) -> None:
    world = make(max_socket_number=2)
    world.core.listen(world.host, LOOPBACK, SVC, 0)
    with pytest.raises(ConnectionRefused):  # listener + 2 ends would be 3
        world.core.connect(world.host, LOOPBACK, SVC, 0)


def test_the_limit_is_per_partition(make: Callable[..., World]) -> None:
    world = make(max_socket_number=1)
    a, b = world.guest("a"), world.guest("b")
    world.core.connect(a, PARENT, SVC, 0)
    world.core.connect(b, PARENT, SVC, 0)


def test_snapshot_of_a_channel(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 1.0)
    pending = world.core.get_channel(cid)
    assert pending.state is ChannelState.OFFERED and pending.deadline == 3.0
    world.core.accept(world.host, cid, 1.5)
    assert world.core.set_data_path(cid, Side.CONNECTOR, "shm")
    assert world.core.set_data_path(cid, Side.ACCEPTOR, "relay")
    info = world.core.get_channel(cid)
    assert info.state is ChannelState.OPEN and info.ring == RingGeometry(2, 3)
    assert (info.created_at, info.state_since, info.deadline) == (1.0, 1.5, None)
    assert info.connector.vm_id == guest.vm_id
    assert info.connector.local == Address(guest.vm_id, service_id_for_port(1024))
    assert info.connector.remote == Address(PARENT, SVC)
    assert info.connector.data_path == "shm"
    assert info.acceptor is not None
    assert info.acceptor.vm_id == HOST_VM_ID and info.acceptor.local == Address(CHILDREN, SVC)
    assert info.acceptor.remote == info.connector.local
    assert info.acceptor.data_path == "relay"
    assert world.core.list_channels() == [info]
    assert world.core.list_channels(guest.vm_id) == [info]
    assert world.core.list_channels(world.guest("other").vm_id) == []


def test_reports_for_gone_channels_are_harmless(world: World) -> None:
    assert world.core.set_data_path(42, Side.CONNECTOR, "shm") is False
    with pytest.raises(NotFound):
        world.core.get_channel(42)


def test_unconnected_channel_has_no_acceptor(world: World) -> None:
    cid, _ = world.core.connect(world.guest(), PARENT, SVC, 0)
    assert world.core.get_channel(cid).acceptor is None


def test_partition_snapshot_counts_sockets(world: World) -> None:
    guest = world.guest()
    world.core.listen(guest, WILDCARD, SVC, 0)
    world.core.connect(guest, PARENT, SVC, 0)
    info = world.core.get_partition(guest.vm_id)
    assert info.sockets == 2 and info.attached


def test_event_log_sequence_and_resume(world: World) -> None:
    everything = world.core.events_since(0)
    seqs = [e.seq for e in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    last = seqs[-1]
    _, _, created = world.core.create_partition("later", 7.0)
    assert world.core.events_since(last) == created
    assert created[0].at == 7.0 and isinstance(created[0], PartitionChanged)


def test_event_log_is_bounded(make: Callable[..., World]) -> None:
    world = make(event_log_size=3)
    for i in range(5):
        world.core.create_partition(f"vm{i}", float(i))
    kept = world.core.events_since(0)
    assert len(kept) == 3 and [e.at for e in kept] == [2.0, 3.0, 4.0]


def test_many_connections_timer_heap_stays_correct(make: Callable[..., World]) -> None:
    # Deadlines of accepted channels are skipped lazily; the earliest live one is reported.
    world = make(max_socket_number=10_000)
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0, backlog=10_000)
    ids = [world.core.connect(guest, PARENT, SVC, float(i) / 100)[0] for i in range(300)]
    for cid in ids[:299]:
        world.core.accept(world.host, cid, 1.0)
    assert world.core.next_deadline() == pytest.approx(2.0 + 299 / 100)
    assert len(world.core.on_timer(100.0)) > 0
    assert len(world.core.list_channels()) == 299
