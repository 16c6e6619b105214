"""Bounded creation: max_partitions, partition names (rules, uniqueness) and the take-over of
an idle auto-created VM by name (issue 16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from host_service.core import (
    HOST_VM_ID,
    AlreadyExists,
    InvalidArgument,
    NoBuffers,
    PartitionChanged,
    PartitionNotRunning,
    PartitionState,
    Personality,
    TooManyPartitions,
    Unauthenticated,
    hash_token,
)
from host_service.core.host import MAX_NAME_LENGTH

if TYPE_CHECKING:
    from .conftest import World

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name",
    ["a", "vm1", "vm-linux-4d4395edfb09", "Web.01_test-x", "9", "x" * MAX_NAME_LENGTH],
)
def test_good_names(world: World, name: str) -> None:
    info, _, _ = world.core.create_partition(name, 0.0)
    assert info.name == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "non-empty"),
        ("x" * (MAX_NAME_LENGTH + 1), "at most 64 characters, got 65"),
        ("x" * 200, "at most 64 characters, got 200"),
        ("-leading", "bad partition name"),
        (".hidden", "bad partition name"),
        ("has space", "bad partition name"),
        ("vm:80", "bad partition name"),
        ("a/b", "bad partition name"),
        ("tab\there", "bad partition name"),
        ("line\n", "bad partition name"),
        ("caf\u00e9", "bad partition name"),
        ("\u0661\u0662", "bad partition name"),  # Arabic-Indic digits are not [0-9]
    ],
)
def test_bad_names(world: World, name: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        world.core.create_partition(name, 0.0)
    assert len(world.core.list_partitions()) == 1  # nothing was created


def test_names_are_unique_ignoring_case(world: World) -> None:
    info, _, _ = world.core.create_partition("web", 0.0)
    for clash in ("web", "WEB", "Web"):
        with pytest.raises(AlreadyExists, match=f"named 'web' already exists \\({info.vm_id}\\)"):
            world.core.create_partition(clash, 1.0)
    # The host partition's name is taken too.
    with pytest.raises(AlreadyExists, match="named 'host'"):
        world.core.create_partition("Host", 1.0)
    # Deleting the VM frees its name.
    world.core.delete_partition(info.vm_id, 2.0)
    again, _, _ = world.core.create_partition("web", 3.0)
    assert again.vm_id != info.vm_id


def test_max_partitions(make: Callable[..., World]) -> None:
    world = make(max_partitions=2)
    first, _, _ = world.core.create_partition("one", 0.0)
    world.core.create_partition("two", 0.0)
    with pytest.raises(TooManyPartitions, match="2 VMs, the max_partitions limit") as info:
        world.core.create_partition("three", 0.0)
    assert isinstance(info.value, NoBuffers) and info.value.status == "RESOURCE_EXHAUSTED"
    # A bad name or a clash is reported as such, not as the limit.
    with pytest.raises(InvalidArgument):
        world.core.create_partition("bad name", 0.0)
    with pytest.raises(AlreadyExists):
        world.core.create_partition("one", 0.0)
    # The host partition is not counted, and a deleted VM makes room.
    assert len(world.core.list_partitions()) == 3
    world.core.delete_partition(first.vm_id, 1.0)
    world.core.create_partition("three", 1.0)


def test_attach_new_is_bounded(make: Callable[..., World]) -> None:
    world = make(auto_create_on_attach=True, max_partitions=3)
    for _ in range(3):
        world.core.attach_new(0.0)
    with pytest.raises(TooManyPartitions, match="max_partitions"):
        world.core.attach_new(0.0)
    with pytest.raises(TooManyPartitions):
        world.core.attach_new(0.0, name="fresh")
    with pytest.raises(InvalidArgument, match="at most 64"):
        world.core.attach_new(0.0, name="n" * 200)
    with pytest.raises(InvalidArgument, match="bad partition name"):
        world.core.attach_new(0.0, name="no spaces")
    assert len(world.core.list_partitions()) == 4


def test_attach_new_default_names_avoid_taken_ones(make: Callable[..., World]) -> None:
    world = make(auto_create_on_attach=True)
    # The next generated id starts 10000002 (conftest's counter; the host took none).
    world.core.create_partition("vm-10000001", 0.0)
    session, _, _ = world.core.attach_new(0.0)
    info = world.core.get_partition(session.vm_id)
    assert info.name == f"vm-{info.vm_id[:8]}" and info.name != "vm-10000001"


def test_attach_new_takes_over_an_idle_auto_created_vm(make: Callable[..., World]) -> None:
    world = make(auto_create_on_attach=True)
    first, token1, _ = world.core.attach_new(0.0, name="vm-web")
    assert world.core.get_partition(first.vm_id).auto_created
    # While a session is attached, the name is taken.
    with pytest.raises(AlreadyExists, match="exists and is attached"):
        world.core.attach_new(1.0, name="vm-web")
    world.core.detach(first, 2.0)
    # Detached: a new anonymous attach with that name is that VM again, with a new token.
    second, token2, events = world.core.attach_new(3.0, name="VM-WEB", personality="windows")
    assert second.vm_id == first.vm_id and token2 != token1
    assert second.personality is Personality.WINDOWS
    info = world.core.get_partition(second.vm_id)
    assert info.name == "vm-web" and info.token_sha256 == hash_token(token2)
    assert info.auto_created
    changes = [e.change for e in world.of_type(events, PartitionChanged)]
    assert changes == ["taken_over", "attached"]
    # The old token no longer works; the new one does.
    with pytest.raises(Unauthenticated):
        world.core.attach(first.vm_id, token1, 4.0)
    world.core.attach(first.vm_id, token2, 4.0)
    assert len(world.core.list_partitions()) == 2


def test_operator_made_vms_are_never_taken_over(make: Callable[..., World]) -> None:
    world = make(auto_create_on_attach=True)
    info, token, _ = world.core.create_partition("db", 0.0)
    with pytest.raises(AlreadyExists, match="not created on attach"):
        world.core.attach_new(1.0, name="db")
    with pytest.raises(AlreadyExists, match="named 'host'"):
        world.core.attach_new(1.0, name="host")
    assert world.core.get_partition(info.vm_id).token_sha256 == hash_token(token)
    assert world.core.get_partition(HOST_VM_ID).is_host


def test_a_stopped_auto_created_vm_is_not_taken_over(make: Callable[..., World]) -> None:
    world = make(auto_create_on_attach=True)
    session, token, _ = world.core.attach_new(0.0, name="off-vm")
    world.core.stop_partition(session.vm_id, 1.0)
    with pytest.raises(PartitionNotRunning, match="off"):
        world.core.attach_new(2.0, name="off-vm")
    # Refused before anything changed: the old token is still the VM's.
    info = world.core.get_partition(session.vm_id)
    assert info.token_sha256 == hash_token(token) and info.state is PartitionState.OFF


def test_restore_keeps_what_was_persisted(make: Callable[..., World]) -> None:
    """A state file from before the name rules loads as it is: long or odd names, duplicate
    names, more VMs than max_partitions; creation is then refused until there is room."""
    world = make(max_partitions=1, auto_create_on_attach=True)
    digest = hash_token("persisted")
    names = ["x" * 200, "my vm", "my vm"]
    for index, name in enumerate(names):
        world.core.restore_partition(
            vm_id=f"2111111{index}-2222-4333-8444-555555555555",
            name=name,
            personality="linux",
            token_sha256=digest,
            state="running",
            created_at=0.0,
            auto_created=index == 2,
        )
    assert [p.name for p in world.core.list_partitions()[1:]] == names
    assert [p.auto_created for p in world.core.list_partitions()[1:]] == [False, False, True]
    with pytest.raises(TooManyPartitions):
        world.core.create_partition("new", 0.0)
    with pytest.raises(InvalidArgument, match="at most 256"):
        world.core.restore_partition(
            vm_id="31111111-2222-4333-8444-555555555555",
            name="x" * 257,
            personality="linux",
            token_sha256=digest,
            state="running",
            created_at=0.0,
        )
