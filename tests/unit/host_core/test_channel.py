"""Unit tests of the channel transition table: the lifecycle paths DESIGN section 3 names."""

from __future__ import annotations

import pytest

from host_service.core import (
    ChannelInput as I,
)
from host_service.core import (
    ChannelMachine,
    NotConnected,
    ProtocolError,
)
from host_service.core import (
    ChannelState as S,
)

pytestmark = pytest.mark.unit


def run(*events: I, start: S = S.CONNECT_REQUESTED) -> S:
    machine = ChannelMachine(start)
    for event in events:
        machine.process(event)
    return machine.state


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ((I.OFFER, I.ACCEPT), S.OPEN),
        ((I.OFFER, I.ACCEPT, I.FIN_CONNECTOR), S.HALF_CLOSED_BY_CONNECTOR),
        ((I.OFFER, I.ACCEPT, I.FIN_CONNECTOR, I.FIN_CONNECTOR), S.HALF_CLOSED_BY_CONNECTOR),
        ((I.OFFER, I.ACCEPT, I.FIN_CONNECTOR, I.FIN_ACCEPTOR), S.CLOSED),
        ((I.OFFER, I.ACCEPT, I.FIN_ACCEPTOR, I.FIN_CONNECTOR), S.CLOSED),
        ((I.OFFER, I.ACCEPT, I.CLOSE_CONNECTOR), S.CLOSING_BY_CONNECTOR),
        ((I.OFFER, I.ACCEPT, I.CLOSE_CONNECTOR, I.CLOSE_CONNECTOR), S.CLOSING_BY_CONNECTOR),
        ((I.OFFER, I.ACCEPT, I.CLOSE_CONNECTOR, I.CLOSE_ACCEPTOR), S.CLOSED),
        ((I.OFFER, I.ACCEPT, I.CLOSE_ACCEPTOR, I.FIN_CONNECTOR), S.CLOSED),
        ((I.OFFER, I.ACCEPT, I.CLOSE_ACCEPTOR, I.CLOSE_TIMEOUT), S.RESCINDED),
        ((I.OFFER, I.ACCEPT, I.FIN_ACCEPTOR, I.CLOSE_ACCEPTOR), S.CLOSING_BY_ACCEPTOR),
        ((I.OFFER, I.ACCEPT, I.FIN_ACCEPTOR, I.CLOSE_CONNECTOR), S.CLOSED),
        ((I.OFFER, I.ACCEPT, I.RESCIND), S.RESCINDED),
        ((I.OFFER, I.REFUSE), S.CLOSED),
        ((I.OFFER, I.DROP), S.CONNECT_REQUESTED),
        ((I.OFFER, I.DROP, I.CONNECT_TIMEOUT), S.CLOSED),
        ((I.CONNECT_TIMEOUT,), S.CLOSED),
        ((I.CLOSE_CONNECTOR,), S.CLOSED),
        ((I.OFFER, I.CLOSE_CONNECTOR), S.CLOSED),
        ((I.RESCIND,), S.RESCINDED),
    ],
)
def test_paths(events: tuple[I, ...], final: S) -> None:
    assert run(*events) is final


def test_protocol_error_closes_the_channel() -> None:
    machine = ChannelMachine(S.OPEN)
    with pytest.raises(ProtocolError, match="'accept' is not allowed in state 'open'") as info:
        machine.process(I.ACCEPT)
    assert "rescinded" in str(info.value)
    assert machine.state is S.RESCINDED and machine.terminal


def test_fin_before_open_is_not_connected() -> None:
    machine = ChannelMachine(S.OFFERED)
    with pytest.raises(NotConnected) as info:
        machine.process(I.FIN_CONNECTOR)
    assert info.value.errno == 107  # ENOTCONN
    assert machine.state is S.RESCINDED


def test_terminal_states_reject_everything_and_stay() -> None:
    for state in (S.CLOSED, S.RESCINDED):
        machine = ChannelMachine(state)
        for event in I:
            assert not machine.allows(event)
            with pytest.raises(ProtocolError):
                machine.process(event)
            assert machine.state is state
