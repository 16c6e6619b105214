"""Property tests of the channel transition table (h2's test_state_machines, for hv_sock).

Every (state, input) pair either is a defined transition to a valid state, or raises
ProtocolError and leaves the channel closed.  Random input sequences keep the invariants.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_service.core import TRANSITIONS, ChannelInput, ChannelMachine, ChannelState, ProtocolError
from host_service.core.channel import (
    CLOSING_STATES,
    CONNECTING_STATES,
    ESTABLISHED_STATES,
    TERMINAL_STATES,
)

pytestmark = pytest.mark.property

ALL_PAIRS = list(itertools.product(ChannelState, ChannelInput))


@given(state=st.sampled_from(ChannelState), event=st.sampled_from(ChannelInput))
def test_any_pair_transitions_or_closes(state: ChannelState, event: ChannelInput) -> None:
    machine = ChannelMachine(state)
    if (state, event) in TRANSITIONS:
        new = machine.process(event)
        assert new is TRANSITIONS[(state, event)]
        assert machine.state is new
    else:
        with pytest.raises(ProtocolError) as info:
            machine.process(event)
        assert machine.terminal
        # A live channel is torn down by the host; a terminal one stays as it was.
        expected = state if state in TERMINAL_STATES else ChannelState.RESCINDED
        assert machine.state is expected
        assert event.value in str(info.value) and state.value in str(info.value)


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=lambda x: str(x))
def test_every_pair_exhaustively(state: ChannelState, event: ChannelInput) -> None:
    # The same property over all 99 pairs without sampling, so none is ever skipped.
    machine = ChannelMachine(state)
    try:
        new = machine.process(event)
    except ProtocolError:
        assert (state, event) not in TRANSITIONS
        assert machine.terminal
    else:
        assert TRANSITIONS[(state, event)] is new


def test_table_shape() -> None:
    # Terminal states have no way out, every target is a state, every non-terminal state
    # accepts RESCIND (the host may tear any channel down at any time).
    for (state, _), new in TRANSITIONS.items():
        assert state not in TERMINAL_STATES
        assert isinstance(new, ChannelState)
    for state in ChannelState:
        if state not in TERMINAL_STATES:
            assert TRANSITIONS[(state, ChannelInput.RESCIND)] is ChannelState.RESCINDED


def test_every_state_reachable_and_every_live_state_can_finish() -> None:
    seen = {ChannelState.CONNECT_REQUESTED}
    queue = deque(seen)
    while queue:
        state = queue.popleft()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                queue.append(dst)
    assert seen == set(ChannelState)
    # From every live state the channel can end gracefully without the host's help
    # (no state where only a rescind ends it), except before it is offered/accepted.
    for state in ESTABLISHED_STATES:
        reachable = {state}
        frontier = [state]
        while frontier:
            current = frontier.pop()
            for (src, event), dst in TRANSITIONS.items():
                if (
                    src is current
                    and event not in (ChannelInput.RESCIND, ChannelInput.CLOSE_TIMEOUT)
                    and dst not in reachable
                ):
                    reachable.add(dst)
                    frontier.append(dst)
        assert ChannelState.CLOSED in reachable, state


def fin_sent(state: ChannelState, connector: bool) -> bool:
    side = "CONNECTOR" if connector else "ACCEPTOR"
    return state in (
        ChannelState[f"HALF_CLOSED_BY_{side}"],
        ChannelState[f"CLOSING_BY_{side}"],
    )


@settings(max_examples=300)
@given(st.lists(st.sampled_from(ChannelInput), max_size=40))
def test_random_sequences_keep_invariants(events: list[ChannelInput]) -> None:
    machine = ChannelMachine()
    was_terminal = False
    was_established = False
    fins = {True: False, False: False}
    for event in events:
        before = machine.state
        try:
            after = machine.process(event)
        except ProtocolError:
            after = machine.state
            assert machine.terminal
        # 1. terminal is absorbing
        if was_terminal:
            assert after is before
        was_terminal = machine.terminal
        # 2. once established, never connecting again
        if was_established:
            assert after not in CONNECTING_STATES
        was_established = was_established or after in ESTABLISHED_STATES
        # 3. a FIN, once sent, is never taken back while the channel lives
        if not machine.terminal:
            for connector in (True, False):
                if fins[connector]:
                    assert fin_sent(after, connector) or after in CLOSING_STATES
                fins[connector] = fins[connector] or fin_sent(after, connector)
        # 4. the two CLOSING states and the two half-closed states say who sent the FIN;
        #    never both (two FINs mean CLOSED)
        if not machine.terminal:
            assert not (fin_sent(after, True) and fin_sent(after, False))
