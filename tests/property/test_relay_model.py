"""The SessionData rules against a reference model (Hypothesis stateful).

The model is the protocol as the proto states it, written the simplest way: per end a state,
the bytes received, the limit told, and whether the host still knows the end. Random frames
(valid and not) and host grants drive both; after every step they agree on every effect, and
the window invariants hold: a client never has more than it was told accepted, and what the
host holds is at most the room it granted for plus the window.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from host_service.core.errors import InvalidArgument, NotFound
from host_service.core.relay import (
    MAX_FRAME_DATA,
    ClientClosed,
    ClientCredit,
    ClientData,
    ClientFin,
    EndState,
    RelayBudget,
    RelaySession,
    ResetEnd,
)

pytestmark = pytest.mark.property

KEYS = [(1, 0), (1, 1), (2, 0)]


class _ModelEnd:
    def __init__(self, window: int, room: int) -> None:
        self.state = "open"
        self.window = window
        self.received = 0
        self.delivered = 0
        self.told = room + window
        self.credit = 0


class RelayRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rules = RelaySession()
        self.model: dict[tuple[int, int], _ModelEnd] = {}
        self.opened: set[tuple[int, int]] = set()

    @rule(
        key=st.sampled_from(KEYS),
        window=st.sampled_from([0, 1, 5000, 70_000]),
        room=st.integers(0, 20_000),
    )
    def open_end(self, key: tuple[int, int], window: int, room: int) -> None:
        if key in self.opened:
            return  # an id is used once
        self.opened.add(key)
        self.rules.open_end(*key, window, room)
        self.model[key] = _ModelEnd(window, room)

    @rule(
        key=st.sampled_from([*KEYS, (0, 0), (9, 0)]),
        size=st.sampled_from([0, 1, 100, 4096, MAX_FRAME_DATA, MAX_FRAME_DATA + 1]),
        fin=st.booleans(),
        credit=st.sampled_from([0, 0, 10, 10_000, 2**40]),
        close=st.booleans(),
        reset=st.booleans(),
    )
    def frame(
        self,
        key: tuple[int, int],
        size: int,
        fin: bool,
        credit: int,
        close: bool,
        reset: bool,
    ) -> None:
        data = bytes(size)
        got = self.rules.receive(*key, data=data, fin=fin, credit=credit, close=close, reset=reset)
        assert got == self._expected(key, data, fin, credit, close, reset), got

    def _expected(
        self, key: tuple[int, int], data: bytes, fin: bool, credit: int, close: bool, reset: bool
    ) -> list[object]:
        cid, index = key
        end = self.model.get(key)
        if cid == 0:
            return [_Reset(key, InvalidArgument, False)]
        if end is None:
            return [_Reset(key, NotFound, False)]

        def broken() -> _Reset:
            del self.model[key]
            return _Reset(key, InvalidArgument, True)

        if reset or not (data or fin or credit or close):
            return [broken()]
        out: list[object] = []
        if credit:
            if end.state == "closed":
                return [broken()]
            if credit > end.credit:
                end.credit = credit
                out.append(ClientCredit(cid, index, credit))
        if data:
            if (
                len(data) > MAX_FRAME_DATA
                or end.state != "open"
                or end.received + len(data) > end.told
            ):
                return [*out, broken()]
            end.received += len(data)
            out.append(ClientData(cid, index, data))
        if fin:
            if end.state != "open":
                return [*out, broken()]
            end.state = "fin"
            out.append(ClientFin(cid, index))
        if close:
            if end.state == "closed":
                return [*out, broken()]
            end.state = "closed"
            out.append(ClientClosed(cid, index))
        return out

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), room=st.integers(0, 20_000))
    def grant(self, data: st.DataObject, room: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        end = self.model[key]
        delivered = data.draw(st.integers(end.delivered, end.received))
        told = self.rules.grant(*key, delivered, room)
        rules_end = self.rules.get(*key)
        assert rules_end is not None
        if end.state != "open":
            assert told is None
            return
        end.delivered = delivered
        if told is not None:
            assert told > end.told
            assert told <= delivered + room + end.window or told == rules_end.send_limit
            end.told = told
        assert rules_end.told == end.told

    @rule(key=st.sampled_from(KEYS))
    def host_ends(self, key: tuple[int, int]) -> None:
        self.rules.end(*key)
        self.model.pop(key, None)

    @invariant()
    def agree(self) -> None:
        assert set(self.rules.keys()) == set(self.model)
        for key, end in self.model.items():
            rules_end = self.rules.get(*key)
            assert rules_end is not None
            assert rules_end.received == end.received <= rules_end.told == end.told
            assert rules_end.receive_limit == end.credit
            # What the host holds never exceeds what the client was allowed.
            assert 0 <= rules_end.held <= rules_end.told - rules_end.delivered


class _Reset:
    """Matches a ResetEnd by key, error class and whether the end was known."""

    def __init__(self, key: tuple[int, int], error: type[Exception], known: bool) -> None:
        self.key, self.error, self.known = key, error, known

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ResetEnd)
            and (other.channel_id, other.end) == self.key
            and type(other.error) is self.error
            and other.known == self.known
        )

    def __repr__(self) -> str:
        return f"_Reset({self.key}, {self.error.__name__}, {self.known})"


TestRelayRules = RelayRules.TestCase
TestRelayRules.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


class BudgetRules(RuleBasedStateMachine):
    """Many ends of two sessions on one small budget, with rooms as a ring gives them: the
    peer consumes what was delivered (in order, never more), so ``room = capacity -
    (delivered - consumed)``. Whatever the order of opens, sends, deliveries, reads, FINs and
    ends: the budget is the sum of what the live ends reserve and never exceeds its limit, and
    no end was told more than its ring's room plus what it reserves."""

    LIMIT = 150_000

    def __init__(self) -> None:
        super().__init__()
        self.budget = RelayBudget(self.LIMIT)
        self.sessions = (RelaySession(self.budget), RelaySession(self.budget))
        # key -> [session, capacity, delivered, consumed]
        self.ends: dict[tuple[int, int, int], list[int]] = {}
        self.next_id = 1

    def _rules_end(self, key: tuple[int, int, int]) -> object:
        return self.sessions[key[0]].get(key[1], key[2])

    @rule(
        session=st.integers(0, 1),
        window=st.sampled_from([0, 1, 40_000, 100_000]),
        capacity=st.integers(0, 20_000),
    )
    def open_end(self, session: int, window: int, capacity: int) -> None:
        key = (session, self.next_id, 0)
        self.next_id += 1
        self.sessions[session].open_end(key[1], 0, window, capacity)
        self.ends[key] = [capacity, 0, 0]

    @precondition(lambda self: bool(self.ends))
    @rule(data=st.data(), fin=st.booleans())
    def send(self, data: st.DataObject, fin: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.ends)))
        end = self.sessions[key[0]].get(key[1], key[2])
        assert end is not None
        if end.state is not EndState.OPEN:
            return  # what a closed end may not send is RelayRules' matter
        room = end.told - end.received
        size = data.draw(st.integers(0, min(room, MAX_FRAME_DATA)))
        if size or fin:
            effects = self.sessions[key[0]].receive(key[1], key[2], data=bytes(size), fin=fin)
            assert not [e for e in effects if isinstance(e, ResetEnd)], effects

    @precondition(lambda self: bool(self.ends))
    @rule(data=st.data())
    def deliver_and_consume(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.ends)))
        capacity, delivered, consumed = self.ends[key]
        end = self.sessions[key[0]].get(key[1], key[2])
        assert end is not None
        consumed = data.draw(st.integers(consumed, delivered))
        # Into the ring as far as the room it has after the peer's reads.
        delivered = min(end.received, consumed + capacity)
        delivered = data.draw(st.integers(self.ends[key][1], max(delivered, self.ends[key][1])))
        self.ends[key] = [capacity, delivered, consumed]
        self.sessions[key[0]].grant(key[1], key[2], delivered, capacity - (delivered - consumed))

    @precondition(lambda self: bool(self.ends))
    @rule(data=st.data())
    def host_ends(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.ends)))
        self.sessions[key[0]].end(key[1], key[2])
        del self.ends[key]

    @invariant()
    def bounded(self) -> None:
        reserved = 0
        for key, (capacity, _, consumed) in self.ends.items():
            end = self.sessions[key[0]].get(key[1], key[2])
            assert end is not None
            reserved += end.reserved
            assert end.reserved <= end.window
            if end.state is EndState.OPEN:
                assert end.told <= consumed + capacity + end.reserved
            else:  # past FIN nothing more comes: nothing is reserved
                assert end.reserved == 0
        assert self.budget.promised == reserved <= self.LIMIT


TestBudgetRules = BudgetRules.TestCase
TestBudgetRules.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
