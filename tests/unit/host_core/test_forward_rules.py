"""The forwarding rules (host_service.core.forward): a flow's transition table, its gates
(credit, stall, the receiver's stream), FIN and close in order, and the send limit it leads
to, each pair and rule by name."""

from __future__ import annotations

import itertools

import pytest

from host_service.core.errors import InvalidState
from host_service.core.forward import (
    FLOW_TRANSITIONS,
    Flow,
    FlowInput,
    FlowState,
    ForwardData,
    ForwardFin,
    Progress,
    SenderClosed,
    SenderFin,
)
from host_service.core.relay import RelaySession

pytestmark = pytest.mark.unit

RING = 8000  # payload an empty ring of this direction takes, about 2 pages
WINDOW = 1000  # the receiver's relay window
UNSENT = 5000  # max_unsent


def flow(ring: int = RING, window: int = WINDOW, unsent: int = UNSENT) -> Flow:
    return Flow(ring, ring + window, unsent)


def data(effects: list[object]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, ForwardData))


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(FlowState, FlowInput)), ids=lambda x: str(x)
)
def test_every_pair(state: FlowState, event: FlowInput) -> None:
    f = flow()
    f.state = state
    if (state, event) in FLOW_TRANSITIONS:
        f._move(event)
        assert f.state is FLOW_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(InvalidState):
            f._move(event)
        assert f.state is state


def test_table_shape() -> None:
    # CLOSED and RESET are terminal (only the idempotent inputs are listed, and they stay);
    # RESET is reachable from every live state; nothing leads back to OPEN.
    for terminal in (FlowState.CLOSED, FlowState.RESET):
        out = {new for (old, _), new in FLOW_TRANSITIONS.items() if old is terminal}
        assert out == {terminal}
    for state in (FlowState.OPEN, FlowState.ORPHANED, FlowState.SHUT):
        assert FLOW_TRANSITIONS[(state, FlowInput.RESET)] is FlowState.RESET
        assert FLOW_TRANSITIONS[(state, FlowInput.CLOSE)] is FlowState.CLOSED
    assert all(
        new is not FlowState.OPEN
        for (old, _), new in FLOW_TRANSITIONS.items()
        if old is not FlowState.OPEN
    )
    # Past FIN no data and no second FIN.
    assert (FlowState.SHUT, FlowInput.DATA) not in FLOW_TRANSITIONS
    assert (FlowState.SHUT, FlowInput.FIN) not in FLOW_TRANSITIONS
    with pytest.raises(TypeError):
        FLOW_TRANSITIONS[(FlowState.OPEN, FlowInput.DATA)] = FlowState.CLOSED  # type: ignore[index]


# -- rule 1: data goes within the receiver's credit, unstalled, while its stream keeps up ----


def test_nothing_goes_before_the_receivers_first_credit() -> None:
    f = flow()
    assert f.push(b"abc") == []
    assert f.held == 3
    effects = f.grant(RING + WINDOW)
    assert effects == [ForwardData(b"abc"), Progress(3, RING - 3)]
    assert (f.delivered, f.forwarded, f.held) == (3, 3, 0)


def test_a_receiver_that_opened_credited_gets_data_and_fin_at_once() -> None:
    """Its stream takes early frames (Channel.relay_receive_credited): its receive window is
    its first credit, so nothing waits for a grant."""
    f = Flow(RING, RING + WINDOW, UNSENT, credit=RING + WINDOW)
    assert f.push(b"abc") == [ForwardData(b"abc"), Progress(3, RING - 3)]
    assert f.push_fin() == [ForwardFin(), SenderFin()]
    assert f.grant(RING + WINDOW) == []  # the same credit again: nothing new


def test_data_is_split_where_the_credit_ends() -> None:
    f = flow()
    f.grant(5)
    assert data(f.push(b"0123456789")) == b"01234"
    assert f.held == 5
    assert data(f.grant(8)) == b"567"
    assert data(f.grant(100)) == b"89"


def test_a_receiver_stream_that_does_not_keep_up_stops_the_flow() -> None:
    f = flow(unsent=4)
    f.grant(1 << 30)
    assert data(f.push(b"aaaa")) == b"aaaa"  # unsent 4: at the bound
    assert f.push(b"bb") == []
    assert f.unsent == 4 and f.held == 2
    assert data(f.wrote(1)) == b"bb"  # one frame beyond the bound at most
    with pytest.raises(InvalidState):
        f.wrote(99)  # more than was unsent


def test_a_late_or_repeated_grant_does_nothing() -> None:
    f = flow()
    f.grant(10)
    assert f.grant(10) == [] and f.grant(3) == []
    assert f.credit == 10


# -- rule 2: the room, hence the sender's limit ------------------------------------------------


def test_room_is_what_a_ring_between_the_ends_would_have_free() -> None:
    f = flow()
    f.grant(RING + WINDOW)  # consumed 0
    f.push(bytes(3000))
    assert f.room == RING - 3000
    f.grant(RING + WINDOW + 1000)  # it consumed 1000
    assert f.consumed == 1000 and f.room == RING - 2000
    # A receiver claiming more than it was sent consumed only what it was sent.
    f.grant(1 << 40)
    assert f.consumed == 3000 and f.room == RING


def test_with_rules_the_strict_window_keeps_exactly_a_ring_in_flight() -> None:
    """Through RelaySession.grant, the sender's limit is consumed + ring (+ its window)."""
    rules = RelaySession()
    told = rules.open_end(1, 0, 0, RING).told
    f = Flow(RING, RING, UNSENT)  # the receiver is strict too
    assert told == RING
    rules.receive(1, 0, data=bytes(RING))
    effects = f.push(bytes(RING)) + f.grant(RING)
    # Everything went, nothing was consumed: no new limit.
    for e in effects:
        if isinstance(e, Progress):
            assert rules.grant(1, 0, e.delivered, e.room) is None
    assert f.in_flight == RING
    effects = f.grant(RING + 4000)  # the receiver read 4000
    (progress,) = [e for e in effects if isinstance(e, Progress)]
    assert rules.grant(1, 0, progress.delivered, progress.room) == RING + 4000


def test_what_the_host_holds_is_bounded_whatever_the_receiver_claims() -> None:
    rules = RelaySession()
    rules.open_end(1, 0, WINDOW, RING)
    f = flow()
    f.grant(1 << 40)  # a receiver that claims it consumed everything, always
    for _ in range(50):
        limit = rules.get(1, 0).told  # type: ignore[union-attr]
        chunk = limit - rules.get(1, 0).received  # type: ignore[union-attr]
        if chunk <= 0:
            break
        rules.receive(1, 0, data=bytes(chunk))
        for e in f.push(bytes(chunk)):
            if isinstance(e, Progress):
                rules.grant(1, 0, e.delivered, e.room)
        # The receiver never writes its stream out: unsent stays, held grows to a bound.
        assert f.held <= RING + WINDOW
        assert f.unsent <= UNSENT + RING + WINDOW


# -- rule 3: FIN and close behind the data -----------------------------------------------------


def test_fin_goes_behind_the_data_and_only_once_the_receiver_granted() -> None:
    f = flow()
    assert f.push_fin() == []  # no credit yet: its stream may not be open
    with pytest.raises(InvalidState):
        f.push(b"late")  # RelaySession rejects data after FIN: a push is a bug
    assert f.grant(10) == [ForwardFin(), SenderFin()]
    assert f.state is FlowState.SHUT


def test_data_then_fin_then_close() -> None:
    f = flow()
    f.grant(3)
    f.push(b"abcde")
    f.push_fin()
    assert f.push_close() == []  # behind the data the credit does not cover yet
    effects = f.grant(100)
    assert effects == [
        ForwardData(b"de"),
        ForwardFin(),
        SenderFin(),
        SenderClosed(),
    ]
    assert f.state is FlowState.CLOSED


def test_close_implies_fin() -> None:
    f = flow()
    f.grant(10)
    assert f.push_close() == [ForwardFin(), SenderClosed()]  # the core hears close, not FIN
    with pytest.raises(InvalidState):
        f.push_close()


# -- rule 4: a stall holds everything, in order ------------------------------------------------


def test_a_stall_holds_data_fin_and_close_and_no_grant_moves() -> None:
    f = flow()
    f.grant(RING + WINDOW)
    assert f.stall(True) == []
    assert f.push(b"abc") == [] and f.push_close() == []
    assert f.grant(RING + WINDOW + 500) == []  # the receiver consumed: still no Progress
    assert f.stall(False) == [
        ForwardData(b"abc"),
        ForwardFin(),
        SenderClosed(),
    ]


def test_unstalling_reports_the_progress_made_meanwhile() -> None:
    f = flow()
    f.grant(RING + WINDOW)
    f.push(b"x" * 10)
    f.stall(True)
    f.grant(RING + WINDOW + 10)
    assert f.stall(False) == [Progress(10, RING)]


# -- rule 5: the receiver gone -----------------------------------------------------------------


def test_once_the_receiver_is_gone_data_is_dropped_and_counted() -> None:
    f = flow()
    f.grant(RING + WINDOW)
    f.push(b"a" * 100)
    f.grant(RING + WINDOW + 60)  # consumed 60
    f.push(b"b" * 50000)  # beyond the credit: mostly held
    effects = f.receiver_gone()
    assert data(effects) == b""
    assert f.state is FlowState.ORPHANED and f.held == 0
    assert f.delivered == 50100 and f.forwarded == RING + WINDOW + 60
    (progress,) = [e for e in effects if isinstance(e, Progress)]
    assert progress.room == 0  # so the sender gets ring + window past what was consumed, no more
    assert f.push_fin() == [SenderFin()]  # no EOF to send, the core still hears it
    assert f.push_close() == [SenderClosed()]


# -- rule 6: reset -----------------------------------------------------------------------------


def test_reset_drops_what_is_held_and_nothing_more_goes() -> None:
    f = flow()
    f.push(b"held")
    f.push_fin()
    f.reset()
    assert f.state is FlowState.RESET and f.held == 0
    assert f.grant(100) == []
    with pytest.raises(InvalidState):
        f.push(b"more")
    f.reset()  # idempotent
    assert f.receiver_gone() == []


def test_a_closed_flow_stays_closed_when_the_channel_is_reset() -> None:
    f = flow()
    f.grant(1)
    f.push_close()
    f.reset()
    assert f.state is FlowState.CLOSED


def test_in_flight_is_sent_and_not_consumed() -> None:
    f = flow()
    f.push(b"x" * 300)  # held: still in flight
    assert f.in_flight == 300
    f.grant(RING + WINDOW + 100)
    assert f.in_flight == 200


def test_construction_is_checked() -> None:
    with pytest.raises(ValueError):
        Flow(0, 10, 1)
    with pytest.raises(ValueError):
        Flow(11, 10, 1)
    with pytest.raises(ValueError):
        Flow(10, 10, 0)
