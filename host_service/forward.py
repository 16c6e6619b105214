"""Channels whose two ends are both relayed: frames pass from one session stream to the other.

A :class:`ForwardPair` replaces the rings and the four pump threads that two ``RingRelay`` ends
would need. Each end is a :class:`ForwardEnd` in its session's :class:`~.sessiondata.
SessionData` (which treats it like a ``RingRelay``: frames checked by its ``RelaySession`` are
pushed to it, the client's credit is given to it, and it hears when its frames are written
out); each direction is a pure ``core.forward.Flow``, whose effects are carried out here. All
of it runs on the event loop: there are no threads, no locks and no ring.

The ends' SessionData may be one and the same (a session holding both ends of a loopback
channel): ends are named by ``(channel_id, end)`` throughout, so that needs nothing special.

Teardown. An end is finished by its SessionData (close done, a reset, its stream gone), which
calls :meth:`ForwardEnd.stop`: its outgoing flow drops what it held, and its incoming flow
drops from then on. When the host rescinds or removes the channel, every end not finished yet
is finished with the reset a rescinded ring would give it, behind what was forwarded to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import kept
from ring import shm

from . import metrics
from .core import errors
from .core.forward import (
    Flow,
    FlowEffect,
    ForwardData,
    ForwardFin,
    Progress,
    SenderClosed,
    SenderFin,
)
from .core.types import Side
from .ringrelay import MAX_UNSENT
from .sessiondata import DataFrame, SessionData, is_close, is_fin
from .status import error_message

__all__ = ["ForwardEnd", "ForwardPair", "RelayOpening"]


@dataclass(frozen=True, slots=True)
class RelayOpening:
    """What a relayed end is told when it opens: its first send limit (the peer's empty ring
    plus its window) and its receive window (its own empty ring plus its window)."""

    send_limit: int
    receive_window: int
    #: The host took ``receive_window`` as the end's first credit (Channel.relay_receive_credited).
    credited: bool = False


@dataclass(frozen=True, slots=True)
class EndSpec:
    """One relayed end as the data plane opens it (kept while its peer's path is unknown)."""

    side: Side
    vm_id: str
    session_id: int
    relays: SessionData
    window: int
    #: Budget taken for it when it was told its first limit before opening (None: not yet).
    reserved: int | None = None
    #: It opens credited: its session's stream takes early frames (SessionData.credits_new_ends).
    credited: bool = False


class ForwardEnd:
    """One end of a forwarded channel, as its session's SessionData sees it (the calls a
    ``RingRelay`` takes from it: push, credit, written_out, stop)."""

    def __init__(self, pair: ForwardPair, spec: EndSpec, channel_id: int) -> None:
        self.pair = pair
        self.side = spec.side
        self.index = 0 if spec.side is Side.CONNECTOR else 1
        self.key = (channel_id, self.index)
        self.channel_id = channel_id
        self.vm_id = spec.vm_id
        self.session_id = spec.session_id
        self.owner = spec.relays
        self.window = spec.window
        self.credited = spec.credited
        self.finished = False
        #: This end -> its peer, and its peer -> this end (set by the pair).
        self.out: Flow
        self.into: Flow
        self.peer: ForwardEnd

    # -- from SessionData (on the loop) ------------------------------------------------------

    def push(self, item: object) -> None:
        if isinstance(item, bytes | memoryview):
            effects = self.out.push(kept(item))
        elif is_fin(item):
            effects = self.out.push_fin()
        elif is_close(item):
            effects = self.out.push_close()
            # A closed end reads nothing more: its peer's bytes are dropped from now on and
            # its peer's FIN and close complete. Not only once this close is carried out: that
            # waits for the peer's credit, and a peer that closed without granting would wait
            # for this end's in turn, for as long as the sessions live.
            self.pair.carry_out(self.peer, self.into.receiver_gone())
        else:  # the stop marker never comes here: stop() is called instead
            raise errors.InvalidState(f"unexpected item {item!r} for a forwarded end")
        self.pair.carry_out(self, effects)

    def credit(self, limit: int) -> None:
        self.pair.carry_out(self.peer, self.into.grant(limit))

    def written_out(self, n: int) -> None:
        """``n`` bytes forwarded to this end went onto its stream."""
        self.pair.carry_out(self.peer, self.into.wrote(n))

    def stop(self) -> None:
        """SessionData finished this end: nothing more comes from it or goes to it."""
        self.finished = True
        self.out.reset()
        self.pair.carry_out(self.peer, self.into.receiver_gone())


class ForwardPair:
    """The two relayed ends of one channel and the two flows between them."""

    def __init__(
        self,
        channel_id: int,
        first: EndSpec,
        second: EndSpec,
        rings: tuple[int, int],
    ) -> None:
        """``rings[r]``: the payload capacity of ring ``r`` (0: connector -> acceptor)."""
        self.channel_id = channel_id
        self.reason: str | None = None  # rescinded: why
        ends = {spec.side: ForwardEnd(self, spec, channel_id) for spec in (first, second)}
        self.ends = ends
        connector, acceptor = ends[Side.CONNECTOR], ends[Side.ACCEPTOR]
        connector.peer, acceptor.peer = acceptor, connector
        # Each end's receive window: the ring its peer writes to it, plus its own window.
        windows = {end.side: rings[1 - end.index] + end.window for end in ends.values()}
        for sender in (connector, acceptor):
            receiver = sender.peer
            receive_window = windows[receiver.side]
            sender.out = receiver.into = Flow(
                rings[sender.index],
                receive_window,
                MAX_UNSENT,
                receive_window if receiver.credited else 0,
            )
        self.limits: dict[Side, RelayOpening] = {}
        for spec in (first, second):
            end = ends[spec.side]
            receive_window = windows[end.side]
            # Registered in both at once: a frame the rules know is a frame relays can take.
            told = end.owner.rules.open_end(
                channel_id,
                end.index,
                end.window,
                rings[end.index],
                spec.reserved,
                receive_window if end.credited else 0,
            ).told
            end.owner.relays[end.key] = end
            self.limits[end.side] = RelayOpening(told, receive_window, end.credited)

    # -- carrying out a flow's effects -------------------------------------------------------

    def carry_out(self, sender: ForwardEnd, effects: list[FlowEffect]) -> None:
        """Carry out ``effects`` of the flow from ``sender`` to its peer, in order."""
        receiver = sender.peer
        channel_id = self.channel_id
        for effect in effects:
            if isinstance(effect, ForwardData):
                n = len(effect.data)
                receiver.owner.rules.sent(channel_id, receiver.index, n)
                receiver.owner.queue_frame(
                    DataFrame(channel_id, receiver.index, effect.data), receiver
                )
                metrics.child(metrics.BYTES, "from_client").inc(n)
                metrics.child(metrics.BYTES, "to_client").inc(n)
            elif isinstance(effect, Progress):
                limit = sender.owner.rules.grant(
                    channel_id, sender.index, effect.delivered, effect.room
                )
                if limit is not None:
                    sender.owner.queue_frame(
                        hvsock_pb2.RelayFrame(channel_id=channel_id, end=sender.index, credit=limit)
                    )
            elif isinstance(effect, ForwardFin):
                receiver.owner.queue_frame(
                    hvsock_pb2.RelayFrame(channel_id=channel_id, end=receiver.index, fin=True)
                )
            elif isinstance(effect, SenderFin):
                sender.owner.tell_fin(channel_id, sender.side)
            elif isinstance(effect, SenderClosed):
                # Finished before the core hears of it, as a ring relay's close is: closing
                # may rescind the channel at once (the peer closed first).
                sender.owner.finish(sender, hvsock_pb2.RelayFrame(close_done=True))
                sender.owner.tell_closed(channel_id, sender.side)

    # -- from the data plane -----------------------------------------------------------------

    def rescind(self, reason: str) -> None:
        """The channel is rescinded: every end still open is reset, behind what was forwarded
        to it (what its peer sent that was still held is dropped)."""
        self.reason = self.reason or reason
        for end in self.ends.values():
            if not end.finished:
                end.out.reset()
        for end in self.ends.values():
            if not end.finished:
                error = errors.ConnectionReset(
                    f"channel {self.channel_id} was rescinded: {self.reason}"
                )
                end.owner.finish(end, hvsock_pb2.RelayFrame(reset=error_message(error)))

    def stall(self, mask: int) -> None:
        """Apply the stall bits (``shm.stall_bit``) now in force: a flow stops while its
        sender's sends or its receiver's receives are stalled."""
        for sender in self.ends.values():
            receiver = sender.peer
            stalled = bool(
                mask & (shm.stall_bit(sender.index, False) | shm.stall_bit(receiver.index, True))
            )
            if stalled != sender.out.stalled:
                self.carry_out(sender, sender.out.stall(stalled))

    def ring_used(self) -> tuple[int, int]:
        """Per ring, what a ring would hold: bytes in flight, at most the ring's capacity."""
        connector = self.ends[Side.CONNECTOR]
        return (
            min(connector.out.in_flight, connector.out.ring),
            min(connector.into.in_flight, connector.into.ring),
        )

    def bytes_sent(self, side: Side) -> int:
        """Bytes ``side`` sent that the host carried out (forwarded, or dropped once its peer
        was gone): what a ring relay counts as written into the ring."""
        return self.ends[side].out.delivered

    def vm_of(self, side: Side) -> str:
        return self.ends[side].vm_id
