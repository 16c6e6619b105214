"""Channel lifecycle through HostCore: accept, refuse, FIN, close, close timeout, rescind,
protocol errors, and what each end is told."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from host_service.core import (
    CHILDREN,
    HOST_VM_ID,
    LOOPBACK,
    PARENT,
    WILDCARD,
    ChannelRemoved,
    ChannelRescinded,
    ChannelState,
    ChannelStateChanged,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    InvalidArgument,
    NotConnected,
    NotFound,
    PeerFinReceived,
    PermissionDenied,
    ProtocolError,
    Side,
    service_id_for_port,
)

if TYPE_CHECKING:
    from host_service.core import Session

    from .conftest import World

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)


def open_channel(world: World, personality: str = "linux") -> tuple[Session, int]:
    """A guest connected to a host CHILDREN listener and accepted: OPEN."""
    guest = world.guest(personality=personality)
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    world.core.accept(world.host, cid, 0)
    return guest, cid


def test_accept_tells_both_ends(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    events = world.core.accept(world.host, cid, 0.25)
    to_guest = world.one(events, ConnectionEstablished, partition=guest.vm_id)
    to_host = world.one(events, ConnectionEstablished, partition=HOST_VM_ID)
    assert to_guest.side is Side.CONNECTOR and to_host.side is Side.ACCEPTOR
    assert to_guest.remote.vm_id == PARENT and to_guest.remote.service_id == SVC
    assert to_host.remote == to_guest.local
    assert world.core.get_channel(cid).state is ChannelState.OPEN
    assert world.core.get_channel(cid).deadline is None
    assert world.core.next_deadline() is None  # the connect timer is gone


def test_only_the_acceptor_accepts(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    with pytest.raises(PermissionDenied, match="not the acceptor"):
        world.core.accept(guest, cid, 0)
    assert world.core.get_channel(cid).state is ChannelState.OFFERED


def test_offer_not_accepted_in_time_is_withdrawn(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    events = world.core.on_timer(2.0)
    assert world.one(events, ConnectFailed, partition=guest.vm_id).errno == 110
    assert world.one(events, ChannelRescinded, partition=HOST_VM_ID).side is Side.ACCEPTOR
    assert world.core.list_listeners()[0].pending == 0
    with pytest.raises(NotFound):
        world.core.accept(world.host, cid, 2.0)


@pytest.mark.parametrize(("personality", "heard"), [("windows", True), ("linux", False)])
def test_host_refusing_an_offer(world: World, personality: str, heard: bool) -> None:
    guest = world.guest(personality=personality)
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    events = world.core.refuse(world.host, cid, 0.5)
    assert world.core.get_partition(HOST_VM_ID).sockets == 1  # the offered end is gone
    if heard:
        failed = world.one(events, ConnectFailed, partition=guest.vm_id)
        assert failed.errno == 111 and failed.status == "UNAVAILABLE"
        assert world.addressed(events, HOST_VM_ID) == []  # the refuser is not told again
        assert world.core.list_channels() == []
    else:
        assert world.of_type(events, ConnectFailed) == []
        assert world.core.get_channel(cid).state is ChannelState.CONNECT_REQUESTED
        assert world.core.get_channel(cid).acceptor is None
        assert world.one(world.core.on_timer(2.0), ConnectFailed).errno == 110


def test_guest_refusing_a_host_offer_is_silent(world: World) -> None:
    guest = world.guest(personality="windows")
    world.core.listen(guest, WILDCARD, SVC, 0)
    cid, _ = world.core.connect(world.host, guest.vm_id, SVC, 0)
    assert world.core.refuse(guest, cid, 0)[-1].new is ChannelState.CONNECT_REQUESTED  # type: ignore[attr-defined]
    assert world.one(world.core.on_timer(2.0), ConnectFailed, partition=HOST_VM_ID).errno == 110


def test_unlisten_refuses_pending_offers(world: World) -> None:
    guest = world.guest(personality="windows")
    info, _ = world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    events = world.core.unlisten(world.host, info.listener_id, 0.1)
    assert world.one(events, ConnectFailed, channel_id=cid).errno == 111


def test_shutdown_sends_fin_to_the_peer_once(world: World) -> None:
    guest, cid = open_channel(world)
    events = world.core.shutdown(guest, cid, 1.0)
    fin = world.one(events, PeerFinReceived)
    assert fin.partition == HOST_VM_ID and fin.side is Side.ACCEPTOR
    assert world.core.get_channel(cid).state is ChannelState.HALF_CLOSED_BY_CONNECTOR
    assert world.of_type(world.core.shutdown(guest, cid, 1.1), PeerFinReceived) == []


def test_both_fins_close_and_the_host_rescinds(world: World) -> None:
    guest, cid = open_channel(world)
    world.core.shutdown(world.host, cid, 1.0)
    events = world.core.shutdown(guest, cid, 2.0)
    world.one(events, PeerFinReceived, partition=HOST_VM_ID)
    rescinds = world.of_type(events, ChannelRescinded)
    assert {(r.partition, r.side) for r in rescinds} == {
        (guest.vm_id, Side.CONNECTOR),
        (HOST_VM_ID, Side.ACCEPTOR),
    }
    removed = world.one(events, ChannelRemoved)
    assert removed.final_state is ChannelState.CLOSED
    assert (removed.connector, removed.acceptor) == (guest.vm_id, HOST_VM_ID)
    assert world.core.list_channels() == []
    assert world.core.get_partition(guest.vm_id).sockets == 0
    assert world.core.get_partition(HOST_VM_ID).sockets == 1


def test_close_waits_for_peer_then_closes(world: World) -> None:
    guest, cid = open_channel(world)
    events = world.core.close(world.host, cid, 1.0)
    world.one(events, PeerFinReceived, partition=guest.vm_id)
    assert world.core.get_channel(cid).state is ChannelState.CLOSING_BY_ACCEPTOR
    assert world.core.next_deadline() == 9.0  # 8 s close timeout
    world.core.close(world.host, cid, 2.0)  # idempotent: the timer is not restarted
    assert world.core.next_deadline() == 9.0
    events = world.core.close(guest, cid, 3.0)
    assert world.one(events, ChannelRemoved).final_state is ChannelState.CLOSED
    # No FIN to a peer that has already closed.
    assert world.of_type(events, PeerFinReceived) == []
    assert world.core.next_deadline() is None


def test_close_timeout_rescinds(world: World) -> None:
    guest, cid = open_channel(world)
    world.core.close(guest, cid, 1.0)
    assert world.core.on_timer(8.999) == []
    events = world.core.on_timer(9.0)
    assert len(world.of_type(events, ChannelRescinded)) == 2
    assert world.one(events, ChannelRemoved).final_state is ChannelState.RESCINDED
    assert "close timeout" in world.one(events, ChannelRemoved).reason


def test_close_after_fin_starts_the_close_timer(world: World) -> None:
    guest, cid = open_channel(world)
    world.core.shutdown(guest, cid, 1.0)
    events = world.core.close(guest, cid, 2.0)
    assert world.of_type(events, PeerFinReceived) == []  # the FIN was already sent
    assert world.core.get_channel(cid).state is ChannelState.CLOSING_BY_CONNECTOR
    assert world.core.next_deadline() == 10.0
    events = world.core.shutdown(world.host, cid, 3.0)
    assert world.one(events, ChannelRemoved).final_state is ChannelState.CLOSED


def test_connector_abandons_connect(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    events = world.core.close(guest, cid, 0.5)
    assert world.of_type(events, ConnectFailed) == []  # it gave up; nothing to tell it
    assert world.one(events, ChannelRescinded).partition == HOST_VM_ID  # offer withdrawn
    assert world.core.list_listeners()[0].pending == 0


def test_admin_rescind_reaches_both_ends(world: World) -> None:
    guest, cid = open_channel(world)
    events = world.core.rescind(cid, 1.0)
    rescinds = world.of_type(events, ChannelRescinded)
    assert {r.partition for r in rescinds} == {guest.vm_id, HOST_VM_ID}
    assert all(r.reason == "fault injected" for r in rescinds)
    with pytest.raises(NotFound):
        world.core.rescind(cid, 1.0)


def test_an_end_resets_its_own_channel_only(world: World) -> None:
    guest, cid = open_channel(world)
    other = world.guest("other-vm")
    with pytest.raises(NotFound):
        world.core.reset(other, cid, 1.0)  # holds no end of it
    events = world.core.reset(guest, cid, 1.0)
    rescinds = world.of_type(events, ChannelRescinded)
    assert {r.partition for r in rescinds} == {guest.vm_id, HOST_VM_ID}
    assert all(r.reason == "reset by the connector" for r in rescinds)


def test_rescind_of_a_pending_connect_is_a_reset(world: World) -> None:
    guest = world.guest()
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    failed = world.one(world.core.rescind(cid, 0.1, reason="chaos"), ConnectFailed)
    assert (failed.errno, failed.status, failed.reason) == (104, "UNAVAILABLE", "chaos")


def test_rescind_all(world: World) -> None:
    guest, _cid = open_channel(world)
    world.core.connect(guest, PARENT, service_id_for_port(1), 0)
    events = world.core.rescind_all(5.0)
    assert len(world.of_type(events, ChannelRemoved)) == 2
    assert world.core.list_channels() == [] and world.core.next_deadline() is None


def test_protocol_error_rescinds_and_carries_events(world: World) -> None:
    _guest, cid = open_channel(world)
    with pytest.raises(ProtocolError, match="'accept' is not allowed in state 'open'") as info:
        world.core.accept(world.host, cid, 1.0)
    events = info.value.events
    assert len(world.of_type(events, ChannelRescinded)) == 2
    assert world.one(events, ChannelRemoved).final_state is ChannelState.RESCINDED
    assert world.core.list_channels() == []


def test_shutdown_before_accept_is_not_connected(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    with pytest.raises(NotConnected) as info:
        world.core.shutdown(guest, cid, 0.1)
    assert info.value.errno == 107
    assert world.one(info.value.events, ConnectFailed).errno == 104


def test_fin_from_an_end_that_closed_is_a_protocol_error(world: World) -> None:
    guest, cid = open_channel(world)
    world.core.close(guest, cid, 1.0)
    with pytest.raises(ProtocolError):
        world.core.shutdown(guest, cid, 1.5)


def test_channels_of_others_are_not_found(world: World) -> None:
    guest, cid = open_channel(world)
    stranger = world.guest("stranger")
    for call in (world.core.shutdown, world.core.close, world.core.accept, world.core.refuse):
        with pytest.raises(NotFound, match=f"no channel {cid}"):
            call(stranger, cid, 1.0)
    with pytest.raises(NotFound):
        world.core.close(guest, 999, 1.0)
    with pytest.raises(PermissionDenied, match="not the acceptor"):
        world.core.close(guest, cid, 1.0, side=Side.ACCEPTOR)


def test_loopback_ends_need_a_side(world: World) -> None:
    world.core.listen(world.host, LOOPBACK, SVC, 0)
    cid, _ = world.core.connect(world.host, LOOPBACK, SVC, 0)
    world.core.accept(world.host, cid, 0)
    with pytest.raises(InvalidArgument, match="loopback"):
        world.core.shutdown(world.host, cid, 1.0)
    events = world.core.shutdown(world.host, cid, 1.0, side=Side.CONNECTOR)
    assert world.one(events, PeerFinReceived).side is Side.ACCEPTOR
    events = world.core.close(world.host, cid, 2.0, side="acceptor")  # type: ignore[arg-type]
    assert world.one(events, ChannelRemoved).final_state is ChannelState.CLOSED
    assert len(world.of_type(events, ChannelRescinded)) == 2  # one per end, same partition
    assert world.core.get_partition(HOST_VM_ID).sockets == 1


def test_lifecycle_log_records_every_transition(world: World) -> None:
    guest, cid = open_channel(world)
    world.core.shutdown(guest, cid, 1.0)
    world.core.shutdown(world.host, cid, 2.0)
    changes = [
        (e.old, e.new)
        for e in world.core.events_since(0)
        if isinstance(e, ChannelStateChanged) and e.channel_id == cid
    ]
    assert changes == [
        (None, ChannelState.CONNECT_REQUESTED),
        (ChannelState.CONNECT_REQUESTED, ChannelState.OFFERED),
        (ChannelState.OFFERED, ChannelState.OPEN),
        (ChannelState.OPEN, ChannelState.HALF_CLOSED_BY_CONNECTOR),
        (ChannelState.HALF_CLOSED_BY_CONNECTOR, ChannelState.CLOSED),
    ]


def test_offer_event_precedes_nothing_for_detached_connector(world: World) -> None:
    # A connector that detaches mid-connect: the acceptor's offer is withdrawn.
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, events = world.core.connect(guest, PARENT, SVC, 0)
    assert world.one(events, ConnectionOffered).channel_id == cid
    events = world.core.detach(guest, 0.5)
    assert world.one(events, ChannelRescinded).partition == HOST_VM_ID
    assert world.of_type(events, ConnectFailed) == []  # no session to tell
