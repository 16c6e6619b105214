"""A forwarded flow against a reference model (Hypothesis stateful).

The model is the flow as the module docstring states it, written the simplest way: the bytes
the sender sent, what of it reached the receiver's stream, whether FIN and close were pushed
and carried out. Random steps drive a sender held to its limit by ``RelaySession`` (as the
adapter holds it), a receiver that reads some of what it got and grants credit honestly or not
at all, its stream writing out, stalls, and the receiver going away. After every step:

* what the receiver got is a prefix of what the sender sent, in order, never beyond its credit;
* EOF reaches the receiver only behind all the data, once; the close only after FIN;
* nothing is carried out while stalled;
* the host holds at most ``ring + window`` of the sender's bytes, and at most ``max_unsent``
  (plus one frame) waits for the receiver's stream;
* with both windows strict and an honest receiver, at most one ring is in flight;
* and at the end, unstalled, with the receiver reading everything, it all arrives.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from host_service.core.forward import (
    Flow,
    FlowEffect,
    FlowState,
    ForwardData,
    ForwardFin,
    Progress,
    SenderClosed,
    SenderFin,
)
from host_service.core.relay import MAX_FRAME_DATA, RelaySession

pytestmark = pytest.mark.property

CID, END = 3, 0
MAX_UNSENT = 20_000


class ForwardModel(RuleBasedStateMachine):
    @initialize(
        ring=st.sampled_from([4000, 8000, 30_000]),
        sender_window=st.sampled_from([0, 5000, 70_000]),
        receiver_window=st.sampled_from([0, 5000, 70_000]),
    )
    def open(self, ring: int, sender_window: int, receiver_window: int) -> None:
        self.ring, self.sender_window = ring, sender_window
        self.capacity = ring + receiver_window
        self.strict = sender_window == 0 and receiver_window == 0
        self.rules = RelaySession()
        self.rules.open_end(CID, END, sender_window, ring)
        self.flow = Flow(ring, self.capacity, MAX_UNSENT)
        self.sent = bytearray()  # what the sender sent
        self.got = bytearray()  # what reached the receiver's stream
        self.consumed = 0  # of that, what the receiver read
        self.credit = 0
        self.honest = True
        self.stalled = False
        self.gone = False
        self.fin_pushed = self.close_pushed = False
        self.eof = self.sender_fin = self.closed = False
        self.counter = 0

    # -- carrying out ----------------------------------------------------------------------

    def apply(self, effects: list[FlowEffect]) -> None:
        if self.stalled:
            assert effects == []
        for effect in effects:
            assert not self.closed, effect
            if isinstance(effect, ForwardData):
                assert not self.gone and not self.eof
                self.got += effect.data
                start = len(self.got) - len(effect.data)
                assert self.got[start:] == self.sent[start : len(self.got)]
                assert len(self.got) <= self.credit
            elif isinstance(effect, ForwardFin):
                assert not self.gone and not self.eof and self.credit > 0
                assert self.got == self.sent  # behind all the data
                self.eof = True
            elif isinstance(effect, SenderFin):
                assert self.fin_pushed and not self.sender_fin
                self.sender_fin = True
            elif isinstance(effect, SenderClosed):
                assert self.close_pushed
                assert self.eof or self.gone or self.sender_fin
                self.closed = True
            elif isinstance(effect, Progress):
                assert effect.delivered == self.flow.delivered
                self.rules.grant(CID, END, effect.delivered, effect.room)

    # -- the sender ------------------------------------------------------------------------

    @precondition(lambda self: not (self.fin_pushed or self.close_pushed))
    @rule(size=st.integers(1, 100_000))
    def send(self, size: int) -> None:
        end = self.rules.get(CID, END)
        assert end is not None
        size = min(size, end.told - end.received, MAX_FRAME_DATA)
        if size <= 0:
            return
        chunk = bytes([self.counter % 251]) * size
        self.counter += 1
        assert self.rules.receive(CID, END, data=chunk)  # within the limit: accepted
        self.sent += chunk
        self.apply(self.flow.push(chunk))

    @precondition(lambda self: not (self.fin_pushed or self.close_pushed))
    @rule()
    def fin(self) -> None:
        self.rules.receive(CID, END, fin=True)
        self.fin_pushed = True
        self.apply(self.flow.push_fin())

    @precondition(lambda self: not self.close_pushed)
    @rule()
    def close(self) -> None:
        self.rules.receive(CID, END, close=True)
        self.close_pushed = self.fin_pushed = True
        self.apply(self.flow.push_close())

    # -- the receiver ----------------------------------------------------------------------

    @precondition(lambda self: not self.gone)
    @rule(n=st.integers(0, 50_000), dishonest=st.booleans())
    def read_and_grant(self, n: int, dishonest: bool) -> None:
        written = self.flow.written  # it can read only what its stream brought it
        self.consumed = min(self.consumed + n, written)
        if dishonest:
            self.honest = False
            self.credit = max(self.credit, self.credit + n)
        else:
            self.credit = max(self.credit, self.consumed + self.capacity)
        self.apply(self.flow.grant(self.credit))

    @precondition(lambda self: not self.gone)
    @rule(n=st.integers(0, 300_000))
    def stream_writes(self, n: int) -> None:
        self.apply(self.flow.wrote(min(n, self.flow.unsent)))

    @rule(on=st.booleans())
    def stall(self, on: bool) -> None:
        self.stalled = on
        self.apply(self.flow.stall(on))

    @precondition(lambda self: not self.gone)
    @rule()
    def receiver_goes(self) -> None:
        self.gone = True
        self.apply(self.flow.receiver_gone())

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        if not hasattr(self, "flow"):
            return
        flow = self.flow
        assert flow.received == len(self.sent)
        assert flow.forwarded == len(self.got)
        assert flow.held <= self.ring + self.sender_window
        assert flow.unsent <= MAX_UNSENT + MAX_FRAME_DATA
        if self.strict and self.honest and not self.gone:
            assert flow.in_flight <= self.ring
        assert (flow.state is FlowState.CLOSED) == self.closed

    def teardown(self) -> None:
        """Unstalled, the receiver reading and granting everything: it all arrives."""
        if not hasattr(self, "flow") or self.gone:
            return
        self.stalled = False
        self.apply(self.flow.stall(False))
        for _ in range(1000):
            before = (self.flow.delivered, self.eof, self.closed)
            self.apply(self.flow.wrote(self.flow.unsent))
            self.consumed = self.flow.written
            if self.honest:
                self.credit = max(self.credit, self.consumed + self.capacity)
            else:
                self.credit += self.capacity
            self.apply(self.flow.grant(self.credit))
            if (self.flow.delivered, self.eof, self.closed) == before and self.flow.held == 0:
                break
        assert self.flow.held == 0 and self.got == self.sent
        assert self.eof == self.fin_pushed
        assert self.closed == self.close_pushed


TestForwardModel = ForwardModel.TestCase
TestForwardModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
