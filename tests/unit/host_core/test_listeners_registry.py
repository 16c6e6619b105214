"""Listeners (scopes, EADDRINUSE, backlog, unlisten) and the service registry (strict mode)."""

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
    AddressInUse,
    BadAddress,
    ConnectionOffered,
    InvalidArgument,
    ListenerChanged,
    NotFound,
    ServiceChanged,
    ServiceNotRegistered,
    service_id_for_port,
)

if TYPE_CHECKING:
    from .conftest import World

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)
VM_A = "aaaaaaaa-0000-4000-8000-000000000001"
VM_B = "bbbbbbbb-0000-4000-8000-000000000002"


def test_listen_reports_listener(world: World) -> None:
    info, events = world.core.listen(world.host, "{" + CHILDREN.upper() + "}", SVC.upper(), 1.0)
    assert info.local.vm_id == CHILDREN and info.local.service_id == SVC
    assert info.vm_id == HOST_VM_ID and info.backlog == 128 and info.pending == 0
    listened = world.one(events, ListenerChanged)
    assert listened.change == "listening" and listened.local == info.local
    assert world.core.list_listeners() == [info]
    assert world.core.list_listeners(HOST_VM_ID) == [info]


@pytest.mark.parametrize("scope", [WILDCARD, CHILDREN, LOOPBACK, VM_A])
def test_host_scopes_allowed(world: World, scope: str) -> None:
    world.core.listen(world.host, scope, SVC, 0)


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        (PARENT, "physical host"),
        (BROADCAST, "reserved"),
        (SILOHOST, "reserved"),
        ("junk", "not a valid GUID"),
    ],
)
def test_host_scopes_refused(world: World, scope: str, message: str) -> None:
    with pytest.raises(BadAddress, match=message):
        world.core.listen(world.host, scope, SVC, 0)


@pytest.mark.parametrize("scope", [WILDCARD, PARENT, LOOPBACK])
def test_guest_scopes_allowed(world: World, scope: str) -> None:
    world.core.listen(world.guest(), scope, SVC, 0)


@pytest.mark.parametrize(
    ("scope", "message"),
    [(CHILDREN, "no child"), (BROADCAST, "reserved"), (VM_A, "WILDCARD, PARENT or LOOPBACK")],
)
def test_guest_scopes_refused(world: World, scope: str, message: str) -> None:
    with pytest.raises(BadAddress, match=message):
        world.core.listen(world.guest(), scope, SVC, 0)


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        (WILDCARD, WILDCARD, True),
        (WILDCARD, CHILDREN, True),
        (CHILDREN, VM_A, True),
        (VM_A, WILDCARD, True),
        (VM_A, VM_A, True),
        (VM_A, VM_B, False),
        (CHILDREN, LOOPBACK, False),
        (LOOPBACK, VM_A, False),
        (LOOPBACK, WILDCARD, True),
    ],
)
def test_host_duplicate_binds(world: World, first: str, second: str, conflict: bool) -> None:
    world.core.listen(world.host, first, SVC, 0)
    if conflict:
        with pytest.raises(AddressInUse, match="overlaps listener 1") as info:
            world.core.listen(world.host, second, SVC, 0)
        assert info.value.errno == 98 and info.value.status == "ALREADY_EXISTS"
    else:
        world.core.listen(world.host, second, SVC, 0)


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [(WILDCARD, PARENT, True), (PARENT, PARENT, True), (PARENT, LOOPBACK, False)],
)
def test_guest_duplicate_binds(world: World, first: str, second: str, conflict: bool) -> None:
    guest = world.guest()
    world.core.listen(guest, first, SVC, 0)
    if conflict:
        with pytest.raises(AddressInUse):
            world.core.listen(guest, second, SVC, 0)
    else:
        world.core.listen(guest, second, SVC, 0)


def test_same_address_in_different_partitions_and_services_is_fine(world: World) -> None:
    a, b = world.guest("a"), world.guest("b")
    world.core.listen(a, WILDCARD, SVC, 0)
    world.core.listen(b, WILDCARD, SVC, 0)
    world.core.listen(a, WILDCARD, service_id_for_port(5001), 0)
    world.core.listen(world.host, WILDCARD, SVC, 0)


def test_listen_on_a_connecting_ends_local_address_is_in_use(world: World) -> None:
    guest = world.guest()
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    local = world.core.get_channel(cid).connector.local.service_id
    with pytest.raises(AddressInUse, match=f"local address of channel {cid}"):
        world.core.listen(guest, WILDCARD, local, 0)


@pytest.mark.parametrize(
    ("backlog", "effective"), [(None, 128), (0, 1), (1, 1), (5, 5), (10**9, 65_535)]
)
def test_backlog_values(world: World, backlog: int | None, effective: int) -> None:
    info, _ = world.core.listen(world.host, WILDCARD, SVC, 0, backlog=backlog)
    assert info.backlog == effective


@pytest.mark.parametrize("backlog", [-1, True, "3", 1.5])
def test_bad_backlog(world: World, backlog: object) -> None:
    with pytest.raises(InvalidArgument, match="backlog"):
        world.core.listen(world.host, WILDCARD, SVC, 0, backlog=backlog)  # type: ignore[arg-type]


def test_backlog_bounds_pending_offers(world: World) -> None:
    guest = world.guest()
    _info, _ = world.core.listen(guest, WILDCARD, SVC, 0, backlog=2)
    offered = []
    for _ in range(3):
        _cid, events = world.core.connect(world.host, guest.vm_id, SVC, 0)
        offered.append(bool(world.of_type(events, ConnectionOffered)))
    assert offered == [True, True, False]  # the third is ignored, as a full Linux backlog
    assert world.core.list_listeners(guest.vm_id)[0].pending == 2
    world.core.accept(guest, 1, 0.5)
    assert world.core.list_listeners(guest.vm_id)[0].pending == 1
    _, events = world.core.connect(world.host, guest.vm_id, SVC, 0.5)
    assert world.of_type(events, ConnectionOffered)


def test_unlisten(world: World) -> None:
    info, _ = world.core.listen(world.host, WILDCARD, SVC, 0)
    events = world.core.unlisten(world.host, info.listener_id, 1.0)
    closed = world.one(events, ListenerChanged)
    assert closed.change == "closed" and closed.reason == "unlisten"
    assert world.core.list_listeners() == []
    with pytest.raises(NotFound, match="no listener"):
        world.core.unlisten(world.host, info.listener_id, 1.0)
    world.core.listen(world.host, WILDCARD, SVC, 1.0)  # the address is free again


def test_a_partition_cannot_unlisten_anothers_listener(world: World) -> None:
    info, _ = world.core.listen(world.host, WILDCARD, SVC, 0)
    with pytest.raises(NotFound):
        world.core.unlisten(world.guest(), info.listener_id, 0)


def test_listen_ring_requests(world: World) -> None:
    info, _ = world.core.listen(world.host, WILDCARD, SVC, 0, send_pages=8, recv_pages=200)
    assert (info.send_pages, info.recv_pages) == (8, 64)
    for bad in (0, -3, True, 2.0):
        with pytest.raises(InvalidArgument, match="pages"):
            world.core.listen(world.host, VM_A, SVC, 0, send_pages=bad)  # type: ignore[arg-type]


# --- registry ------------------------------------------------------------------------------


def test_register_list_unregister(world: World) -> None:
    registration, events = world.core.register_service(SVC.upper(), "Echo", 1.0)
    assert registration.service_id == SVC and registration.element_name == "Echo"
    assert world.one(events, ServiceChanged).change == "registered"
    updated, events = world.core.register_service(SVC, "Echo v2", 2.0)
    assert updated.registered_at == 1.0 and updated.element_name == "Echo v2"
    assert world.one(events, ServiceChanged).change == "updated"
    other = service_id_for_port(1)
    world.core.register_service(other, "One", 3.0)
    assert [r.service_id for r in world.core.list_services()] == [other, SVC]
    assert world.core.get_service(SVC) == updated
    events = world.core.unregister_service(SVC, 4.0)
    assert world.one(events, ServiceChanged).change == "unregistered"
    with pytest.raises(NotFound, match="not registered"):
        world.core.unregister_service(SVC, 5.0)
    with pytest.raises(NotFound):
        world.core.get_service(SVC)


@pytest.mark.parametrize(
    ("service", "name", "error"),
    [("nope", "x", BadAddress), (SVC, "", InvalidArgument), (SVC, "x" * 257, InvalidArgument)],
)
def test_register_validation(world: World, service: str, name: str, error: type) -> None:
    with pytest.raises(error):
        world.core.register_service(service, name, 0)


def test_strict_mode_gates_host_listeners(make: Callable[..., World]) -> None:
    world = make(strict_registry=True)
    with pytest.raises(ServiceNotRegistered, match="not registered") as info:
        world.core.listen(world.host, CHILDREN, SVC, 0)
    assert info.value.status == "PERMISSION_DENIED" and info.value.errno == 13
    # Guests are not gated (the registry is the host's).
    world.core.listen(world.guest(), WILDCARD, SVC, 0)
    world.core.register_service(SVC, "Echo", 0)
    world.core.listen(world.host, CHILDREN, SVC, 0)


def test_strict_mode_unregister_stops_guest_connects(make: Callable[..., World]) -> None:
    world = make(strict_registry=True)
    world.core.register_service(SVC, "Echo", 0)
    world.core.listen(world.host, WILDCARD, SVC, 0)
    guest = world.guest()
    _, events = world.core.connect(guest, PARENT, SVC, 0)
    assert world.of_type(events, ConnectionOffered)
    world.core.unregister_service(SVC, 1)
    _, events = world.core.connect(guest, PARENT, SVC, 1)
    assert not world.of_type(events, ConnectionOffered)  # linux guest: times out later
    # The host's own loopback connect is not a guest connect: not gated.
    _, events = world.core.connect(world.host, LOOPBACK, SVC, 1)
    assert world.of_type(events, ConnectionOffered)


def test_non_strict_mode_needs_no_registration(world: World) -> None:
    world.core.listen(world.host, CHILDREN, SVC, 0)
