"""Tests of the partition and session transition table (host_service/core/lifecycle.py).

As test_channel_table does for channels: every (state, input) pair of both tables is checked on
the machine alone, then through ``HostCore`` -- a VM is driven into each state and given each
input through the public API, and what happens (the new state, or the refusal's error and its
exact message, with nothing changed) must be what the table says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_service.core import (
    HOST_VM_ID,
    WILDCARD,
    HvError,
    InvalidState,
    NotFound,
    PartitionNotRunning,
    PartitionState,
    Session,
    Unauthenticated,
    service_id_for_port,
)
from host_service.core.lifecycle import (
    CHANGE,
    HOST_TRANSITIONS,
    LIFECYCLE_INPUTS,
    SESSION_INPUTS,
    TRANSITIONS,
    PartitionInput,
    PartitionMachine,
    Refusal,
)

if TYPE_CHECKING:
    from .conftest import World

pytestmark = pytest.mark.unit

S = PartitionState
I = PartitionInput  # noqa: E741 - as in the table
ALL_PAIRS = list(itertools.product(PartitionState, PartitionInput))
VM = "11111111-1111-4111-8111-111111111111"


# --- the table alone ---------------------------------------------------------------------------


def test_every_pair_is_listed() -> None:
    assert set(TRANSITIONS) == set(ALL_PAIRS)
    assert set(HOST_TRANSITIONS) == set(PartitionInput)
    assert set(PartitionInput) == LIFECYCLE_INPUTS | SESSION_INPUTS
    assert not LIFECYCLE_INPUTS & SESSION_INPUTS


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=str)
def test_the_machine_follows_the_table(state: PartitionState, event: PartitionInput) -> None:
    machine = PartitionMachine(state)
    outcome = TRANSITIONS[(state, event)]
    if isinstance(outcome, Refusal):
        with pytest.raises(HvError) as info:
            machine.process(event, vm_id=VM)
        assert type(info.value) is outcome.error
        assert str(info.value) == outcome.message.format(vm_id=VM, state=state)
        assert machine.state is state  # a refused input changes nothing
    else:
        assert machine.next_state(event, vm_id=VM) is outcome
        assert machine.state is state  # next_state only looks
        assert machine.process(event, vm_id=VM) is outcome
        assert machine.state is outcome


@pytest.mark.parametrize("event", list(PartitionInput), ids=str)
def test_the_host_row(event: PartitionInput) -> None:
    machine = PartitionMachine(S.RUNNING, host=True)
    if event in LIFECYCLE_INPUTS:
        with pytest.raises(InvalidState, match=f"^the host partition cannot be {CHANGE[event]}$"):
            machine.process(event, vm_id=HOST_VM_ID)
    else:
        assert machine.process(event, vm_id=HOST_VM_ID) is S.RUNNING
    assert machine.state is S.RUNNING


def test_the_host_is_always_running() -> None:
    for state in (S.PAUSED, S.OFF):
        with pytest.raises(ValueError, match="always running"):
            PartitionMachine(state, host=True)


def test_table_shape() -> None:
    for (state, event), outcome in TRANSITIONS.items():
        if event in SESSION_INPUTS:
            # Sessions never move a partition; they are only refused in some states.
            assert outcome is state or isinstance(outcome, Refusal)
        if isinstance(outcome, Refusal):
            expected = InvalidState if event in LIFECYCLE_INPUTS else PartitionNotRunning
            assert outcome.error is expected, (state, event)
    for state in PartitionState:
        assert TRANSITIONS[(state, I.DETACH)] is state  # ending a session is never refused
        assert TRANSITIONS[(state, I.DELETE)] is S.OFF  # nor deleting a VM
        assert isinstance(TRANSITIONS[(state, I.ACT)], Refusal) == (state is not S.RUNNING)
        assert isinstance(TRANSITIONS[(state, I.ATTACH)], Refusal) == (state is S.OFF)
    # Every state is reachable from RUNNING (where a VM is created) by lifecycle inputs.
    seen, frontier = {S.RUNNING}, [S.RUNNING]
    while frontier:
        state = frontier.pop()
        for event in LIFECYCLE_INPUTS:
            outcome = TRANSITIONS[(state, event)]
            if isinstance(outcome, PartitionState) and outcome not in seen:
                seen.add(outcome)
                frontier.append(outcome)
    assert seen == set(PartitionState)


def test_the_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.OFF, I.ATTACH)] = S.RUNNING  # type: ignore[index]
    with pytest.raises(TypeError):
        HOST_TRANSITIONS[I.STOP] = S.OFF  # type: ignore[index]


# --- through HostCore --------------------------------------------------------------------------

SERVICE = service_id_for_port(80)


def vm_in(world: World, state: PartitionState) -> tuple[str, Session]:
    """A VM in ``state`` with a session attached before it got there (stale if OFF)."""
    vm_id, session = world.vm("vm")
    assert session is not None
    if state is S.PAUSED:
        world.core.pause_partition(vm_id, world.now)
    elif state is S.OFF:
        world.core.stop_partition(vm_id, world.now)
    assert world.core.get_partition(vm_id).state is state
    return vm_id, session


def give(world: World, vm_id: str, session: Session, event: PartitionInput) -> None:
    """Feed ``event`` to the partition through HostCore's public API."""
    core, now = world.core, world.now
    if event in LIFECYCLE_INPUTS:
        getattr(core, f"{event.value}_partition")(vm_id, now)
    elif event is I.ATTACH:
        token = world.tokens.get(vm_id, "host-secret")
        core.attach(vm_id, token, now)
    elif event is I.ACT:
        core.listen(session, WILDCARD, SERVICE, now)
    else:
        core.detach(session, now)


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=str)
def test_host_core_follows_the_table(
    make: Callable[..., World], state: PartitionState, event: PartitionInput
) -> None:
    world = make()
    vm_id, session = vm_in(world, state)
    outcome = TRANSITIONS[(state, event)]
    if state is S.OFF and event in (I.ACT, I.DETACH):
        # No session outlives a stop: the session check refuses before the table is read.
        with pytest.raises(Unauthenticated):
            give(world, vm_id, session, event)
    elif isinstance(outcome, Refusal):
        with pytest.raises(HvError) as info:
            give(world, vm_id, session, event)
        assert type(info.value) is outcome.error
        assert str(info.value) == outcome.message.format(vm_id=vm_id, state=state)
        assert not info.value.events
        assert world.core.get_partition(vm_id).state is state
    else:
        give(world, vm_id, session, event)
        if event is I.DELETE:
            with pytest.raises(NotFound):
                world.core.get_partition(vm_id)
        else:
            assert world.core.get_partition(vm_id).state is outcome


@pytest.mark.parametrize("event", list(PartitionInput), ids=str)
def test_host_core_follows_the_host_row(make: Callable[..., World], event: PartitionInput) -> None:
    world = make()
    outcome = HOST_TRANSITIONS[event]
    if isinstance(outcome, Refusal):
        with pytest.raises(outcome.error, match=f"^{outcome.message}$"):
            give(world, HOST_VM_ID, world.host, event)
    else:
        give(world, HOST_VM_ID, world.host, event)
    assert world.core.get_partition(HOST_VM_ID).state is S.RUNNING


# ``make`` is a factory with no state of its own: sharing it between examples is safe.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=st.lists(st.sampled_from(sorted(LIFECYCLE_INPUTS | {I.ATTACH})), max_size=25))
def test_random_lifecycles_keep_to_the_table(
    make: Callable[..., World], events: list[PartitionInput]
) -> None:
    # A model machine and a real VM, fed the same inputs, never disagree.
    world = make()
    vm_id, session = world.vm("vm")
    assert session is not None
    model = PartitionMachine(S.RUNNING)
    for event in events:
        try:
            expected: PartitionState | type[HvError] = model.process(event, vm_id=vm_id)
        except HvError as error:
            expected = type(error)
        try:
            give(world, vm_id, session, event)
        except HvError as error:
            assert expected is type(error), (event, error)
        else:
            assert isinstance(expected, PartitionState), event
        if event is I.DELETE and expected is S.OFF:
            return  # the VM is gone
        assert world.core.get_partition(vm_id).state is model.state
