"""The session data stream (SessionData): relayed channel ends, their windows, frame rules.

Theory of operation
-------------------
A session (one attach stream) whose channel ends cannot map the rings moves their bytes over
one bidirectional stream, ``SessionData``: every message carries a batch of frames, each for
one channel end of that session (``channel_id``, ``data``, ``fin``, ``credit``, ``close``).
This module decides, for every frame a client sends, whether it is allowed and what it means,
and keeps the two byte counts that flow-control each end. It knows nothing about rings,
streams, threads or protobuf: the adapter hands it frames as plain values and carries out the
effects it returns.

Windows (all counts are absolute totals since the end opened, so a repeated or late grant
never hurts: the larger value wins):

* Client -> host. The client may have sent at most ``send_limit`` bytes. The host grants
  ``delivered + room + window``: ``delivered`` is what left the host's hands for the peer
  (into the peer's ring, or onto the peer's own stream), ``room`` is what the peer's ring can
  take now, ``window`` the relay window of this end (0: strict). So the peer's ring never holds
  more than its capacity, the host holds at most ``room + window`` beyond it, and a sender
  that filled both waits, as on a ring.
* The budget. A window is a promise: the client may send it at any moment, and the host must
  then hold it. So the window part of every send limit (what it promises beyond the peer
  ring's room) is taken from one :class:`RelayBudget` shared by every session of the host, and
  given back as the bytes are delivered (or the end sends no more: FIN, close, end). An end
  gets ``min(window, what the budget has left)``: once the budget is spent, new promises are
  strict (the ring's room alone) until some comes back. So however many channels hostile
  clients open, the host holds at most the budget beyond its rings, and loses nothing: a
  strict end still moves its bytes, at a ring's pace.
* Host -> client. The host sends no data beyond the client's ``receive_limit`` (its credit),
  and nothing before the first: a client registers a channel with the stream by granting.
  An end may instead open credited (``open_end(receive_limit=...)``: its stream said it holds
  frames for ends it has not seen open yet), its first limit being its receive window: the
  host may send at once, which saves the client's first grant and a round trip.

Rules of this file:

Ends are named by ``(channel_id, end)``, ``end`` 0 for the connector and 1 for the acceptor,
as a session may hold both ends of one channel (a LOOPBACK connect to its own listener).

1. ``TRANSITIONS`` lists every allowed (state, input) pair of one end.  Any other pair, and
   any frame that breaks a window or size rule, resets that end (and only that end): the
   frame's effect is :class:`ResetEnd` with the error the client is told, the end is forgotten,
   and the adapter rescinds the channel.  ``ENDED`` is terminal; an ended end is forgotten at
   once, so later frames for it are frames for an unknown channel (``NOT_FOUND``), which a
   client must expect for frames that crossed a reset.
2. Fields of one frame apply in order: credit, data, fin, close.  ``close`` implies ``fin``.
3. A grant is told to the client only when it moved by a step (a quarter of the first limit)
   or the client is within a step of its limit (it may be waiting for it): a blocked sender
   always hears of new room, and a fast one costs a grant per quarter window, not per frame.
4. Pure: no clock is needed (nothing here times out; the channel's own timers are the core's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from host_service.core.errors import HvError, InvalidArgument, NotFound

__all__ = [
    "DEFAULT_RELAY_BUDGET",
    "DEFAULT_RELAY_WINDOW",
    "MAX_FRAME_DATA",
    "MAX_RELAY_WINDOW",
    "TRANSITIONS",
    "ClientClosed",
    "ClientCredit",
    "ClientData",
    "ClientFin",
    "EndInput",
    "EndState",
    "RelayBudget",
    "RelayEffect",
    "RelayEnd",
    "RelaySession",
    "ResetEnd",
]

#: Most data bytes in one frame (either way).
MAX_FRAME_DATA = 262_144
#: The relay window when neither the host's configuration nor the end asks for another.
#: 4 MiB: 64 KiB sends over the relay ran 1.5-2x faster with 1 MiB than with 256 KiB, and
#: 4 MiB beat 1 MiB in 22 of 25 alternated pairs (64 KiB and 256 KiB sends, one or both ends
#: relayed; 8 MiB gained no more): a quarter window between grants means fewer grants (each
#: a message through both stacks), and every relayed process spent less CPU per byte. It
#: costs memory only while data is in flight (item 5), and the budget bounds that.
DEFAULT_RELAY_WINDOW = 4 * 1024 * 1024
#: Largest relay window an end may ask for.
MAX_RELAY_WINDOW = 16 * 1024 * 1024
#: Window bytes the host promises across all relayed ends at once, by default: 256 ends at
#: the default window before new promises are strict.
DEFAULT_RELAY_BUDGET = 1 << 30


class RelayBudget:
    """The relay window bytes the host has promised beyond its peer rings' room, across every
    session, and the most it may (one per host, shared by every :class:`RelaySession`)."""

    __slots__ = ("limit", "promised")

    def __init__(self, limit: int = DEFAULT_RELAY_BUDGET) -> None:
        if limit < 0:
            raise InvalidArgument(f"relay budget {limit} is negative")
        self.limit = limit
        self.promised = 0

    @property
    def available(self) -> int:
        return max(self.limit - self.promised, 0)

    def take(self, window: int) -> int:
        """Promise up to ``window`` more: what there was room for (``give_back`` returns it)."""
        taken = min(window, self.available)
        self.promised += taken
        return taken

    def give_back(self, taken: int) -> None:
        self.promised -= taken


class EndState(StrEnum):
    #: Data and credit flow both ways.
    OPEN = "open"
    #: The client sent FIN: no more data from it; it still receives and grants.
    FIN_RECEIVED = "fin_received"
    #: The client closed its end: nothing more may come from it.
    CLOSED = "closed"
    #: The host ended the end (a reset, or the close is done): terminal.
    ENDED = "ended"


class EndInput(StrEnum):
    #: Client: a frame's data (non-empty).
    DATA = "data"
    #: Client: a frame's fin.
    FIN = "fin"
    #: Client: a frame's close.
    CLOSE = "close"
    #: Client: a frame's credit (receive limit).
    CREDIT = "credit"
    #: Host: the end is over (reset, rescind, close done).
    END = "end"


S = EndState
I = EndInput  # noqa: E741 - a one-letter alias keeps the table readable

_TABLE: dict[tuple[EndState, EndInput], EndState] = {
    (S.OPEN, I.DATA): S.OPEN,
    (S.OPEN, I.CREDIT): S.OPEN,
    (S.OPEN, I.FIN): S.FIN_RECEIVED,
    (S.OPEN, I.CLOSE): S.CLOSED,  # close implies FIN
    (S.OPEN, I.END): S.ENDED,
    (S.FIN_RECEIVED, I.CREDIT): S.FIN_RECEIVED,  # a half-closed end still receives
    (S.FIN_RECEIVED, I.CLOSE): S.CLOSED,
    (S.FIN_RECEIVED, I.END): S.ENDED,
    (S.CLOSED, I.END): S.ENDED,
    # FIN twice, data after FIN, anything after close: not listed, so each resets the end.
    # ENDED is terminal: no entries (and an ended end is forgotten at once).
}

#: The allowed transitions of one end, read-only.  Every pair not listed resets the end.
TRANSITIONS: Mapping[tuple[EndState, EndInput], EndState] = MappingProxyType(_TABLE)

del S, I


# -- effects: what the adapter carries out, in order ------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientData:
    """Data from the client, in order, for the peer."""

    channel_id: int
    end: int
    data: bytes | memoryview  # a view of the client's request (relaywire.Frame)


@dataclass(frozen=True, slots=True)
class ClientFin:
    """The client shut down writing, behind the data before it."""

    channel_id: int
    end: int


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed its end, behind the data (and FIN) before it."""

    channel_id: int
    end: int


@dataclass(frozen=True, slots=True)
class ClientCredit:
    """The client may now receive up to ``limit`` bytes in all (it grew)."""

    channel_id: int
    end: int
    limit: int


@dataclass(frozen=True, slots=True)
class ResetEnd:
    """Tell the client ``error`` for this channel and rescind the channel (``known``: the end
    existed in this session until now; otherwise there is nothing to rescind)."""

    channel_id: int
    end: int
    error: HvError
    known: bool


RelayEffect = ClientData | ClientFin | ClientClosed | ClientCredit | ResetEnd


class RelayEnd:
    """One relayed channel end of a session: its state and its two byte counts."""

    __slots__ = (
        "channel_id",
        "delivered",
        "end",
        "receive_limit",
        "received",
        "reserved",
        "send_limit",
        "sent",
        "state",
        "step",
        "told",
        "window",
    )

    def __init__(
        self,
        channel_id: int,
        end: int,
        window: int,
        room: int,
        reserved: int,
        receive_limit: int = 0,
    ) -> None:
        self.channel_id = channel_id
        self.end = end
        self.state = EndState.OPEN
        self.window = window
        #: The budget's bytes this end holds: its promise beyond the peer ring's room.
        self.reserved = reserved
        #: Client -> host: bytes received from the client, bytes that left for the peer, the
        #: largest limit computed, and the largest the client was told (what it may send).
        self.received = 0
        self.delivered = 0
        self.send_limit = self.told = room + reserved
        self.step = max(self.send_limit // 4, 1)
        #: Host -> client: the client's credit and the bytes sent to it.
        self.receive_limit = receive_limit
        self.sent = 0

    @property
    def held(self) -> int:
        """Bytes received from the client that have not left for the peer yet."""
        return self.received - self.delivered

    @property
    def sendable(self) -> int:
        """Bytes the host may send the client now (its credit not yet used)."""
        return max(self.receive_limit - self.sent, 0)

    def move(self, event: EndInput) -> EndState | None:
        """Apply ``event``: the new state, or None when the table does not allow it (the
        state is then unchanged; the caller resets the end)."""
        new = TRANSITIONS.get((self.state, event))
        if new is not None:
            self.state = new
        return new


class RelaySession:
    """The relayed channel ends of one session, and the rules of its SessionData stream."""

    def __init__(self, budget: RelayBudget | None = None) -> None:
        self._ends: dict[tuple[int, int], RelayEnd] = {}
        #: The host's (None: a budget of this session's own, of the default size).
        self.budget = RelayBudget() if budget is None else budget

    # -- ends ------------------------------------------------------------------------------

    def open_end(
        self,
        channel_id: int,
        end: int,
        window: int,
        room: int,
        reserved: int | None = None,
        receive_limit: int = 0,
    ) -> RelayEnd:
        """A relayed end of this session opened; ``room`` is what the peer's empty ring takes,
        so its first send limit (Channel.relay_send_limit) is ``room + window``, or less when
        the budget has less than ``window`` left (``reserved``: what the budget gave it already,
        for an end told its first limit before it opened here). ``receive_limit``: its first
        credit when it opens credited (Channel.relay_receive_credited), else 0 (none yet)."""
        if end not in (0, 1):
            raise InvalidArgument(f"end {end} is not 0 (connector) or 1 (acceptor)")
        if (channel_id, end) in self._ends:
            raise InvalidArgument(f"channel {channel_id} end {end} is relayed here already")
        if not 0 <= window <= MAX_RELAY_WINDOW:
            raise InvalidArgument(f"relay window {window} is not in [0, {MAX_RELAY_WINDOW}]")
        if reserved is None:
            reserved = self.budget.take(window)
        relay_end = self._ends[(channel_id, end)] = RelayEnd(
            channel_id, end, window, room, reserved, receive_limit
        )
        return relay_end

    def get(self, channel_id: int, end: int) -> RelayEnd | None:
        return self._ends.get((channel_id, end))

    def end(self, channel_id: int, end: int) -> RelayEnd | None:
        """The host ended this end (reset, rescind, close done): forget it."""
        relay_end = self._ends.pop((channel_id, end), None)
        if relay_end is not None:
            relay_end.move(EndInput.END)
            self._reserve(relay_end, 0)
        return relay_end

    def _reserve(self, relay_end: RelayEnd, reserved: int) -> None:
        """The end holds ``reserved`` of the budget from now on."""
        self.budget.promised += reserved - relay_end.reserved
        relay_end.reserved = reserved

    def __len__(self) -> int:
        return len(self._ends)

    def keys(self) -> list[tuple[int, int]]:
        return list(self._ends)

    # -- client -> host --------------------------------------------------------------------

    def receive(
        self,
        channel_id: int,
        end: int = 0,
        *,
        data: bytes | memoryview = b"",
        fin: bool = False,
        credit: int = 0,
        close: bool = False,
        reset: bool = False,
    ) -> list[RelayEffect]:
        """One frame from the client: its effects, in order. A frame that breaks a rule ends
        with :class:`ResetEnd` (effects before it in the same frame still hold)."""
        if channel_id == 0:
            return [ResetEnd(0, end, InvalidArgument("relay frame without a channel id"), False)]
        relay_end = self._ends.get((channel_id, end))
        if relay_end is None:
            return [
                ResetEnd(
                    channel_id,
                    end,
                    NotFound(f"no relayed end {end} of channel {channel_id} in this session"),
                    False,
                )
            ]
        where = f"channel {channel_id} end {end}"
        if reset:
            return [self._reset(relay_end, f"{where}: reset and close_done are the host's")]
        if not (data or fin or credit or close):
            return [self._reset(relay_end, f"{where}: empty relay frame")]
        effects: list[RelayEffect] = []
        if credit:
            if relay_end.move(EndInput.CREDIT) is None:
                return [self._reset(relay_end, f"{where}: credit after close")]
            if credit > relay_end.receive_limit:
                relay_end.receive_limit = credit
                effects.append(ClientCredit(channel_id, end, credit))
        if data:
            problem = None
            if len(data) > MAX_FRAME_DATA:
                problem = f"frame of {len(data)} bytes exceeds {MAX_FRAME_DATA}"
            elif relay_end.move(EndInput.DATA) is None:
                problem = f"data after {'close' if relay_end.state is EndState.CLOSED else 'fin'}"
            elif relay_end.received + len(data) > relay_end.told:
                problem = (
                    f"{relay_end.received + len(data)} bytes sent beyond the send limit "
                    f"{relay_end.told}"
                )
            if problem is not None:
                effects.append(self._reset(relay_end, f"{where}: {problem}"))
                return effects
            relay_end.received += len(data)
            effects.append(ClientData(channel_id, end, data))
        if fin:
            if relay_end.move(EndInput.FIN) is None:
                effects.append(self._reset(relay_end, f"{where}: fin after fin or close"))
                return effects
            self._reserve(relay_end, 0)  # nothing more comes: every promise is kept or void
            effects.append(ClientFin(channel_id, end))
        if close:
            if relay_end.move(EndInput.CLOSE) is None:
                effects.append(self._reset(relay_end, f"{where}: close after close"))
                return effects
            self._reserve(relay_end, 0)
            effects.append(ClientClosed(channel_id, end))
        return effects

    def _reset(self, relay_end: RelayEnd, message: str) -> ResetEnd:
        self.end(relay_end.channel_id, relay_end.end)
        return ResetEnd(relay_end.channel_id, relay_end.end, InvalidArgument(message), True)

    # -- host -> client ----------------------------------------------------------------------

    def grant(self, channel_id: int, end: int, delivered: int, room: int) -> int | None:
        """``delivered`` bytes of this end's data have left for the peer in all, whose ring has
        ``room`` free: the send limit to tell the client now, or None (nothing worth a frame,
        or the end sends no more data: it is past FIN)."""
        relay_end = self._ends.get((channel_id, end))
        if relay_end is None or relay_end.state is not EndState.OPEN:
            return None
        if not relay_end.received >= delivered >= relay_end.delivered:
            raise InvalidArgument(
                f"channel {channel_id} end {end}: delivered {delivered} outside "
                f"[{relay_end.delivered}, {relay_end.received}]"
            )
        relay_end.delivered = delivered
        # What the ring takes now needs no budget; the promise beyond it does. ``delivered +
        # room`` never shrinks (it is what the peer consumed plus the ring's size), so what
        # was told always fits in what the end reserved; the window beyond it is taken anew
        # from what the budget has left (an end starved before gets its window back).
        base = delivered + max(room, 0)
        promised = max(relay_end.told - base, 0)
        self._reserve(
            relay_end,
            max(promised, min(relay_end.window, relay_end.reserved + self.budget.available)),
        )
        relay_end.send_limit = max(relay_end.told, base + relay_end.reserved)
        told, limit = relay_end.told, relay_end.send_limit
        if limit > told and (
            limit - told >= relay_end.step or told - relay_end.received < relay_end.step
        ):
            relay_end.told = limit
            return limit
        return None

    def sent(self, channel_id: int, end: int, n: int) -> None:
        """``n`` bytes went to the client (within its credit)."""
        relay_end = self._ends.get((channel_id, end))
        if relay_end is None:
            return
        if n > relay_end.sendable:
            raise InvalidArgument(
                f"channel {channel_id} end {end}: {n} bytes exceed the client's credit"
            )
        relay_end.sent += n
