"""The SessionData rules (host_service.core.relay): the end's transition table, frame
validation and the window arithmetic, each pair and rule by name."""

from __future__ import annotations

import itertools

import pytest

from host_service.core.errors import InvalidArgument, NotFound
from host_service.core.relay import (
    MAX_FRAME_DATA,
    MAX_RELAY_WINDOW,
    TRANSITIONS,
    ClientClosed,
    ClientCredit,
    ClientData,
    ClientFin,
    EndInput,
    EndState,
    RelayBudget,
    RelayEnd,
    RelaySession,
    ResetEnd,
)

pytestmark = pytest.mark.unit

CID = 7
ROOM = 8000  # what an empty 2-page ring takes, about
WINDOW = 1000


def session(window: int = WINDOW, room: int = ROOM) -> RelaySession:
    s = RelaySession()
    s.open_end(CID, 0, window, room)
    return s


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(EndState, EndInput)), ids=lambda x: str(x)
)
def test_every_pair(state: EndState, event: EndInput) -> None:
    end = RelayEnd(CID, 0, WINDOW, ROOM, WINDOW)
    end.state = state
    new = end.move(event)
    if (state, event) in TRANSITIONS:
        assert new is TRANSITIONS[(state, event)] and end.state is new
    else:
        assert new is None and end.state is state


def test_table_shape() -> None:
    # ENDED is terminal; END leads every live state there; nothing leads back to OPEN.
    assert not [pair for pair in TRANSITIONS if pair[0] is EndState.ENDED]
    for state in (EndState.OPEN, EndState.FIN_RECEIVED, EndState.CLOSED):
        assert TRANSITIONS[(state, EndInput.END)] is EndState.ENDED
    assert all(
        new is not EndState.OPEN for (old, _), new in TRANSITIONS.items() if old != EndState.OPEN
    )
    with pytest.raises(TypeError):
        TRANSITIONS[(EndState.OPEN, EndInput.DATA)] = EndState.CLOSED  # type: ignore[index]


# -- frames ----------------------------------------------------------------------------------


def test_data_fin_close_in_order() -> None:
    s = session()
    assert s.receive(CID, 0, data=b"ab", fin=True) == [
        ClientData(CID, 0, b"ab"),
        ClientFin(CID, 0),
    ]
    assert s.receive(CID, 0, credit=5, close=True) == [
        ClientCredit(CID, 0, 5),
        ClientClosed(CID, 0),
    ]
    assert s.get(CID, 0).state is EndState.CLOSED  # type: ignore[union-attr]


def test_close_implies_fin() -> None:
    s = session()
    assert s.receive(CID, 0, data=b"x", close=True) == [
        ClientData(CID, 0, b"x"),
        ClientClosed(CID, 0),
    ]


def test_credit_only_grows() -> None:
    s = session()
    assert s.receive(CID, 0, credit=100) == [ClientCredit(CID, 0, 100)]
    assert s.receive(CID, 0, credit=50) == []  # an older grant: nothing new
    assert s.get(CID, 0).receive_limit == 100  # type: ignore[union-attr]


def _reset(effects: list[object], error: type[Exception], text: str) -> ResetEnd:
    last = effects[-1]
    assert isinstance(last, ResetEnd), effects
    assert isinstance(last.error, error) and text in str(last.error), last.error
    return last


@pytest.mark.parametrize(
    ("frames", "text"),
    [
        ([{"data": bytes(MAX_FRAME_DATA + 1)}], "exceeds"),
        ([{"data": bytes(ROOM + WINDOW + 1)}], "beyond the send limit"),
        ([{"fin": True}, {"data": b"late"}], "data after fin"),
        ([{"fin": True}, {"fin": True}], "fin after fin"),
        ([{"close": True}, {"data": b"late"}], "data after close"),
        ([{"close": True}, {"credit": 9}], "credit after close"),
        ([{"close": True}, {"close": True}], "close after close"),
        ([{"reset": True}], "the host's"),
        ([{}], "empty relay frame"),
    ],
)
def test_a_broken_rule_resets_only_that_end(frames: list[dict[str, object]], text: str) -> None:
    s = session()
    s.open_end(CID + 1, 0, WINDOW, ROOM)
    s.open_end(CID, 1, WINDOW, ROOM)  # the other end of the same channel, also here
    effects: list[object] = []
    for frame in frames:
        effects = list(s.receive(CID, 0, **frame))  # type: ignore[arg-type]
    reset = _reset(effects, InvalidArgument, text)
    assert (reset.channel_id, reset.end, reset.known) == (CID, 0, True)
    assert s.get(CID, 0) is None  # forgotten: later frames are for an unknown end
    assert s.get(CID + 1, 0) is not None and s.get(CID, 1) is not None
    later = s.receive(CID, 0, credit=1)
    assert isinstance(later[0], ResetEnd) and isinstance(later[0].error, NotFound)


def test_effects_before_the_broken_rule_hold() -> None:
    s = session()
    effects = s.receive(CID, 0, credit=10, data=bytes(ROOM + WINDOW + 1))
    assert effects[0] == ClientCredit(CID, 0, 10)
    _reset(effects, InvalidArgument, "beyond")


@pytest.mark.parametrize(("channel_id", "end"), [(CID + 5, 0), (CID, 1)])
def test_unknown_end_is_not_found_and_unknown(channel_id: int, end: int) -> None:
    s = session()
    reset = _reset(s.receive(channel_id, end, data=b"x"), NotFound, "no relayed end")
    assert not reset.known
    assert s.get(CID, 0) is not None  # the session's own end is untouched


def test_channel_zero() -> None:
    reset = _reset(session().receive(0, 0, data=b"x"), InvalidArgument, "without a channel id")
    assert not reset.known


def test_open_end_rules() -> None:
    s = session()
    with pytest.raises(InvalidArgument, match="already"):
        s.open_end(CID, 0, WINDOW, ROOM)
    with pytest.raises(InvalidArgument, match="window"):
        s.open_end(CID + 1, 0, MAX_RELAY_WINDOW + 1, ROOM)
    with pytest.raises(InvalidArgument, match="end 2"):
        s.open_end(CID + 1, 2, WINDOW, ROOM)


# -- windows ---------------------------------------------------------------------------------


def test_first_limit_is_room_plus_window() -> None:
    s = session()
    end = s.get(CID, 0)
    assert end is not None and end.told == ROOM + WINDOW
    assert s.receive(CID, 0, data=bytes(ROOM + WINDOW)) == [
        ClientData(CID, 0, bytes(ROOM + WINDOW))
    ]


def test_grant_counts_delivered_room_and_window() -> None:
    s = session()
    s.receive(CID, 0, data=bytes(ROOM + WINDOW))
    # The host wrote ROOM bytes into the ring, which is full: nothing new yet.
    assert s.grant(CID, 0, ROOM, 0) is None
    # The peer read half the ring: the client (at its limit) hears at once.
    assert s.grant(CID, 0, ROOM, ROOM // 2) == ROOM + ROOM // 2 + WINDOW


def test_small_grants_wait_for_a_step_unless_the_client_is_near_its_limit() -> None:
    s = session(window=100_000, room=0)
    end = s.get(CID, 0)
    assert end is not None and end.step == 25_000
    s.receive(CID, 0, data=bytes(1000))
    assert s.grant(CID, 0, 1000, 0) is None  # far from its limit, a 1000-byte move: later
    s.receive(CID, 0, data=bytes(30_000))
    assert s.grant(CID, 0, 31_000, 0) == 131_000  # moved by a step
    s.receive(CID, 0, data=bytes(90_000))  # 121,000 of 131,000: within a step of the limit
    assert s.grant(CID, 0, 121_000, 0) == 221_000


def test_strict_window_is_the_ring_alone() -> None:
    s = session(window=0, room=ROOM)
    s.receive(CID, 0, data=bytes(ROOM))
    effects = s.receive(CID, 0, data=b"x")
    _reset(effects, InvalidArgument, "beyond the send limit")


def test_no_grant_past_fin_and_delivered_is_checked() -> None:
    s = session()
    s.receive(CID, 0, data=bytes(10))
    with pytest.raises(InvalidArgument, match="outside"):
        s.grant(CID, 0, 11, 0)
    s.receive(CID, 0, fin=True)
    assert s.grant(CID, 0, 10, ROOM) is None
    assert s.grant(CID + 9, 0, 0, 0) is None  # unknown: nothing


def test_sent_within_credit() -> None:
    s = session()
    with pytest.raises(InvalidArgument, match="credit"):
        s.sent(CID, 0, 1)
    s.receive(CID, 0, credit=10)
    s.sent(CID, 0, 10)
    end = s.get(CID, 0)
    assert end is not None and end.sendable == 0
    s.sent(CID + 9, 0, 1)  # an end already forgotten: nothing to count


def test_an_end_opened_credited_may_be_sent_its_window_at_once() -> None:
    s = RelaySession()
    s.open_end(CID, 0, WINDOW, ROOM, receive_limit=ROOM + WINDOW)
    end = s.get(CID, 0)
    assert end is not None and end.sendable == ROOM + WINDOW
    s.sent(CID, 0, ROOM + WINDOW)
    with pytest.raises(InvalidArgument, match="credit"):
        s.sent(CID, 0, 1)
    # The client's own grants still only move the limit up.
    assert s.receive(CID, 0, credit=10) == []
    assert s.receive(CID, 0, credit=ROOM + WINDOW + 5) == [ClientCredit(CID, 0, ROOM + WINDOW + 5)]


def test_end_forgets() -> None:
    s = session()
    end = s.end(CID, 0)
    assert end is not None and end.state is EndState.ENDED
    assert s.end(CID, 0) is None and len(s) == 0 and s.keys() == []


# -- the host's budget -------------------------------------------------------------------------


def test_the_budget_caps_the_windows_promised() -> None:
    budget = RelayBudget(1500)
    s, other = RelaySession(budget), RelaySession(budget)  # one budget for every session
    assert s.open_end(CID, 0, WINDOW, ROOM).told == ROOM + WINDOW
    assert other.open_end(CID, 1, WINDOW, ROOM).told == ROOM + 500  # what was left
    assert s.open_end(CID + 1, 0, WINDOW, ROOM).told == ROOM  # spent: strict
    assert budget.promised == 1500 and budget.available == 0
    # A strict end moves its bytes at the ring's pace, and no further.
    s.receive(CID + 1, 0, data=bytes(ROOM))
    _reset(s.receive(CID + 1, 0, data=b"x"), InvalidArgument, "beyond the send limit")


def test_the_budget_comes_back_and_a_starved_end_gets_its_window() -> None:
    budget = RelayBudget(WINDOW)
    s = RelaySession(budget)
    s.open_end(CID, 0, WINDOW, ROOM)
    starved = s.open_end(CID + 1, 0, WINDOW, ROOM)
    assert starved.told == ROOM and starved.reserved == 0
    s.receive(CID, 0, data=bytes(10), fin=True)  # no more data can come: its promise is void
    assert budget.promised == 0
    s.receive(CID + 1, 0, data=bytes(ROOM))
    # The host wrote it all into the ring and the peer read it: room, plus the window now.
    assert s.grant(CID + 1, 0, ROOM, ROOM) == 2 * ROOM + WINDOW
    assert starved.reserved == WINDOW and budget.promised == WINDOW


def test_delivery_keeps_what_was_told_reserved_and_the_end_gives_it_back() -> None:
    budget = RelayBudget(10 * WINDOW)
    s = RelaySession(budget)
    end = s.open_end(CID, 0, WINDOW, ROOM)
    s.receive(CID, 0, data=bytes(ROOM + WINDOW))
    # Into the ring as far as it takes (full: no room): the window's bytes are still held.
    s.grant(CID, 0, ROOM, 0)
    assert end.reserved == WINDOW and end.told - (end.delivered + 0) == WINDOW
    s.end(CID, 0)
    assert budget.promised == 0


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        RelayBudget(-1)
