"""Partitions, tokens and sessions."""

from __future__ import annotations

import hashlib
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
    AddressNotAvailable,
    AlreadyExists,
    BadAddress,
    ChannelRescinded,
    ConnectionOffered,
    HostConfig,
    HostCore,
    InvalidArgument,
    InvalidState,
    NotFound,
    PartitionChanged,
    PartitionNotRunning,
    PartitionResumed,
    PartitionStalled,
    PartitionState,
    PermissionDenied,
    Personality,
    SessionChanged,
    SessionEnded,
    Unauthenticated,
    hash_token,
    service_id_for_port,
)

if TYPE_CHECKING:
    from .conftest import World

HOST_TOKEN = "host-secret"  # as in conftest

pytestmark = pytest.mark.unit
SVC = service_id_for_port(5000)
VM_ID = "11111111-2222-4333-8444-555555555555"


def test_host_partition_exists_and_is_windows(world: World) -> None:
    host = world.core.get_partition(HOST_VM_ID)
    assert HOST_VM_ID == PARENT == world.core.host_vm_id
    assert host.is_host and host.name == "host" and host.attached
    assert host.personality is Personality.WINDOWS and host.state is PartitionState.RUNNING
    assert host.token_sha256 == hashlib.sha256(HOST_TOKEN.encode()).hexdigest()
    assert world.host.is_host


def test_create_with_and_without_vm_id(world: World) -> None:
    info, token, events = world.core.create_partition(
        "web", 1.0, vm_id="{" + VM_ID.upper() + "}", personality="windows"
    )
    assert info.vm_id == VM_ID and info.name == "web" and info.personality is Personality.WINDOWS
    assert info.state is PartitionState.RUNNING and not info.attached and info.created_at == 1.0
    assert token == "token-1" and info.token_sha256 == hash_token(token)
    world.one(events, PartitionChanged, vm_id=VM_ID, change="created")
    auto, _, _ = world.core.create_partition("db", 2.0)
    assert auto.vm_id == "10000001-0000-4000-8000-000000000000"  # from the guid factory
    assert auto.personality is Personality.LINUX
    assert [p.vm_id for p in world.core.list_partitions()] == [HOST_VM_ID, VM_ID, auto.vm_id]
    assert world.core.get_partition(VM_ID.upper()) == world.core.list_partitions()[1]


def test_duplicate_vm_id_is_already_exists(world: World) -> None:
    world.core.create_partition("a", 0, vm_id=VM_ID)
    with pytest.raises(AlreadyExists, match=VM_ID) as info:
        world.core.create_partition("b", 0, vm_id=VM_ID.upper())
    assert info.value.status == "ALREADY_EXISTS"


@pytest.mark.parametrize("vm_id", [WILDCARD, CHILDREN, LOOPBACK, PARENT, BROADCAST, SILOHOST])
def test_well_known_ids_cannot_be_vm_ids(world: World, vm_id: str) -> None:
    with pytest.raises(BadAddress, match="well-known"):
        world.core.create_partition("x", 0, vm_id=vm_id)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": ""}, InvalidArgument, "non-empty"),
        ({"name": "x" * 65}, InvalidArgument, "at most 64"),
        ({"name": "ok", "personality": "beos"}, InvalidArgument, "linux' or 'windows"),
        ({"name": "ok", "vm_id": "nope"}, BadAddress, "VM id"),
    ],
)
def test_create_validation(world: World, kwargs: dict[str, str], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        world.core.create_partition(now=0, **kwargs)  # type: ignore[arg-type]


def test_guid_factory_exhaustion_is_address_not_available() -> None:
    core = HostCore(host_token="t", token_factory=lambda: "x", guid_factory=lambda: VM_ID)
    core.create_partition("first", 0)
    with pytest.raises(AddressNotAvailable):
        core.create_partition("second", 0)


def test_unknown_partition_is_not_found(world: World) -> None:
    for call in (
        lambda: world.core.get_partition(VM_ID),
        lambda: world.core.attach(VM_ID, "t", 0),
        lambda: world.core.pause_partition(VM_ID, 0),
        lambda: world.core.delete_partition(VM_ID, 0),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.status == "NOT_FOUND"


def test_tokens(world: World) -> None:
    vm, _ = world.vm("a", attach=False)
    with pytest.raises(Unauthenticated, match="required") as info:
        world.core.attach(vm, None, 0)
    assert info.value.status == "UNAUTHENTICATED"
    with pytest.raises(Unauthenticated, match="required"):
        world.core.attach(vm, "", 0)
    with pytest.raises(Unauthenticated, match="wrong token"):
        world.core.attach(vm, "token-999", 0)
    with pytest.raises(Unauthenticated, match="wrong token"):
        world.core.attach(HOST_VM_ID, world.tokens[vm], 0)  # a VM token is not the host's
    session, events = world.core.attach(vm, world.tokens[vm], 0)
    assert session.vm_id == vm and not session.is_host
    world.one(events, PartitionChanged, change="attached")


def test_a_second_attach_opens_a_second_session(world: World) -> None:
    vm, first = world.vm("a")
    assert first is not None
    second, events = world.core.attach(vm, world.tokens[vm], 1.0)
    assert second.vm_id == vm and second.session_id != first.session_id
    # The partition was attached already: only the session is new.
    assert world.of_type(events, PartitionChanged) == []
    opened = world.one(events, SessionChanged, change="opened")
    assert (opened.vm_id, opened.session_id, opened.sessions) == (vm, second.session_id, 2)
    info = world.core.get_partition(vm)
    assert info.attached and info.sessions == 2
    host_again, _ = world.core.attach(HOST_VM_ID, HOST_TOKEN, 1.0)
    assert host_again.is_host and host_again.session_id != world.host.session_id
    assert world.core.get_partition(HOST_VM_ID).sessions == 2


def test_stale_session_is_unauthenticated(world: World) -> None:
    vm, session = world.vm("a")
    assert session is not None
    world.core.detach(session, 1.0)
    with pytest.raises(Unauthenticated, match="no longer attached"):
        world.core.listen(session, WILDCARD, SVC, 1.0)
    again, _ = world.core.attach(vm, world.tokens[vm], 2.0)
    assert again.session_id != session.session_id
    with pytest.raises(Unauthenticated):
        world.core.detach(session, 2.0)  # the old session cannot end the new one


def test_detach_rescinds_channels_and_drops_listeners(world: World) -> None:
    guest = world.guest("a")
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    world.core.accept(world.host, cid, 0)
    world.core.listen(guest, WILDCARD, SVC, 0)
    events = world.core.detach(guest, 1.0, reason="stream ended")
    rescinded = world.one(events, ChannelRescinded, channel_id=cid)
    assert rescinded.partition == HOST_VM_ID  # only the peer is told; the VM has no session
    assert world.addressed(events, guest.vm_id) == []
    assert world.core.list_channels() == []
    assert world.core.list_listeners(guest.vm_id) == []
    assert world.core.get_partition(guest.vm_id).sockets == 0


def test_pause_stalls_and_resume_resumes(world: World) -> None:
    guest = world.guest("a")
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    world.core.accept(world.host, cid, 0)
    events = world.core.pause_partition(guest.vm_id, 1.0)
    assert world.one(events, PartitionStalled).channel_ids == (cid,)
    assert world.core.get_partition(guest.vm_id).state is PartitionState.PAUSED
    with pytest.raises(PartitionNotRunning) as info:
        world.core.connect(guest, PARENT, SVC, 1.0)
    assert info.value.errno == 100  # ENETDOWN
    with pytest.raises(InvalidState, match="not running"):
        world.core.pause_partition(guest.vm_id, 1.0)
    events = world.core.resume_partition(guest.vm_id, 2.0)
    assert world.one(events, PartitionResumed).channel_ids == (cid,)
    with pytest.raises(InvalidState, match="not paused"):
        world.core.resume_partition(guest.vm_id, 2.0)
    assert world.core.get_channel(cid).state.value == "open"  # a pause keeps channels


def test_connects_to_a_paused_vm_go_unanswered(world: World) -> None:
    guest = world.guest("a")
    world.core.listen(guest, WILDCARD, SVC, 0)
    world.core.pause_partition(guest.vm_id, 0)
    _cid, events = world.core.connect(world.host, guest.vm_id, SVC, 0)
    assert world.of_type(events, ConnectionOffered) == []
    assert world.core.next_deadline() == 2.0


def test_stop_ends_session_and_rescinds(world: World) -> None:
    guest = world.guest("a")
    world.core.listen(world.host, CHILDREN, SVC, 0)
    cid, _ = world.core.connect(guest, PARENT, SVC, 0)
    world.core.accept(world.host, cid, 0)
    events = world.core.stop_partition(guest.vm_id, 3.0)
    ended = world.one(events, SessionEnded)
    assert ended.partition == guest.vm_id and ended.session_id == guest.session_id
    world.one(events, ChannelRescinded, partition=HOST_VM_ID, channel_id=cid)
    assert world.core.get_partition(guest.vm_id).state is PartitionState.OFF
    assert not world.core.get_partition(guest.vm_id).attached
    with pytest.raises(PartitionNotRunning, match="off"):
        world.core.attach(guest.vm_id, world.tokens[guest.vm_id], 4.0)
    with pytest.raises(InvalidState, match="already off"):
        world.core.stop_partition(guest.vm_id, 4.0)
    with pytest.raises(InvalidState, match="host partition cannot be started"):
        world.core.start_partition(HOST_VM_ID, 4.0)
    world.core.start_partition(guest.vm_id, 5.0)
    with pytest.raises(InvalidState, match="not off"):
        world.core.start_partition(guest.vm_id, 5.0)
    world.core.attach(guest.vm_id, world.tokens[guest.vm_id], 5.0)


def test_delete_forgets_the_vm(world: World) -> None:
    guest = world.guest("a")
    events = world.core.delete_partition(guest.vm_id, 1.0)
    world.one(events, SessionEnded, partition=guest.vm_id)
    assert world.one(events, PartitionChanged, change="deleted").state is None
    with pytest.raises(NotFound):
        world.core.get_partition(guest.vm_id)
    # The id is free again.
    world.core.create_partition("again", 2.0, vm_id=guest.vm_id)


@pytest.mark.parametrize(
    "action", ["pause_partition", "resume_partition", "stop_partition", "delete_partition"]
)
def test_host_partition_cannot_be_managed(world: World, action: str) -> None:
    with pytest.raises(InvalidState, match="host partition"):
        getattr(world.core, action)(HOST_VM_ID, 0)


def test_restore_partition(world: World) -> None:
    digest = hash_token("persisted")
    info = world.core.restore_partition(
        vm_id=VM_ID,
        name="old",
        personality="windows",
        token_sha256=digest.upper(),
        state="paused",
        created_at=-5.0,
    )
    assert info.state is PartitionState.PAUSED and info.token_sha256 == digest
    session, _ = world.core.attach(VM_ID, "persisted", 0)
    assert session.personality is Personality.WINDOWS
    with pytest.raises(AlreadyExists):
        world.core.restore_partition(
            vm_id=VM_ID,
            name="old",
            personality="linux",
            token_sha256=digest,
            state="off",
            created_at=0,
        )
    with pytest.raises(InvalidArgument, match="sha256"):
        world.core.restore_partition(
            vm_id="21111111-2222-4333-8444-555555555555",
            name="x",
            personality="linux",
            token_sha256="z" * 64,
            state="off",
            created_at=0,
        )
    with pytest.raises(InvalidArgument, match="state"):
        world.core.restore_partition(
            vm_id="21111111-2222-4333-8444-555555555555",
            name="x",
            personality="linux",
            token_sha256=digest,
            state="exploded",
            created_at=0,
        )


def test_attach_new_needs_the_policy(world: World, make: Callable[..., World]) -> None:
    with pytest.raises(PermissionDenied, match="auto_create_on_attach"):
        world.core.attach_new(0)
    auto = make(auto_create_on_attach=True)
    session, token, events = auto.core.attach_new(1.0, personality="windows")
    assert session.personality is Personality.WINDOWS
    info = auto.core.get_partition(session.vm_id)
    assert info.attached and info.name == f"vm-{session.vm_id[:8]}"
    assert info.token_sha256 == hash_token(token)
    assert [e.change for e in auto.of_type(events, PartitionChanged)] == ["created", "attached"]


def test_host_token_is_required() -> None:
    with pytest.raises(InvalidArgument, match="token"):
        HostCore(config=HostConfig(), host_token="", token_factory=str, guid_factory=str)
