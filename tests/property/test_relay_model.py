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
