"""Connect routing: guest->host, host->guest, loopback, guest->guest; personalities; timeouts;
ring geometry; the addresses each end sees."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from host_service.core import (
    BROADCAST,
    CHILDREN,
    HOST_VM_ID,
    LOOPBACK,
    PARENT,
    SILOHOST,
    WILDCARD,
    ZERO,
    Address,
    AddressInUse,
    BadAddress,
    ChannelRemoved,
    ChannelState,
    ConnectFailed,
    ConnectionEstablished,
    ConnectionOffered,
    ConnectionRefused,
    ConnectRefused,
    GuestToGuestRefused,
    HostUnreachable,
    InvalidArgument,
    NetworkUnreachable,
    RingGeometry,
    Side,
    service_id_for_port,
)

if TYPE_CHECKING:
    from host_service.core import Session

    from .conftest import World

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)
OTHER_VM = "cccccccc-0000-4000-8000-000000000003"


def offered_to(world: World, events: list, vm_id: str) -> ConnectionOffered | None:  # type: ignore[type-arg]
    found = [e for e in world.of_type(events, ConnectionOffered) if e.partition == vm_id]
    return found[0] if found else None


# --- guest -> host ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [PARENT, ZERO, PARENT.upper(), "{" + PARENT + "}"])
def test_guest_reaches_host_via_parent_or_zero(world: World, target: str) -> None:
    world.core.listen(world.host, CHILDREN, SVC, 0)
    guest = world.guest()
    cid, events = world.core.connect(guest, target, SVC, 0.5)
    offer = offered_to(world, events, HOST_VM_ID)
    assert offer is not None and offer.channel_id == cid and offer.listener_id == 1
    # The host sees the listener's address locally and the VM's id and auto-bound port remotely.
    assert offer.local == Address(CHILDREN, SVC)
    assert offer.remote == Address(guest.vm_id, service_id_for_port(1024))
    assert world.core.get_channel(cid).state is ChannelState.OFFERED


@pytest.mark.parametrize("scope_of", ["wildcard", "children", "vm"])
def test_host_listener_scopes_hear_the_right_vms(world: World, scope_of: str) -> None:
    a, b = world.guest("a"), world.guest("b")
    scope = {"wildcard": WILDCARD, "children": CHILDREN, "vm": a.vm_id}[scope_of]
    world.core.listen(world.host, scope, SVC, 0)
    _, events = world.core.connect(a, PARENT, SVC, 0)
    assert offered_to(world, events, HOST_VM_ID) is not None
    _, events = world.core.connect(b, PARENT, SVC, 0)
    assert (offered_to(world, events, HOST_VM_ID) is not None) == (scope_of != "vm")


def test_specific_vm_listener_takes_precedence(world: World) -> None:
    a, b = world.guest("a"), world.guest("b")
    world.core.listen(world.host, a.vm_id, SVC, 0)
    world.core.listen(world.host, b.vm_id, SVC, 0)
    _, events = world.core.connect(b, PARENT, SVC, 0)
    offer = offered_to(world, events, HOST_VM_ID)
    assert offer is not None and offer.listener_id == 2 and offer.local.vm_id == b.vm_id


def test_linux_style_and_windows_style_clients_meet(world: World) -> None:
    # A vsock-port client (CID 2 -> PARENT, port 5000) and a GUID client reach one listener.
    world.core.listen(world.host, WILDCARD, service_id_for_port(5000).upper(), 0)
    linux, windows = world.guest("l"), world.guest("w", personality="windows")
    for session, service in ((linux, service_id_for_port(5000)), (windows, SVC.upper())):
        _, events = world.core.connect(session, PARENT, service, 0)
        assert offered_to(world, events, HOST_VM_ID) is not None


# --- personalities: nobody listening ---------------------------------------------------------


def test_linux_guest_to_missing_service_times_out(world: World) -> None:
    guest = world.guest()
    cid, events = world.core.connect(guest, PARENT, SVC, 10.0)
    assert world.kinds(events) == ["ChannelStateChanged"]
    assert world.core.next_deadline() == 12.0  # default connect timeout 2 s
    assert world.core.on_timer(11.999) == []
    events = world.core.on_timer(12.0)
    failed = world.one(events, ConnectFailed, partition=guest.vm_id, channel_id=cid)
    assert (failed.errno, failed.status) == (110, "DEADLINE_EXCEEDED")  # ETIMEDOUT
    assert world.one(events, ChannelRemoved).final_state is ChannelState.CLOSED
    assert world.core.list_channels() == [] and world.core.next_deadline() is None
    assert world.core.get_partition(guest.vm_id).sockets == 0


def test_linux_guest_timeout_ignores_a_late_listener(world: World) -> None:
    # The refusal was already sent (and ignored); a listener appearing later does not help
    # this connect -- a new connect succeeds (vsock_test #30).
    guest = world.guest()
    world.core.connect(guest, PARENT, SVC, 0)
    world.core.listen(world.host, CHILDREN, SVC, 1)
    world.one(world.core.on_timer(2.0), ConnectFailed)
    _, events = world.core.connect(guest, PARENT, SVC, 2.0)
    assert offered_to(world, events, HOST_VM_ID) is not None


@pytest.mark.parametrize("session_of", ["windows", "host-loopback", "windows-loopback"])
def test_windows_and_host_are_refused_at_once(world: World, session_of: str) -> None:
    session: Session = (
        world.host if session_of == "host-loopback" else world.guest(personality="windows")
    )
    target = PARENT if session_of == "windows" else LOOPBACK
    with pytest.raises(ConnectionRefused, match="nothing listens") as info:
        world.core.connect(session, target, SVC, 0)
    assert (info.value.errno, info.value.status) == (111, "UNAVAILABLE")
    refused = world.one(info.value.events, ConnectRefused)
    assert refused.connector == session.vm_id and refused.errno == 111
    assert world.core.list_channels() == [] and world.core.next_deadline() is None
    assert world.core.events_since(0)[-1] == refused


def test_windows_guest_refused_when_backlog_full(world: World) -> None:
    world.core.listen(world.host, CHILDREN, SVC, 0, backlog=1)
    guest = world.guest(personality="windows")
    world.core.connect(guest, PARENT, SVC, 0)
    with pytest.raises(ConnectionRefused):
        world.core.connect(guest, PARENT, SVC, 0)


def test_linux_loopback_without_listener_times_out(world: World) -> None:
    guest = world.guest()
    world.core.connect(guest, LOOPBACK, SVC, 0)
    assert world.one(world.core.on_timer(2.0), ConnectFailed).errno == 110


@pytest.mark.parametrize("personality", ["linux", "windows"])
def test_host_to_guest_without_listener_times_out(world: World, personality: str) -> None:
    # The guest ignores offers it cannot take, whatever its personality.
    guest = world.guest(personality=personality)
    cid, _ = world.core.connect(world.host, guest.vm_id, SVC, 0, timeout_ms=30_000)
    assert world.core.next_deadline() == 30.0
    failed = world.one(world.core.on_timer(30.0), ConnectFailed)
    assert failed.partition == HOST_VM_ID and failed.channel_id == cid and failed.errno == 110


def test_host_to_unattached_vm_times_out(world: World) -> None:
    vm, _ = world.vm("quiet", attach=False)
    world.core.connect(world.host, vm, SVC, 0)
    world.one(world.core.on_timer(2.0), ConnectFailed)


# --- connect timeout values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout_ms", "deadline"), [(None, 2.0), (0, 2.0), (1, 0.001), (300_000, 300.0)]
)
def test_connect_timeout_values(world: World, timeout_ms: int | None, deadline: float) -> None:
    world.core.connect(world.guest(), PARENT, SVC, 0, timeout_ms=timeout_ms)
    assert world.core.next_deadline() == pytest.approx(deadline)


@pytest.mark.parametrize("timeout_ms", [-1, 300_001, True, 2.5])
def test_connect_timeout_out_of_range(world: World, timeout_ms: object) -> None:
    with pytest.raises(InvalidArgument, match="300000"):
        world.core.connect(world.guest(), PARENT, SVC, 0, timeout_ms=timeout_ms)  # type: ignore[arg-type]


def test_configured_default_timeout(make: Callable[..., World]) -> None:
    world = make(connect_timeout=5.0)
    world.core.connect(world.guest(), PARENT, SVC, 1.0)
    assert world.core.next_deadline() == 6.0


# --- host -> guest ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [WILDCARD, PARENT])
def test_host_reaches_guest_listener(world: World, scope: str) -> None:
    guest = world.guest()
    world.core.listen(guest, scope, SVC, 0)
    cid, events = world.core.connect(world.host, guest.vm_id.upper(), SVC, 0)
    offer = offered_to(world, events, guest.vm_id)
    assert offer is not None
    assert offer.local == Address(scope, SVC)
    # The guest sees the host as PARENT and a fresh endpoint GUID as its service.
    assert offer.remote.vm_id == PARENT
    host_local = world.core.get_channel(cid).connector.local
    assert host_local.vm_id == CHILDREN and offer.remote.service_id == host_local.service_id


def test_guest_loopback_listener_does_not_hear_the_host(world: World) -> None:
    guest = world.guest()
    world.core.listen(guest, LOOPBACK, SVC, 0)
    _, events = world.core.connect(world.host, guest.vm_id, SVC, 0)
    assert offered_to(world, events, guest.vm_id) is None


def test_host_connect_errors(world: World) -> None:
    with pytest.raises(HostUnreachable, match="no VM") as info:
        world.core.connect(world.host, OTHER_VM, SVC, 0)
    assert (info.value.errno, info.value.status) == (113, "NOT_FOUND")
    vm, _ = world.vm("off", attach=False)
    world.core.stop_partition(vm, 0)
    with pytest.raises(HostUnreachable, match="off"):
        world.core.connect(world.host, vm, SVC, 0)
    with pytest.raises(NetworkUnreachable, match="no parent"):
        world.core.connect(world.host, PARENT, SVC, 0)
    with pytest.raises(BadAddress, match="wildcard"):
        world.core.connect(world.host, WILDCARD, SVC, 0)
    for reserved in (CHILDREN, BROADCAST, SILOHOST):
        with pytest.raises(NetworkUnreachable, match="not a connect target"):
            world.core.connect(world.host, reserved, SVC, 0)
    with pytest.raises(BadAddress, match="service id"):
        world.core.connect(world.host, vm, "svc", 0)


# --- loopback --------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [WILDCARD, LOOPBACK])
def test_host_loopback(world: World, scope: str) -> None:
    world.core.listen(world.host, scope, SVC, 0)
    cid, events = world.core.connect(world.host, LOOPBACK, SVC, 0)
    offer = offered_to(world, events, HOST_VM_ID)
    assert offer is not None and offer.remote.vm_id == LOOPBACK  # as go-winio observed
    events = world.core.accept(world.host, cid, 0)
    sides = {e.side for e in world.of_type(events, ConnectionEstablished)}
    assert sides == {Side.CONNECTOR, Side.ACCEPTOR}
    assert world.core.get_partition(HOST_VM_ID).sockets == 3  # listener + two ends


def test_host_children_listener_does_not_hear_loopback(world: World) -> None:
    world.core.listen(world.host, CHILDREN, SVC, 0)
    with pytest.raises(ConnectionRefused):
        world.core.connect(world.host, LOOPBACK, SVC, 0)


@pytest.mark.parametrize("target_of", ["loopback", "own-id"])
def test_guest_loopback(world: World, target_of: str) -> None:
    guest = world.guest()
    world.core.listen(guest, LOOPBACK, SVC, 0)
    target = LOOPBACK if target_of == "loopback" else guest.vm_id
    _, events = world.core.connect(guest, target, SVC, 0)
    offer = offered_to(world, events, guest.vm_id)
    assert offer is not None and offer.remote.vm_id == LOOPBACK


def test_guest_parent_listener_does_not_hear_loopback(world: World) -> None:
    guest = world.guest()
    world.core.listen(guest, PARENT, SVC, 0)
    _, events = world.core.connect(guest, LOOPBACK, SVC, 0)
    assert offered_to(world, events, guest.vm_id) is None


# --- guest -> guest --------------------------------------------------------------------------


def test_guest_to_guest_refused_by_default(world: World) -> None:
    a, b = world.guest("a"), world.guest("b")
    world.core.listen(b, WILDCARD, SVC, 0)
    with pytest.raises(GuestToGuestRefused, match="allow-guest-to-guest") as info:
        world.core.connect(a, b.vm_id, SVC, 0)
    assert (info.value.errno, info.value.status) == (101, "PERMISSION_DENIED")
    with pytest.raises(GuestToGuestRefused):
        world.core.connect(a, OTHER_VM, SVC, 0)  # even unknown ids: no existence oracle


def test_guest_to_guest_when_allowed(make: Callable[..., World]) -> None:
    world = make(allow_guest_to_guest=True)
    a, b = world.guest("a"), world.guest("b", personality="windows")
    world.core.listen(b, WILDCARD, SVC, 0)
    cid, events = world.core.connect(a, b.vm_id, SVC, 0)
    offer = offered_to(world, events, b.vm_id)
    assert offer is not None and offer.remote.vm_id == a.vm_id
    events = world.core.accept(b, cid, 0)
    assert len(world.of_type(events, ConnectionEstablished)) == 2
    # A PARENT-only listener does not hear siblings; nor does an unknown VM exist.
    world.core.listen(b, PARENT, service_id_for_port(6000), 0)
    _, events = world.core.connect(a, b.vm_id, service_id_for_port(6000), 0)
    assert offered_to(world, events, b.vm_id) is None
    with pytest.raises(HostUnreachable):
        world.core.connect(a, OTHER_VM, SVC, 0)
    # A sibling never answers a refusal: a windows connector still times out.
    world.core.connect(b, a.vm_id, SVC, 0)


# --- local addresses -------------------------------------------------------------------------


def test_linux_ephemeral_ports_count_up_and_skip_used(world: World) -> None:
    guest = world.guest()
    world.core.listen(guest, WILDCARD, service_id_for_port(1025), 0)
    ids = [world.core.connect(guest, PARENT, SVC, 0)[0] for _ in range(2)]
    ports = [world.core.get_channel(c).connector.local.service_id for c in ids]
    assert ports == [service_id_for_port(1024), service_id_for_port(1026)]


def test_explicit_local_service_id(world: World) -> None:
    guest = world.guest()
    mine = service_id_for_port(7777)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0, local_service_id=mine.upper())
    assert world.core.get_channel(cid).connector.local == Address(guest.vm_id, mine)
    with pytest.raises(AddressInUse, match="in use"):
        world.core.connect(guest, PARENT, SVC, 0, local_service_id=mine)
    world.core.listen(guest, WILDCARD, service_id_for_port(8888), 0)
    with pytest.raises(AddressInUse):
        world.core.connect(guest, PARENT, SVC, 0, local_service_id=service_id_for_port(8888))
    # Released when the channel is gone (vsock_test #21: bind, connect, close, repeat).
    world.core.close(guest, cid, 0)
    world.core.connect(guest, PARENT, SVC, 0, local_service_id=mine)


def test_windows_guest_gets_guid_endpoint_ids(world: World) -> None:
    guest = world.guest(personality="windows")
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    assert world.core.get_channel(cid).connector.local.service_id.startswith("1000")


# --- ring geometry ---------------------------------------------------------------------------


def test_default_rings_are_the_guests_view(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0)
    world.core.listen(guest, WILDCARD, SVC, 0)
    cid, events = world.core.connect(guest, PARENT, SVC, 0)
    assert world.core.get_channel(cid).ring == RingGeometry(2, 3)  # guest send 2, recv 3
    assert world.one(events, ConnectionOffered).ring == RingGeometry(3, 2)  # host's view
    cid, events = world.core.connect(world.host, guest.vm_id, SVC, 0)
    assert world.core.get_channel(cid).ring == RingGeometry(3, 2)  # host's view
    assert world.one(events, ConnectionOffered).ring == RingGeometry(2, 3)  # guest's view
    events = world.core.accept(guest, cid, 0)
    rings = {e.side: e.ring for e in world.of_type(events, ConnectionEstablished)}
    assert rings == {Side.CONNECTOR: RingGeometry(3, 2), Side.ACCEPTOR: RingGeometry(2, 3)}
    assert RingGeometry(2, 3).send_bytes == 4096 and RingGeometry(2, 3).recv_bytes == 8192


def test_larger_rings_on_request(world: World) -> None:
    guest = world.guest()
    world.core.listen(world.host, CHILDREN, SVC, 0, send_pages=10, recv_pages=4)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0, send_pages=6, recv_pages=500)
    # connector send = max(2, 6, listener recv 4); connector recv = max(3, 500->64, 10)
    assert world.core.get_channel(cid).ring == RingGeometry(6, 64)
    with pytest.raises(InvalidArgument, match="send_pages"):
        world.core.connect(guest, PARENT, SVC, 0, send_pages=0)


def test_configured_ring_defaults(make: Callable[..., World]) -> None:
    world = make(send_ring_page=6, recv_ring_page=6, max_ring_pages=8)
    guest = world.guest()
    cid, _ = world.core.connect(guest, PARENT, SVC, 0, send_pages=64)
    assert world.core.get_channel(cid).ring == RingGeometry(8, 6)
