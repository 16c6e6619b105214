"""Several sessions (attach streams: processes) of one partition at once.

Each session owns the listeners and channel ends it creates or is offered, hears only about
those, and takes only those with it when it ends; addresses and max_socket_number stay per
partition.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from host_service.core import (
    CHILDREN,
    HOST_VM_ID,
    LOOPBACK,
    PARENT,
    WILDCARD,
    AddressInUse,
    ChannelRescinded,
    ChannelState,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    ConnectionRefused,
    ListenerChanged,
    NoBuffers,
    NotFound,
    PartitionChanged,
    PartitionNotRunning,
    PartitionStalled,
    PeerFinReceived,
    PermissionDenied,
    SessionChanged,
    SessionEnded,
    Side,
    TooManySessions,
    Unauthenticated,
    service_id_for_port,
)

if TYPE_CHECKING:
    from host_service.core import Session

    from .conftest import World

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)
SVC2 = service_id_for_port(5001)
HOST_SVC = service_id_for_port(6000)


def two_sessions(world: World, personality: str = "linux") -> tuple[Session, Session]:
    first = world.guest("vm", personality=personality)
    return first, world.session(first.vm_id)


def open_to_host(world: World, session: Session, service: str = HOST_SVC) -> int:
    """``session`` connects to a host listener on ``service`` (made if missing); OPEN."""
    if not any(info.local.service_id == service for info in world.core.list_listeners(HOST_VM_ID)):
        world.core.listen(world.host, CHILDREN, service, world.now)
    cid, _ = world.core.connect(session, PARENT, service, world.now)
    world.core.accept(world.host, cid, world.now)
    return cid


def open_from_host(world: World, session: Session, service: str) -> int:
    """The host connects to ``session``'s listener on ``service``; ``session`` accepts."""
    cid, _ = world.core.connect(world.host, session.vm_id, service, world.now)
    world.core.accept(session, cid, world.now)
    return cid


# --- attaching ---------------------------------------------------------------------------------


def test_sessions_are_counted_and_partition_events_mark_first_and_last(world: World) -> None:
    vm, _ = world.vm("a", attach=False)
    first, events = world.core.attach(vm, world.tokens[vm], 1.0)
    assert [e.change for e in world.of_type(events, PartitionChanged)] == ["attached"]
    assert world.one(events, SessionChanged).sessions == 1
    second = world.session(vm)
    third = world.session(vm)
    info = world.core.get_partition(vm)
    assert (info.attached, info.sessions) == (True, 3)
    assert len({first.session_id, second.session_id, third.session_id}) == 3

    events = world.core.detach(second, 2.0)
    assert world.of_type(events, PartitionChanged) == []
    closed = world.one(events, SessionChanged, change="closed")
    assert (closed.session_id, closed.sessions) == (second.session_id, 2)
    world.core.detach(first, 3.0)
    events = world.core.detach(third, 4.0)
    assert [e.change for e in world.of_type(events, PartitionChanged)] == ["detached"]
    assert world.one(events, SessionChanged).sessions == 0
    info = world.core.get_partition(vm)
    assert (info.attached, info.sessions) == (False, 0)


def test_session_cap(make: Callable[..., World]) -> None:
    world = make(max_sessions_per_partition=2)
    first, second = two_sessions(world)
    with pytest.raises(TooManySessions, match="max_sessions_per_partition") as info:
        world.core.attach(first.vm_id, world.tokens[first.vm_id], 0)
    assert isinstance(info.value, NoBuffers)
    assert (info.value.errno, info.value.status) == (errno.ENOBUFS, "RESOURCE_EXHAUSTED")
    # A wrong token is still told it is wrong, not that the partition is full.
    with pytest.raises(Unauthenticated):
        world.core.attach(first.vm_id, "token-999", 0)
    # The cap is per partition: another VM, and the host, have their own.
    world.guest("other")
    world.session(HOST_VM_ID)
    with pytest.raises(TooManySessions):
        world.session(HOST_VM_ID)
    # The refused attach changed nothing; once a session ends there is room again.
    assert world.core.get_partition(first.vm_id).sessions == 2
    world.core.detach(first, 1.0)
    world.session(second.vm_id)


def test_a_stale_session_of_a_partition_with_others_is_refused(world: World) -> None:
    first, second = two_sessions(world)
    world.core.detach(first, 1.0)
    with pytest.raises(Unauthenticated, match="no longer attached"):
        world.core.listen(first, WILDCARD, SVC, 1.0)
    with pytest.raises(Unauthenticated):
        world.core.detach(first, 1.0)
    world.core.listen(second, WILDCARD, SVC, 1.0)


# --- ownership: who is told what, who may act on what ----------------------------------------


def test_each_session_hears_only_about_its_own_listeners_and_channels(world: World) -> None:
    a, b = two_sessions(world)
    world.core.listen(a, WILDCARD, SVC, 0)
    listener_b, _ = world.core.listen(b, WILDCARD, SVC2, 0)
    assert listener_b.session_id == b.session_id
    assert {(i.session_id, i.local.service_id) for i in world.core.list_listeners(a.vm_id)} == {
        (a.session_id, SVC),
        (b.session_id, SVC2),
    }

    # Offers go to the session that owns the listener.
    cid_a, events = world.core.connect(world.host, a.vm_id, SVC, 0)
    offer = world.one(events, ConnectionOffered)
    assert (offer.partition, offer.session_id) == (a.vm_id, a.session_id)
    cid_b, events = world.core.connect(world.host, b.vm_id, SVC2, 0)
    assert world.one(events, ConnectionOffered).session_id == b.session_id

    # Only the owner may accept, refuse or close; to the sibling the channel does not exist.
    for call in (
        lambda: world.core.accept(b, cid_a, 0),
        lambda: world.core.refuse(b, cid_a, 0),
        lambda: world.core.close(b, cid_a, 0),
        lambda: world.core.shutdown(b, cid_a, 0),
    ):
        with pytest.raises(NotFound, match=f"no channel {cid_a} in session {b.session_id}"):
            call()
    events = world.core.accept(a, cid_a, 0)
    opened = world.one(events, ConnectionEstablished, partition=a.vm_id)
    assert opened.session_id == a.session_id and opened.side is Side.ACCEPTOR
    assert world.to_session(events, b) == []
    world.core.accept(b, cid_b, 0)

    # Channel notices go to the session holding that end.
    events = world.core.shutdown(world.host, cid_a, 1.0)
    fin = world.one(events, PeerFinReceived)
    assert (fin.partition, fin.session_id) == (a.vm_id, a.session_id)
    events = world.core.rescind(cid_b, 2.0)
    assert [e.session_id for e in world.addressed(events, b.vm_id)] == [b.session_id]
    assert world.of_type(world.to_session(events, b), ChannelRescinded)

    # ... also for channels the session connected.
    cid_out, _ = world.core.connect(b, PARENT, HOST_SVC, 3.0)  # nobody listens: times out
    events = world.core.on_timer(3.0 + 2.0)
    failed = world.one(events, ConnectFailed, channel_id=cid_out)
    assert failed.session_id == b.session_id and world.to_session(events, a) == []

    info = world.core.get_channel(cid_a)
    assert info.acceptor is not None and info.acceptor.session_id == a.session_id
    assert info.connector.session_id == world.host.session_id


def test_listeners_are_closed_only_by_their_session(world: World) -> None:
    a, b = two_sessions(world)
    listener, _ = world.core.listen(a, WILDCARD, SVC, 0)
    with pytest.raises(NotFound, match=f"no listener {listener.listener_id} in session"):
        world.core.unlisten(b, listener.listener_id, 0)
    assert world.core.list_listeners(a.vm_id) == [listener]
    world.core.unlisten(a, listener.listener_id, 0)
    assert world.core.list_listeners(a.vm_id) == []


# --- one session ending ----------------------------------------------------------------------


def test_detach_of_one_session_leaves_the_others_channels_and_listeners(world: World) -> None:
    a, b = two_sessions(world)
    world.core.listen(a, WILDCARD, SVC, 0)
    world.core.listen(b, WILDCARD, SVC2, 0)
    a_in = open_from_host(world, a, SVC)
    b_in = open_from_host(world, b, SVC2)
    a_out = open_to_host(world, a)
    b_out = open_to_host(world, b)
    b_pending, _ = world.core.connect(b, PARENT, service_id_for_port(7), 0)  # unanswered

    events = world.core.detach(a, 1.0, reason="stream ended")

    # a's channels are rescinded towards the host only; a's listener is closed.
    rescinded = {(e.partition, e.channel_id) for e in world.of_type(events, ChannelRescinded)}
    assert rescinded == {(HOST_VM_ID, a_in), (HOST_VM_ID, a_out)}
    closed = world.one(events, ListenerChanged, change="closed")
    assert closed.local.service_id == SVC
    # b is not told anything, and keeps everything.
    assert world.addressed(events, b.vm_id) == []
    assert sorted(c.channel_id for c in world.core.list_channels(b.vm_id)) == sorted(
        [b_in, b_out, b_pending]
    )
    assert world.core.get_channel(b_in).state is ChannelState.OPEN
    assert [i.session_id for i in world.core.list_listeners(b.vm_id)] == [b.session_id]
    info = world.core.get_partition(b.vm_id)
    assert (info.attached, info.sessions, info.sockets) == (True, 1, 4)
    # b goes on working: its listener still hears, its channels still carry FINs.
    _, events = world.core.connect(world.host, b.vm_id, SVC2, 2.0)
    assert world.one(events, ConnectionOffered).session_id == b.session_id
    events = world.core.shutdown(world.host, b_in, 2.0)
    assert world.one(events, PeerFinReceived).session_id == b.session_id
    # a's address is free again, for b too.
    world.core.listen(b, WILDCARD, SVC, 2.0)


def test_detach_withdraws_offers_to_the_sessions_listener_only(world: World) -> None:
    a, b = two_sessions(world, personality="windows")
    world.core.listen(a, WILDCARD, SVC, 0)
    world.core.listen(b, WILDCARD, SVC2, 0)
    to_a, _ = world.core.connect(world.host, a.vm_id, SVC, 0)
    to_b, _ = world.core.connect(world.host, b.vm_id, SVC2, 0)
    events = world.core.detach(a, 1.0)
    failed = world.one(events, ConnectFailed)
    assert (failed.partition, failed.channel_id, failed.errno) == (
        HOST_VM_ID,
        to_a,
        errno.ECONNRESET,
    )
    assert world.core.get_channel(to_b).state is ChannelState.OFFERED
    world.core.accept(b, to_b, 1.0)


# --- per-partition address space and socket count --------------------------------------------


def test_two_sessions_binding_the_same_address_conflict(world: World) -> None:
    a, b = two_sessions(world)
    world.core.listen(a, WILDCARD, SVC, 0)
    for scope in (WILDCARD, PARENT, LOOPBACK):
        with pytest.raises(AddressInUse) as info:
            world.core.listen(b, scope, SVC, 0)
        assert info.value.errno == errno.EADDRINUSE
    # A connecting end's local address is taken for the whole partition too.
    cid, _ = world.core.connect(a, PARENT, HOST_SVC, 0, local_service_id=SVC2)
    with pytest.raises(AddressInUse):
        world.core.connect(b, PARENT, HOST_SVC, 0, local_service_id=SVC2)
    with pytest.raises(AddressInUse):
        world.core.listen(b, WILDCARD, SVC2, 0)
    # Host partition sessions share the host's address space the same way.
    host2 = world.session(HOST_VM_ID)
    world.core.listen(world.host, CHILDREN, HOST_SVC, 0)
    with pytest.raises(AddressInUse):
        world.core.listen(host2, WILDCARD, HOST_SVC, 0)
    assert world.core.get_channel(cid).connector.session_id == a.session_id


def test_max_socket_number_counts_all_sessions_of_a_partition(make: Callable[..., World]) -> None:
    world = make(max_socket_number=3)
    a, b = two_sessions(world)
    world.core.listen(a, WILDCARD, SVC, 0)
    world.core.listen(b, WILDCARD, SVC2, 0)
    world.core.connect(a, PARENT, HOST_SVC, 0)
    for call in (
        lambda: world.core.listen(b, WILDCARD, service_id_for_port(9), 0),
        lambda: world.core.connect(b, PARENT, HOST_SVC, 0),
    ):
        with pytest.raises(NoBuffers, match="max_socket_number"):
            call()
    # Another partition has its own count.
    world.core.listen(world.guest("other"), WILDCARD, SVC, 0)
    # A session's sockets leave the count with it.
    world.core.detach(a, 1.0)
    assert world.core.get_partition(b.vm_id).sockets == 1
    world.core.connect(b, PARENT, HOST_SVC, 1.0)


# --- loopback between sessions ---------------------------------------------------------------


@pytest.mark.parametrize("scope", [LOOPBACK, WILDCARD])
def test_loopback_between_two_sessions_of_a_vm(world: World, scope: str) -> None:
    a, b = two_sessions(world)
    world.core.listen(a, scope, SVC, 0)
    cid, events = world.core.connect(b, LOOPBACK, SVC, 0)
    offer = world.one(events, ConnectionOffered)
    assert (offer.partition, offer.session_id) == (a.vm_id, a.session_id)
    assert offer.remote.vm_id == LOOPBACK
    # Each session holds one end, so neither needs to say which side it speaks for.
    events = world.core.accept(a, cid, 0)
    to_b = world.one(events, ConnectionEstablished, session_id=b.session_id)
    to_a = world.one(events, ConnectionEstablished, session_id=a.session_id)
    assert (to_b.side, to_a.side) == (Side.CONNECTOR, Side.ACCEPTOR)
    assert to_a.remote.service_id == to_b.local.service_id
    assert world.core.get_partition(a.vm_id).sockets == 3  # listener + both ends

    events = world.core.shutdown(b, cid, 1.0)
    assert world.one(events, PeerFinReceived).session_id == a.session_id
    with pytest.raises(PermissionDenied, match="not the connector"):
        world.core.close(a, cid, 1.0, side=Side.CONNECTOR)

    # The connector's session ends: only the acceptor's session hears of it.
    events = world.core.detach(b, 2.0)
    rescinded = world.one(events, ChannelRescinded, channel_id=cid)
    assert (rescinded.session_id, rescinded.side) == (a.session_id, Side.ACCEPTOR)
    assert world.core.list_channels(a.vm_id) == []
    assert world.core.get_partition(a.vm_id).sockets == 1


def test_loopback_refusal_between_sessions_is_heard_by_a_windows_vm(world: World) -> None:
    a, b = two_sessions(world, personality="windows")
    listener, _ = world.core.listen(a, LOOPBACK, SVC, 0)
    cid, _ = world.core.connect(b, LOOPBACK, SVC, 0)
    events = world.core.refuse(a, cid, 0)
    failed = world.one(events, ConnectFailed)
    assert (failed.session_id, failed.errno) == (b.session_id, errno.ECONNREFUSED)
    world.core.unlisten(a, listener.listener_id, 0)
    with pytest.raises(ConnectionRefused):
        world.core.connect(b, LOOPBACK, SVC, 0)


# --- the host partition ----------------------------------------------------------------------


def test_host_partition_with_two_sessions(world: World) -> None:
    bridge = world.session(HOST_VM_ID)
    guest = world.guest()
    world.core.listen(guest, WILDCARD, SVC, 0)
    world.core.listen(bridge, CHILDREN, HOST_SVC, 0)
    # A guest's connect is offered to the host session that listens.
    cid_in, events = world.core.connect(guest, PARENT, HOST_SVC, 0)
    assert world.one(events, ConnectionOffered).session_id == bridge.session_id
    world.core.accept(bridge, cid_in, 0)
    # The first host session connects to the guest; the answer goes to it.
    cid_out, _ = world.core.connect(world.host, guest.vm_id, SVC, 0)
    events = world.core.accept(guest, cid_out, 0)
    to_host = world.one(events, ConnectionEstablished, partition=HOST_VM_ID)
    assert to_host.session_id == world.host.session_id
    # The host's two processes can talk over LOOPBACK.
    world.core.listen(world.host, LOOPBACK, SVC2, 0)
    cid_loop, events = world.core.connect(bridge, LOOPBACK, SVC2, 0)
    assert world.one(events, ConnectionOffered).session_id == world.host.session_id
    world.core.accept(world.host, cid_loop, 0)

    events = world.core.detach(bridge, 1.0)
    assert world.of_type(events, PartitionChanged) == []  # the host stays attached
    rescinded = {
        (e.partition, e.session_id, e.channel_id) for e in events if isinstance(e, ChannelRescinded)
    }
    assert rescinded == {
        (guest.vm_id, guest.session_id, cid_in),
        (HOST_VM_ID, world.host.session_id, cid_loop),
    }
    assert world.core.get_channel(cid_out).state is ChannelState.OPEN
    info = world.core.get_partition(HOST_VM_ID)
    assert (info.attached, info.sessions) == (True, 1)


# --- the partition ending, pausing -----------------------------------------------------------


@pytest.mark.parametrize("action", ["stop_partition", "delete_partition"])
def test_stop_or_delete_ends_every_session(world: World, action: str) -> None:
    a, b = two_sessions(world)
    cid_a = open_to_host(world, a)
    cid_b = open_to_host(world, b)
    world.core.listen(b, WILDCARD, SVC, 0)
    events = getattr(world.core, action)(a.vm_id, 3.0)
    ended = world.of_type(events, SessionEnded)
    assert {(e.partition, e.session_id) for e in ended} == {
        (a.vm_id, a.session_id),
        (a.vm_id, b.session_id),
    }
    assert [e.sessions for e in world.of_type(events, SessionChanged)] == [1, 0]
    final = "stopped" if action == "stop_partition" else "deleted"
    assert [e.change for e in world.of_type(events, PartitionChanged)] == ["detached", final]
    # Besides SessionEnded, nothing more is said to the ended sessions; the host hears.
    assert {type(e) for e in world.addressed(events, a.vm_id)} == {SessionEnded}
    assert {e.channel_id for e in world.of_type(events, ChannelRescinded)} == {cid_a, cid_b}
    assert world.core.list_channels() == []
    for session in (a, b):
        with pytest.raises(Unauthenticated):
            world.core.detach(session, 4.0)


def test_pause_stalls_every_sessions_channels(world: World) -> None:
    a, b = two_sessions(world)
    cid_a = open_to_host(world, a)
    cid_b = open_to_host(world, b)
    events = world.core.pause_partition(a.vm_id, 1.0)
    assert world.one(events, PartitionStalled).channel_ids == tuple(sorted((cid_a, cid_b)))
    for session in (a, b):
        with pytest.raises(PartitionNotRunning):
            world.core.connect(session, PARENT, HOST_SVC, 1.0)
    world.core.resume_partition(a.vm_id, 2.0)
    world.core.connect(b, PARENT, HOST_SVC, 2.0)
