"""Forwarding between two relayed ends of one channel: the host passes frames stream to stream.

Theory of operation
-------------------
When both ends of a channel are relayed (neither maps the rings), a ring between them would
only cost two pump threads and two copies per byte. Instead each direction of the channel is
a :class:`Flow`: the sending end's data, FIN and close (already checked by
``core.relay.RelaySession``) go into the flow's queue, and the flow carries them out, in order,
onto the receiving end's stream, as far as the receiver's credit and the gates below allow.

Counts (absolute totals since the channel opened, like everything in ``core.relay``):

* ``received``: bytes the sender sent; ``delivered``: of those, bytes carried out (forwarded
  to the receiver, or dropped once the receiver is gone); the rest is *held* in the queue.
* ``forwarded``: bytes handed to the receiver's stream; ``written``: of those, bytes the
  stream has written out (``forwarded - written`` is *unsent*).
* ``credit``: the receiver's receive limit. An honest client grants ``consumed + capacity``,
  ``capacity`` being what the host told it (the ring of this direction plus its window), so
  ``consumed`` is read back as ``credit - capacity`` (clamped to ``[0, forwarded]``: a client
  cannot have consumed what it was never sent, whatever it claims).

Rules of this file:

1. Data is forwarded only within the receiver's credit, while the flow is not stalled, and
   while the receiver's stream keeps up (``unsent < max_unsent``): a receiver that stops
   reading its stream stops the flow, never grows host memory.
2. The sender's send limit (granted by the adapter through ``RelaySession.grant``) is
   ``delivered + room + window`` with ``room = ring - (delivered - consumed)`` clamped to
   ``[0, ring]``: so it is ``consumed + ring + window``, what a ring between the two would
   allow. With the strict window (0) exactly a ring's worth is in flight, and a sender that
   filled ring and window waits. Whatever the receiver claims, the host holds at most
   ``ring + window`` of this flow in the queue plus ``max_unsent`` (and one frame) unsent.
3. FIN and close go behind the data before them. FIN is forwarded only once the receiver has
   granted credit at all (before that its stream may not be open, and the EOF would be lost).
   Close implies FIN; carrying it out ends the sender (``SenderClosed``).
4. A stalled flow (the host pauses or stalls the sender's sends or the receiver's receives)
   carries out nothing: data, FIN and close wait in the queue, and the sender's limit stops
   growing with ``delivered``. Nothing is lost; it all goes once the stall lifts.
5. Once the receiver's end is gone (``RECEIVER_GONE``) data is carried out by being dropped
   and counted: ``consumed`` no longer grows, so the sender gets one ring and window more, then
   waits, as on a ring nobody reads; its FIN and close still complete.
6. ``RESET`` (the sender's end ended without a close, or the channel was rescinded) drops what
   is held. ``CLOSED`` and ``RESET`` are terminal: nothing more may be pushed.
7. ``TRANSITIONS`` lists every (state, input) pair the flow may see; any other is a bug in the
   caller (``InvalidState``), since ``RelaySession`` rejects bad frames before they get here.
8. Pure: no clock, no I/O; every method returns the effects the adapter carries out, in order.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from host_service.core.errors import InvalidState

__all__ = [
    "FLOW_TRANSITIONS",
    "Flow",
    "FlowEffect",
    "FlowInput",
    "FlowState",
    "ForwardData",
    "ForwardFin",
    "Progress",
    "SenderClosed",
    "SenderFin",
]


class FlowState(StrEnum):
    #: The sender's bytes go to the receiver.
    OPEN = "open"
    #: The receiver's end is gone: the sender's bytes are counted and dropped.
    ORPHANED = "orphaned"
    #: The sender's FIN was carried out (the receiver, if any, sees EOF behind the data).
    SHUT = "shut"
    #: The sender's close was carried out (it was told close_done): terminal.
    CLOSED = "closed"
    #: The sender's end or the channel was reset; what was held is dropped: terminal.
    RESET = "reset"


class FlowInput(StrEnum):
    #: A chunk of the sender's data is carried out.
    DATA = "data"
    #: The sender's FIN is carried out.
    FIN = "fin"
    #: The sender's close is carried out.
    CLOSE = "close"
    #: The receiving end is gone.
    RECEIVER_GONE = "receiver_gone"
    #: The sending end ended without a close, or the channel was rescinded.
    RESET = "reset"


S = FlowState
I = FlowInput  # noqa: E741 - a one-letter alias keeps the table readable

_TABLE: dict[tuple[FlowState, FlowInput], FlowState] = {
    (S.OPEN, I.DATA): S.OPEN,
    (S.OPEN, I.FIN): S.SHUT,
    (S.OPEN, I.CLOSE): S.CLOSED,  # close implies FIN
    (S.OPEN, I.RECEIVER_GONE): S.ORPHANED,
    (S.OPEN, I.RESET): S.RESET,
    (S.ORPHANED, I.DATA): S.ORPHANED,
    (S.ORPHANED, I.FIN): S.SHUT,
    (S.ORPHANED, I.CLOSE): S.CLOSED,
    (S.ORPHANED, I.RECEIVER_GONE): S.ORPHANED,
    (S.ORPHANED, I.RESET): S.RESET,
    # Past FIN nothing but the close comes; whether the receiver is still there is moot.
    (S.SHUT, I.CLOSE): S.CLOSED,
    (S.SHUT, I.RECEIVER_GONE): S.SHUT,
    (S.SHUT, I.RESET): S.RESET,
    # Terminal: the ends going (in whatever order) and a late rescind change nothing.
    (S.CLOSED, I.RECEIVER_GONE): S.CLOSED,
    (S.CLOSED, I.RESET): S.CLOSED,
    (S.RESET, I.RECEIVER_GONE): S.RESET,
    (S.RESET, I.RESET): S.RESET,
    # Data or FIN after FIN, anything after close or reset: RelaySession rejects those frames
    # before they reach a flow, so they are not listed (InvalidState: a bug).
}

#: The allowed transitions of one flow, read-only.
FLOW_TRANSITIONS: Mapping[tuple[FlowState, FlowInput], FlowState] = MappingProxyType(_TABLE)

del S, I

#: States in which nothing more may be pushed.
_TERMINAL = frozenset({FlowState.CLOSED, FlowState.RESET})


# -- effects: what the adapter carries out, in order -------------------------------------------


@dataclass(frozen=True, slots=True)
class ForwardData:
    """Put ``data`` on the receiver's stream (within its credit; count it as sent to it)."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ForwardFin:
    """Put the sender's FIN (EOF, behind its data) on the receiver's stream."""


@dataclass(frozen=True, slots=True)
class SenderFin:
    """The sender's FIN is carried out: tell the core (FIN bookkeeping)."""


@dataclass(frozen=True, slots=True)
class SenderClosed:
    """The sender's close is carried out: answer it close_done, then tell the core."""


@dataclass(frozen=True, slots=True)
class Progress:
    """``delivered`` or the receiver's consumption moved: grant the sender from
    ``RelaySession.grant(delivered, room)``."""

    delivered: int
    room: int


FlowEffect = ForwardData | ForwardFin | SenderFin | SenderClosed | Progress

_FIN_MARK = "fin"
_CLOSE_MARK = "close"


class Flow:
    """One direction of a forwarded channel: the sender's data, FIN and close on their way to
    the receiver's stream (see the module docstring for the counts and rules)."""

    __slots__ = (
        "_fin_done",
        "_last_progress",
        "_pushed",
        "_queue",
        "capacity",
        "credit",
        "delivered",
        "forwarded",
        "max_unsent",
        "received",
        "ring",
        "stalled",
        "state",
        "written",
    )

    def __init__(self, ring: int, capacity: int, max_unsent: int, credit: int = 0) -> None:
        """``credit``: the receiver's first credit when it opened credited (its receive
        window, ``capacity``), else 0: nothing goes to it before its first grant."""
        if not 0 < ring <= capacity:
            raise ValueError(f"ring {ring} must be positive and at most capacity {capacity}")
        if max_unsent <= 0:
            raise ValueError("max_unsent must be positive")
        self.state = FlowState.OPEN
        #: Payload bytes this direction's ring holds (its room when empty).
        self.ring = ring
        #: What the receiver's client grants beyond what it consumed: the ring plus its window.
        self.capacity = capacity
        self.max_unsent = max_unsent
        self._queue: collections.deque[bytes | memoryview | str] = collections.deque()
        self.received = 0
        self.delivered = 0
        self.forwarded = 0
        self.written = 0
        self.credit = credit
        self.stalled = False
        self._fin_done = False
        self._pushed = ""  # the last of FIN and close pushed ("" none yet)
        self._last_progress = (0, 0)  # (delivered, consumed) last reported

    # -- derived counts ----------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        """Bytes the receiver says it consumed (never more than it was sent)."""
        return min(max(self.credit - self.capacity, 0), self.forwarded)

    @property
    def held(self) -> int:
        """Bytes of the sender waiting in the host."""
        return self.received - self.delivered

    @property
    def unsent(self) -> int:
        return self.forwarded - self.written

    @property
    def in_flight(self) -> int:
        """Bytes the sender sent that the receiver has not consumed (the ring's fill, were
        there a ring: ``hvsock channels`` shows it against the ring's size)."""
        return self.received - self.consumed

    @property
    def room(self) -> int:
        """What a ring between the ends would have free now."""
        return min(max(self.ring - (self.delivered - self.consumed), 0), self.ring)

    # -- inputs ----------------------------------------------------------------------------

    def push(self, data: bytes | memoryview) -> list[FlowEffect]:
        """The sender's data (non-empty, already within its send limit)."""
        self._pushable("data")
        self._queue.append(data)
        self.received += len(data)
        return self.pump()

    def push_fin(self) -> list[FlowEffect]:
        self._pushable("fin")
        self._queue.append(_FIN_MARK)
        return self.pump()

    def push_close(self) -> list[FlowEffect]:
        self._pushable("close")
        self._queue.append(_CLOSE_MARK)
        return self.pump()

    def grant(self, limit: int) -> list[FlowEffect]:
        """The receiver's credit (it only grows: a late or repeated grant does nothing)."""
        if limit <= self.credit:
            return []
        self.credit = limit
        return self.pump()

    def wrote(self, n: int) -> list[FlowEffect]:
        """``n`` forwarded bytes left on the receiver's stream."""
        if not 0 <= n <= self.unsent:
            raise InvalidState(f"{n} bytes written of {self.unsent} unsent")
        self.written += n
        return self.pump()

    def stall(self, stalled: bool) -> list[FlowEffect]:
        self.stalled = stalled
        return [] if stalled else self.pump()

    def receiver_gone(self) -> list[FlowEffect]:
        self._move(FlowInput.RECEIVER_GONE)
        return self.pump()

    def reset(self) -> None:
        """Drop what is held; the flow carries out nothing more."""
        self._move(FlowInput.RESET)
        self._queue.clear()
        self.delivered = self.received  # dropped: nothing of it is held any more

    # -- carrying out ----------------------------------------------------------------------

    def pump(self) -> list[FlowEffect]:
        """Carry out what the gates allow, in order (rules 1, 3, 4, 5)."""
        effects: list[FlowEffect] = []
        queue = self._queue
        while queue and not self.stalled and self.state not in _TERMINAL:
            head = queue[0]
            if not isinstance(head, str):  # data (bytes, or a view of a request)
                if self.state is FlowState.ORPHANED:
                    queue.popleft()
                    self._move(FlowInput.DATA)
                    self.delivered += len(head)
                    continue
                n = min(len(head), self.credit - self.forwarded)
                if n <= 0 or self.unsent >= self.max_unsent:
                    break
                if n == len(head):
                    queue.popleft()
                else:  # the receiver's credit ends inside this frame (its window is smaller)
                    queue[0] = head[n:]
                    head = head[:n]
                self._move(FlowInput.DATA)
                self.delivered += n
                self.forwarded += n
                effects.append(ForwardData(head))
                continue
            receiver = self.state is FlowState.OPEN
            if receiver and not self._fin_done and self.credit == 0:
                break  # rule 3: its stream may not be open yet
            queue.popleft()
            if head == _FIN_MARK:
                self._move(FlowInput.FIN)
                self._fin_done = True
                if receiver:
                    effects.append(ForwardFin())
                effects.append(SenderFin())
            else:
                if receiver and not self._fin_done:
                    effects.append(ForwardFin())
                self._fin_done = True
                self._move(FlowInput.CLOSE)
                effects.append(SenderClosed())
        # No grant while stalled: the sender's limit stays where the stall found it (rule 4).
        progress = (self.delivered, self.consumed)
        if progress != self._last_progress and not self.stalled and self.state not in _TERMINAL:
            self._last_progress = progress
            effects.append(Progress(self.delivered, self.room))
        return effects

    def _pushable(self, what: str) -> None:
        """Only data, FIN, close, in that order, and nothing once terminal: RelaySession has
        rejected anything else, so another push is a bug of the caller."""
        if (
            self.state in _TERMINAL
            or self._pushed == _CLOSE_MARK
            or (self._pushed == _FIN_MARK and what != _CLOSE_MARK)
        ):
            raise InvalidState(
                f"{what} pushed into a flow in state {self.state} after {self._pushed!r}"
            )
        if what != "data":
            self._pushed = what

    def _move(self, event: FlowInput) -> None:
        new = FLOW_TRANSITIONS.get((self.state, event))
        if new is None:
            raise InvalidState(f"flow in state {self.state} cannot take {event}")
        self.state = new
